"""Small helpers for the Blender-side tests."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import bpy


@dataclass
class ReportRecorder:
    """Stands in for an operator instance so ``execute`` can be called directly and its reports read."""

    reports: list[tuple[str, str]] = field(default_factory=list)

    def report(self, kinds, message: str) -> None:
        for kind in kinds:
            self.reports.append((kind, message))

    def messages(self, kind: str) -> list[str]:
        return [m for k, m in self.reports if k == kind]


def run_execute(op_cls, context=None, **props) -> tuple[set[str], ReportRecorder]:
    """Call an operator class's ``execute`` with a report recorder: (result set, recorder)."""
    recorder = ReportRecorder()
    for name, value in props.items():
        setattr(recorder, name, value)
    result = op_cls.execute(recorder, context or bpy.context)
    return set(result), recorder


def op_error(op, **props) -> str:
    """Run ``bpy.ops`` expecting a reported error; return Blender's message (it raises RuntimeError)."""
    try:
        op(**props)
    except RuntimeError as exc:
        return str(exc)
    raise AssertionError(f"{op.idname_py()} did not report an error")


def wrap_deg(angle: float) -> float:
    """Angle in degrees wrapped into [-180, 180)."""
    return (angle + 180.0) % 360.0 - 180.0
