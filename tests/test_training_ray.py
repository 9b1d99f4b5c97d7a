"""Integration tier for training at full strength: resume after the driver dies, on the shared
Ray cluster with 2 gloo workers. (Recovery when a worker's node is lost is in test_multinode.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, SMOKE_OVERRIDES

pytestmark = pytest.mark.ray
OVERRIDES = SMOKE_OVERRIDES  # the same run as the shared undisturbed `smoke_run`


def epochs_done(run: Path) -> int:
    path = run / "metrics.csv"
    return int(pd.read_csv(path)["epoch"].max()) if path.is_file() else 0


def wait_for_epoch(run: Path, epoch: int, alive=lambda: True, timeout: float = 600) -> int:
    deadline = time.time() + timeout
    while (done := epochs_done(run)) < epoch:
        assert alive(), "training ended before it could be interrupted"
        assert time.time() < deadline, f"epoch {epoch} never finished"
        time.sleep(0.2)
    return done


@pytest.fixture(scope="module")
def undisturbed(smoke_run):
    return smoke_run[1]


def check_complete(run: Path, interrupted_after: int, undisturbed: dict) -> None:
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3, 4]  # every epoch once, none skipped
    resumed = metrics[metrics["resumed_from"] > 0]
    assert len(resumed), "the run never restarted from a checkpoint"
    # at most one epoch lost: the restart picked up from the last epoch finished before the kill
    assert resumed["resumed_from"].min() >= interrupted_after
    report = json.loads((run / "eval.json").read_text())
    assert abs(report["cube"]["mrr"] - undisturbed["cube"]["mrr"]) < 0.05


def test_resume_after_the_driver_is_killed(ray_cluster, qa_sample, tmp_path, undisturbed):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--data", str(qa_sample), "--output", str(run),
           "--config", "configs/smoke.yaml", *[a for o in OVERRIDES for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = wait_for_epoch(run, 2, alive=lambda: proc.poll() is None)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "eval.json").exists()

    resume = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--resume", str(run)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, resume.stderr[-3000:]
    check_complete(run, done, undisturbed)

    again = subprocess.run([sys.executable, "-m", "jobs.cli", "train", "--resume", str(run)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stderr
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3, 4]
