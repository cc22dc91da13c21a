"""The extension zip: built and validated by Blender's own tool, installed, enabled, removed cleanly."""
from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import bpy
import pytest

import build

PACKAGE_ID = "portrait3d"


@pytest.fixture
def temp_repo(tmp_path):
    """A local extension repository in a temporary folder, removed afterwards."""
    prefs = bpy.context.preferences
    prefs.use_preferences_save = False  # never write the user's real preferences
    directory = tmp_path / "repo"
    directory.mkdir()
    assert bpy.ops.preferences.extension_repo_add(
        name="portrait3d_test", type='LOCAL', use_custom_directory=True,
        custom_directory=str(directory)) == {'FINISHED'}
    repo = next(r for r in prefs.extensions.repos if Path(r.directory).resolve() == directory.resolve())
    yield repo
    for index, r in enumerate(prefs.extensions.repos):
        if Path(r.directory).resolve() == directory.resolve():
            bpy.ops.preferences.extension_repo_remove(index=index)
            break


def test_zip_has_core_and_no_dev_files(extension_zip):
    assert extension_zip.name == f"{PACKAGE_ID}-{build.manifest()['version']}.zip"
    names = zipfile.ZipFile(extension_zip).namelist()
    for required in ("blender_manifest.toml", "__init__.py", "core.py", "poses.py", "rig.py", "job_writer.py",
                     "worker_process.py", "frame_import.py", "reference_check.py", "previews.py",
                     "dp3d_core/__init__.py", "dp3d_core/cameras.py", "dp3d_core/job.py", "dp3d_core/protocol.py",
                     "dp3d_core/worker.py", "dp3d_core/hub_download.py", "worker_env.py", "worker_requirements.txt",
                     "worker_requirements_nodeps.txt", "setup_operators.py", "model_manager.py", "model_operators.py"):
        assert required in names
    # The bundled small model travels with the extension, byte for byte, so it works with no settings touched.
    model = build.ROOT / build.BUNDLED_MODEL
    shipped = sorted(p.relative_to(build.ROOT).as_posix() for p in model.rglob("*") if p.is_file())
    assert shipped and "models/small/unet/diffusion_pytorch_model.safetensors" in shipped
    with zipfile.ZipFile(extension_zip) as z:
        for name in shipped:
            assert z.read(name) == (build.ROOT / name).read_bytes(), name
    for required in ("reference_prep.py", "dp3d_core/prepare_reference.py", "dp3d_core/face_landmarks.py",
                     "dp3d_core/face_pose.py", "dp3d_core/data/face_landmarks_3d.json"):  # reference preparation
        assert required in names
    for name in names:
        parts = name.split("/")
        assert "__pycache__" not in parts and not name.endswith(".pyc"), name
        assert "tests" not in parts and "training" not in parts, name


def test_zip_passes_blender_validation(extension_zip):
    build.validate(extension_zip)  # raises BuildError otherwise


def test_invalid_package_fails_with_clear_message(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("blender_manifest.toml", 'schema_version = "1.0.0"\nid = "portrait3d"\n')
        z.writestr("__init__.py", "")
    with pytest.raises(build.BuildError, match="validate"):
        build.validate(bad)


def test_missing_blender_binary_fails_with_clear_message(tmp_path):
    with pytest.raises(build.BuildError, match="--blender"):
        build.validate(tmp_path / "x.zip", blender=str(tmp_path / "no-such-blender"))


def test_install_enable_uninstall(extension_zip, temp_repo):
    repo_dir = Path(temp_repo.directory)
    result = bpy.ops.extensions.package_install_files(filepath=str(extension_zip), repo=temp_repo.module,
                                                      enable_on_install=True)
    assert result == {'FINISHED'}
    module_name = f"bl_ext.{temp_repo.module}.{PACKAGE_ID}"
    try:
        assert module_name in sys.modules
        assert module_name in bpy.context.preferences.addons
        mod = sys.modules[module_name]
        # The bundled dp3d_core is used, not the source tree's.
        assert Path(mod.core.CORE_PARENT).resolve() == (repo_dir / PACKAGE_ID).resolve()
        assert mod.core.cameras.__name__ == f"{module_name}.dp3d_core.cameras"
        classes = mod.classes
        assert classes and all(cls.is_registered for cls in classes)
        panels = [cls for cls in classes if issubclass(cls, bpy.types.Panel)]
        assert panels and all(p.bl_category == "Portrait 3D" and p.bl_space_type == 'VIEW_3D' for p in panels)
        assert hasattr(bpy.types.Scene, "portrait3d")
        assert bpy.context.scene.portrait3d.size_mode == 'MODEL'  # the model's own resolution by default
        assert mod.cli.is_registered()
        assert bpy.ops.portrait3d.generate.poll() and not bpy.ops.portrait3d.cancel.poll()
        assert hasattr(bpy.context.window_manager, "portrait3d_progress")
        # User data goes to the extension's user folder, never into the add-on folder.
        user_dir = mod.preferences.user_data_dir()
        assert user_dir.is_dir() and not user_dir.resolve().is_relative_to((repo_dir / PACKAGE_ID).resolve())
        assert mod.preferences.models_dir() == user_dir / "models"
        assert bpy.context.preferences.addons[module_name].preferences.bl_rna.identifier == \
            "PORTRAIT3D_AP_preferences"
        assert "torch" not in sys.modules
    finally:
        assert bpy.ops.extensions.package_uninstall(repo_directory=str(repo_dir), pkg_id=PACKAGE_ID) == {'FINISHED'}
    assert module_name not in bpy.context.preferences.addons
    assert module_name not in sys.modules
    assert not any(cls.is_registered for cls in classes)
    assert not hasattr(bpy.types.Scene, "portrait3d")
    assert not mod.cli.is_registered()
    assert not (repo_dir / PACKAGE_ID).exists()
