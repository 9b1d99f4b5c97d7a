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
    assert metrics["epoch"].tolist() == [1, 2, 3]  # every epoch once, none skipped
    resumed = metrics[metrics["resumed_from"] > 0]
    assert len(resumed), "the run never restarted from a checkpoint"
    # at most one epoch lost: the restart picked up from the last epoch finished before the kill
    assert resumed["resumed_from"].min() >= interrupted_after
    report = json.loads((run / "eval.json").read_text())
    assert abs(report["cube"]["mrr"] - undisturbed["cube"]["mrr"]) < 0.05


def test_resume_after_the_driver_is_killed(ray_cluster, qa_sample, tmp_path, undisturbed):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--data", str(qa_sample), "--output", str(run),
           "--config", "configs/smoke.yaml", *[a for o in OVERRIDES for a in ("--set", o)],
           "--set", "baselines=mean_answer"]  # the cube's MRR is compared; the MLPs' fits would only cost time
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    done = wait_for_epoch(run, 1, alive=lambda: proc.poll() is None)
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
    assert pd.read_csv(run / "metrics.csv")["epoch"].tolist() == [1, 2, 3]


def test_an_absurd_learning_rate_stops_with_one_line_and_claims_nothing(ray_cluster, qa_sample, tmp_path):
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--data", str(qa_sample), "--output", str(tmp_path / "run"),
           "--config", "configs/smoke.yaml", "--set", "optim.lr=1000000", "--set", "optim.max_lr=1000000",
           "--set", "optim.grad_clip=0", "--set", "max_failures=0", "--set", "workers=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged at epoch") and "Lower optim.lr" in last, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "beats" not in proc.stdout
    logged = last.split("(traceback in ")[1].rstrip(")")
    assert "DivergenceError" in open(logged).read()  # the whole story is in the log
    assert not (tmp_path / "run" / "eval.json").exists() and not (tmp_path / "run" / "model").exists()


def test_bring_your_own_embeddings_round_trip_with_the_lattice_off_under_ddp(ray_cluster, sample_with_vectors,
                                                                             tmp_path, caplog):
    """A Parquet file that carries its vectors trains without any teacher embedding it; the
    teacher named in the config then embeds new questions for `cube eval --data`, and one whose
    dimension does not match is a clear error. The run also saves an IVF index beside its bank
    (bank_index.kind=ivf), which a served copy loads instead of building its own.

    The same run (one Ray Train start for both) is the lattice-off ablation with skip, on two
    gloo workers: the frozen rule and back-face decoder get no gradient, and DDP must not wait
    for one. They end exactly as they were built, while the direct path trained."""
    import logging

    import pyarrow.parquet as pq
    import torch

    from cube.config import load_config
    from cube.data.rundir import RunDir
    from cube.data.split import vectors
    from cube.job_config import TrainConfig
    from cube.train.checkpoint import load_checkpoint
    from cube.train.loop import build_model
    from jobs.eval import held_out_file
    from jobs.trainer import train

    q = vectors(pq.read_table(sample_with_vectors, columns=["question_embedding"]).column(0))
    cfg = load_config(TrainConfig, ROOT / "configs" / "smoke.yaml",
                      ["optim.epochs=2", "workers=2", "bank_index.kind=ivf", "baselines=mean_answer",
                       "cube.lattice=false", "cube.skip=true"])
    report = train(sample_with_vectors, tmp_path / "run", cfg)
    assert report["cube"]["nonfinite"] == 0
    assert report["cube"]["mrr"] > report["baselines"]["mean_answer"]["mrr"] + 0.3
    model, _ = load_checkpoint(tmp_path / "run" / "model")
    fresh = build_model(cfg.cube, model.q_mean, model.a_mean, seed=cfg.seed)
    frozen = {f"rule.{k}": v for k, v in fresh.rule.state_dict().items()} | {
        f"decoder.{k}": v for k, v in fresh.decoder.state_dict().items()}
    for name, value in frozen.items():
        assert torch.equal(model.state_dict()[name], value), name
    assert not torch.equal(model.skip.weight, fresh.skip.weight)  # while the direct path trained

    from cube.data.bank import SearchConfig
    from serve.pipeline import LoadedRun

    with caplog.at_level(logging.WARNING, logger="cube.bank"):
        served = LoadedRun(tmp_path / "run", search=SearchConfig(kind="ivf"))
    assert served.bank.index is not None and "building an IVF index" not in caplog.text, caplog.text
    exact = LoadedRun(tmp_path / "run")  # the probes (32) cover the sample bank's 12 lists: the same answers
    texts = lambda run: [[a["answer"] for a in r["answers"]] for r in run.answer(q[:8], [3] * 8)]  # noqa: E731
    assert texts(served) == texts(exact)
    tiny = held_out_file(RunDir(tmp_path / "run"), ROOT / "tests" / "data" / "tiny.jsonl")
    assert tiny.q.shape[1] == 384

    # a run whose brought vectors are 8-D: the named teacher (MiniLM, 384-D) cannot serve it
    run8 = RunDir(tmp_path / "run8")
    run8.path.mkdir()
    (run8.path / "config.yaml").write_text((tmp_path / "run" / "config.yaml").read_text())
    teacher8 = json.loads((tmp_path / "run" / "teacher.json").read_text())
    (run8.path / "teacher.json").write_text(json.dumps({**teacher8, "dim": 8}))
    with pytest.raises(Exception, match="makes 384-D vectors, but run .* was trained on 8-D ones"):
        held_out_file(run8, ROOT / "tests" / "data" / "tiny.jsonl")
