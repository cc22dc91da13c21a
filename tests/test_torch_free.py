"""The modules Blender imports must load with numpy alone: torch and diffusers blocked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE = ("dp3d_core.cameras", "dp3d_core.job", "dp3d_core.protocol", "dp3d_core.families",
              "dp3d_core.preflight", "dp3d_core.failures", "dp3d_core.face_pose", "dp3d_core.denoise_state")

PROBE = """
import json, sys
sys.modules['torch'] = None        # any 'import torch' now raises ImportError
sys.modules['diffusers'] = None
import importlib
importlib.import_module(sys.argv[1])
heavy = sorted(name for name, mod in sys.modules.items()
               if mod is not None and name.split('.')[0] in ('torch', 'diffusers', 'torchvision', 'transformers'))
print(json.dumps(heavy))
"""


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module):
    proc = subprocess.run([sys.executable, "-c", PROBE, module], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{module} failed to import with torch blocked:\n{proc.stderr[-3000:]}"
    heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    assert heavy == [], f"{module} pulled in {heavy}"


def test_probe_detects_a_torch_import():
    # Guards the probe itself: a module that imports torch must fail under it.
    proc = subprocess.run([sys.executable, "-c", PROBE, "torch.nn"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "torch" in proc.stderr and "Error" in proc.stderr
