"""The first ten minutes: `cube demo` prints a short, readable report and nothing of Ray's."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_demo_console_is_short_and_free_of_warnings(demo):
    """`cube demo` on the sample with the smoke config (conftest's shared run)."""
    out, _, proc = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the lines a terminal shows: a progress bar redraws its line with \r
    console = [line.rsplit("\r", 1)[-1] for line in (proc.stdout + proc.stderr).rstrip("\n").split("\n")]
    assert len(console) <= 60, "\n".join(console)
    noise = [line for line in console if "Warning" in line or "WARNING" in line or "Traceback" in line
             or "(pid=" in line or "core_worker" in line or "INFO worker.py" in line]
    assert not noise, "\n".join(noise)
    text = proc.stdout
    assert "cube demo:" in text and "candidate pool" in text and "<- best baseline" in text
    assert text.count("  Q: ") >= 6  # three held-out examples and three questions over HTTP
    assert "Three held-out questions over HTTP" in text and "ray.log" in text
    assert (out / "curves.png").is_file() and (out / "ray.log").stat().st_size > 0
