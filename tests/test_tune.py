"""Integration tier for tuning: a small real sweep (Ray Tune + Optuna + ASHA on the shared
cluster), its report, its winner's config and run folder, resume after the sweep's driver is
killed, and a diverging trial recorded as errored."""

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
from conftest import ROOT

from cube.config import load_config
from cube.job_config import TrainConfig

pytestmark = pytest.mark.ray

# depth 9 needs steps >= 8 but configs/smoke.yaml runs 4: those draws must fail and be recorded.
SPACE = """
cube.hidden: {distribution: choice, values: [8, 16]}
cube.depth:  {distribution: choice, values: [4, 9]}
optim.lr:    {distribution: loguniform, low: 1.0e-3, high: 1.0e-2}
"""


def tune_cmd(data: Path, out: Path, space: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.tune", "--data", str(data), "--space", str(space), "--output", str(out),
            "--config", "configs/smoke.yaml", *extra]


@pytest.fixture(scope="module")
def sweep(ray_cluster, qa_sample, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    space = tmp / "space.yaml"
    space.write_text(SPACE)
    out = tmp / "sweep"
    proc = subprocess.run(tune_cmd(qa_sample, out, space, "--trials", "4", "--search", "random", "--seed", "1",
                                   "--robustness-seeds", "2", "--set", "optim.epochs=3"),
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_sweep_records_every_trial_with_its_status_and_writes_the_report(sweep):
    out, proc = sweep
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4
    errored = table[table["status"] == "errored"]
    assert len(errored) >= 1 and errored["error"].str.contains("would never reach the back face").all()
    done = table[table["status"] != "errored"]
    assert len(done) >= 1 and (done["val_mrr"] > 0.3).all() and (done["params"] > 0).all()  # chance is ~0.1
    assert (done["latency_ms"] > 0).all() and (done["best_epoch"] <= done["epochs_run"]).all()
    assert table["val_mrr"].dropna().is_monotonic_decreasing  # sorted by validation MRR
    for name in ("results.md", "pareto.png", "importance.png", "history.png", "robustness.json"):
        assert (out / name).stat().st_size > 100, name
    robust = json.loads((out / "robustness.json").read_text())
    assert (
        robust["seeds"] == 2
        and len(robust["cube_test_mrr"]) == 2
        and robust["best_baseline"] in robust["baselines_test"]
    )
    assert "best trial" in proc.stdout and "robustness (2 seeds" in proc.stdout


def test_best_config_is_what_the_best_trial_trained(sweep):
    """best_config.yaml (what `cube train --config` takes: the same loader) is the config the best
    trial's run folder was trained with, and the results table's best row."""
    out, _ = sweep
    table = pd.read_csv(out / "results.csv")
    best = load_config(TrainConfig, out / "best_config.yaml")
    assert best.cube.hidden == table.loc[0, "cube.hidden"] and best.cube.depth == 4
    assert abs(best.optim.lr - table.loc[0, "optim.lr"]) < 1e-12
    trained = load_config(TrainConfig, out / "best" / "config.yaml")
    assert best.cube == trained.cube and best.optim == trained.optim and best.loss == trained.loss


def test_the_best_trials_run_folder_is_a_complete_run(sweep):
    out, _ = sweep
    proc = subprocess.run([sys.executable, "-m", "jobs.eval", "--run", str(out / "best"), "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    table = pd.read_csv(out / "results.csv")
    assert (
        abs(json.loads((out / "best" / "model" / "config.json").read_text())["val"]["mrr"] - table.loc[0, "val_mrr"])
        < 1e-6
    )
    assert report["cube"]["mrr"] > report["chance"]["mrr"] + 0.5


def finished_trials(out: Path, epochs: int = 3) -> dict[str, str]:
    """trial folder → its result.json, for trials that reported all their epochs (Tune 2.60 never
    writes a final `done: true` row for a function trainable)."""
    found = {}
    for result in (out / "ray" / "sweep").glob("*/result.json"):
        text = result.read_text()
        if len(text.splitlines()) >= epochs:
            found[result.parent.name] = text
    return found


def test_resume_after_the_sweep_driver_is_killed(ray_cluster, qa_sample, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("cube.hidden: {distribution: choice, values: [8, 16]}\n")
    out = tmp_path / "sweep"
    cmd = tune_cmd(
        qa_sample,
        out,
        space,
        "--trials",
        "3",
        "--max-concurrent",
        "1",
        "--robustness-seeds",
        "0",
        "--scheduler",
        "fifo",
        "--set",
        "optim.epochs=3",
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not finished_trials(out):
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = finished_trials(out)
    assert not (out / "results.csv").exists()

    resume = subprocess.run([sys.executable, "-m", "jobs.tune", "--resume", str(out)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert resume.returncode == 0, resume.stderr[-3000:]
    after = finished_trials(out)
    assert len(after) == 3
    assert {k: after[k] for k in before} == before  # a finished trial was not trained again
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 3 and (table["status"] == "finished").all() and (table["epochs_run"] == 3).all()


def test_a_diverging_trial_is_recorded_as_errored_with_its_reason(ray_cluster, qa_sample, tmp_path):
    """A trial at an absurd learning rate stops with its DivergenceError: the sweep records it as
    errored, with the reason, and (no trial left with a result) says so in one line."""
    space = tmp_path / "space.yaml"
    space.write_text("optim.lr: {distribution: choice, values: [1000000.0]}\n")
    out = tmp_path / "sweep"
    proc = subprocess.run(tune_cmd(qa_sample, out, space, "--trials", "1", "--robustness-seeds", "0", "--scheduler",
                                   "fifo", "--set", "optim.epochs=1", "--set", "optim.max_lr=1000000",
                                   "--set", "optim.grad_clip=0", "--set", "workers=1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and "no trial of the sweep reported a result" in proc.stderr, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert table["status"].tolist() == ["errored"]
    assert "DivergenceError" in table["error"].iloc[0] and "diverged at epoch 1" in table["error"].iloc[0]
