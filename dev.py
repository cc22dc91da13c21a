#!/usr/bin/env python3
"""The project's two entry points: ``python3 dev.py demo`` and ``python3 dev.py test``.

Both create (or reuse) the virtual environment ``.venv`` with everything in
requirements.txt, so they work on a fresh machine with only Python 3.11.
Plain Python on purpose: the same commands work on Linux, macOS and Windows.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_NODEPS = ROOT / "requirements-nodeps.txt"  # packages installed without their dependencies
STAMP = VENV / ".requirements.sha256"
TEST_SUITES = ("tests", "blender_tests")


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def ensure_environment() -> Path:
    """Create .venv and install requirements.txt; a no-op when nothing changed."""
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"dev.py needs Python 3.11 (bpy 5.0.1 is built for it); this is {sys.version.split()[0]}.")
    wanted = hashlib.sha256(REQUIREMENTS.read_bytes() + REQUIREMENTS_NODEPS.read_bytes()).hexdigest()
    python = venv_python()
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == wanted:
        return python
    if not python.exists():
        print(f"[dev] creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("[dev] installing requirements.txt (first run only; bpy and torch are large)", flush=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                    "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps",
                    "-r", str(REQUIREMENTS_NODEPS)], check=True)
    STAMP.write_text(wanted)
    return python


def run_demo(args: argparse.Namespace) -> int:
    python = ensure_environment()
    out = args.out or str(ROOT / "output" / ("demo360" if args.full_turn else "demo"))
    cmd = [str(python), str(ROOT / "scripts" / "demo.py"), "--out", str(Path(out).resolve())]
    if args.full_turn:
        cmd.append("--360")
    return subprocess.run(cmd, cwd=ROOT).returncode


def _junit_counts(path: Path) -> tuple[int, int, int]:
    """(passed, failed, skipped) from a pytest junit-xml report."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = failed = skipped = 0
    for s in suites:
        total += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return total - failed - skipped, failed, skipped


def run_tests(args: argparse.Namespace) -> int:
    python = ensure_environment()
    reports = ROOT / "build" / "test-reports"
    reports.mkdir(parents=True, exist_ok=True)
    passed = failed = skipped = 0
    worst = 0
    # Each suite runs in its own process: blender_tests load the bpy module in-process,
    # and keeping it apart from the torch tests keeps either from masking the other.
    for suite in TEST_SUITES:
        report = reports / f"{suite}.xml"
        report.unlink(missing_ok=True)
        cmd = [str(python), "-m", "pytest", "-p", "no:pytest-blender", "-p", "no:cacheprovider",
               suite, f"--junitxml={report}", *args.pytest_args]
        print(f"[dev] {' '.join(cmd[2:])}", flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if report.exists():
            p, f, s = _junit_counts(report)
            passed, failed, skipped = passed + p, failed + f, skipped + s
        if rc not in (0, 5):  # 5: pytest collected nothing (e.g. a -k filter)
            worst = worst or rc or 1
    summary = f"{passed} passed, {failed} failed"
    if skipped:
        summary += f", {skipped} skipped"
    print(summary, flush=True)
    return 1 if (worst or failed) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="set up, build the extension and run the demo job in Blender (bpy)")
    demo.add_argument("--out", help="output folder (default: output/demo, with --360 output/demo360)")
    demo.add_argument("--360", dest="full_turn", action="store_true",
                      help="a DiffPortrait360 turntable all around the head (models/small360, with its back view)")
    demo.set_defaults(func=run_demo)
    test = sub.add_parser("test", help="set up and run every test suite (tests/ and blender_tests/)")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra arguments passed to pytest")
    test.set_defaults(func=run_tests)
    setup = sub.add_parser("setup", help="only create or update .venv")
    setup.set_defaults(func=lambda a: (ensure_environment(), 0)[1])
    # argparse's REMAINDER does not take arguments that start with '-' (such as `-k cameras`) right after the
    # subcommand; the test command passes whatever argparse leaves to pytest
    args, extra = parser.parse_known_args()
    if extra and args.command != "test":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.pytest_args = extra + args.pytest_args
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
