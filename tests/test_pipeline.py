"""Integration tier: the real pipeline on the shared Ray cluster, with the real MiniLM teacher.

Embedding (Ray Data) → training (2-worker Ray Train, gloo) → `cube eval --json` → `cube analyze`.
The trained run is the suite's shared one (conftest's `demo`); serving it is tests/test_serve.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, assert_shards_cover_the_training_split

from cube.data import store
from cube.data.qa import text_hash
from cube.data.rundir import RunDir
from cube.teachers import HFTeacher, TeacherConfig

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def trained_run(smoke_run):
    return smoke_run


def test_embedding_stage_writes_a_resumable_parquet_store(ray_cluster, tmp_path):
    from cube.job_config import PipelineOptions
    from jobs.embedding import embed_texts

    texts = pd.read_json(ROOT / "tests" / "data" / "tiny.jsonl", lines=True)["question"].tolist()
    teacher = TeacherConfig()
    folder = embed_texts(texts[:5], teacher, PipelineOptions(batch_size=2), tmp_path / "store")
    assert store.keys(folder).tolist() == sorted(text_hash(texts[:5]).tolist())
    first_parts = set(store.parts(folder))
    embed_texts(texts, teacher, PipelineOptions(batch_size=2), folder)  # 3 new texts only
    assert first_parts < set(store.parts(folder))
    table = store.read_all(folder)
    assert table.num_rows == len(texts)  # nothing embedded twice
    assert json.loads(table.schema.metadata[store.TEACHER_KEY]) == teacher.identity()
    # the vectors are the teacher's own: same as embedding in this process
    got = store.vectors_for(folder, [texts[0]])[0]
    np.testing.assert_allclose(got, HFTeacher(teacher).embed([texts[0]]).vectors[0], atol=1e-5)


def test_training_beats_mean_answer_and_loss_falls(trained_run):
    run, report = trained_run
    cube, mean = report["cube"]["mrr"], report["baselines"]["mean_answer"]["mrr"]
    assert cube > mean + 0.3, (cube, mean)
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3]
    assert metrics["loss_total"].iloc[-1] < metrics["loss_total"].iloc[0]
    per_epoch = {"loss_dialogue", "loss_surface", "loss_internal", "grad_norm", "samples_per_s", "peak_memory_mb",
                 "train_cos", "train_recall_at_1", "train_mrr", "val_cos", "val_recall_at_1", "val_mrr"}
    assert per_epoch <= set(metrics.columns), per_epoch - set(metrics.columns)
    assert metrics[sorted(per_epoch)].notna().all().all()
    assert any((run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("model/model.safetensors", "model/config.json", "last/config.json", "split.json", "bank.json",
                 "config.yaml", "eval.json", "curves.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "model" / "config.json").read_text())["teacher"]["name"] == "minilm"
    assert_shards_cover_the_training_split(run, metrics)


def test_eval_json_shape(trained_run):
    """The run's eval.json (written at the end of training) has every metric for the cube and each
    baseline; `cube eval --json --baselines` re-scores the cube exactly and fits only those asked."""
    run, written = trained_run
    keys = {"cos", "recall@1", "recall@5", "mrr", "nonfinite"}
    assert written["pool_size"] == written["n_questions"] > 40
    assert set(written["cube"]) == keys and written["cube"]["nonfinite"] == 0
    assert {"identity", "mean_answer", "ridge", "mlp"} <= set(written["baselines"])
    assert all(keys <= set(m) for m in written["baselines"].values())
    assert "mrr_std" in written["baselines"]["mlp_centred"]  # stochastic: the mean over seeds
    assert len(written["examples"]) == 5
    out = subprocess.run([sys.executable, "-m", "jobs.eval", "--run", str(run), "--json", "--baselines", "ridge"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert set(report["baselines"]) == {"ridge", "ridge_centred"}
    assert report["cube"] == pytest.approx(written["cube"]) and report["examples"] == written["examples"]
    assert report["baselines"]["ridge"]["mrr"] == pytest.approx(written["baselines"]["ridge"]["mrr"])
    bad = subprocess.run([sys.executable, "-m", "jobs.eval", "--run", str(run), "--baselines", "ridge,lasso"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "'lasso'" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-2000:]


def test_eval_on_another_file_uses_every_row(trained_run):
    from cube.eval.report import evaluate_run
    from jobs.eval import held_out_file

    run, _ = trained_run
    report = evaluate_run(run, held_out_file(RunDir(run), ROOT / "tests" / "data" / "tiny.jsonl"), baselines="identity")
    assert report["pool_size"] == 8 and report["cube"]["mrr"] > report["chance"]["mrr"]


def test_analyze_writes_a_report_with_figures(trained_run):
    run, _ = trained_run
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "analyze", "--run", str(run), "--damage-trials", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    report = (run / "analysis" / "report.md").read_text()
    for figure in ("activity.png", "morans_i.png", "variance.png", "clusters.png", "layer_ablation.png"):
        assert (run / "analysis" / figure).stat().st_size > 1000 and f"({figure})" in report
    numbers = json.loads((run / "analysis" / "analysis.json").read_text())
    assert len(numbers["layer_ablation"]) == 4  # configs/smoke.yaml: depth 4
    assert set(numbers["stability"]) == {"T", "2T", "4T"} and numbers["damage"]["trials"] == 3


@pytest.mark.parametrize("command", ["eval", "analyze"])
def test_a_folder_that_is_not_a_run_is_a_clear_error(command, tmp_path):
    out = subprocess.run([sys.executable, "-m", "jobs.cli", command, "--run", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "is not a finished cube run" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]
