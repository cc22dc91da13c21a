"""The converter's progress callback (what the add-on's progress bar and ETA read): phases in order, bytes counting
up to the size of the written weights."""
from __future__ import annotations

from dp3d_core.convert import convert_checkpoint

from tests.conftest import PARITY_FIXTURE as FIXTURE


def test_progress_reports_read_convert_and_write_bytes(tmp_path):
    events: list[tuple[str, int, int]] = []
    out = tmp_path / "model"
    convert_checkpoint(FIXTURE / "parity_state_dict.safetensors", out, config=FIXTURE / "parity_config.json",
                       progress=lambda phase, done, total: events.append((phase, done, total)))
    phases = [e[0] for e in events]
    assert phases[0] == "read" and phases.index("convert") < phases.index("write") and phases[-1] == "write"
    size = (FIXTURE / "parity_state_dict.safetensors").stat().st_size
    assert ("read", size, size) in events
    writes = [(done, total) for phase, done, total in events if phase == "write"]
    assert writes[0][0] == 0 and writes[-1][0] == writes[-1][1] > 0
    assert all(a[0] <= b[0] for a, b in zip(writes, writes[1:])) and len({d for d, _ in writes}) >= 4
    weights = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    assert 0.95 * weights <= writes[-1][1] <= weights  # tensor bytes; the files add small headers
