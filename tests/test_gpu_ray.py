"""The GPU-under-Ray script (bench/gpu_ray.py) run here on the CPU, so that it cannot rot before a
GPU machine is lent: every section on the shared Ray cluster, tiny settings, real outcomes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, free_port

pytestmark = pytest.mark.ray


def test_the_gpu_script_runs_every_section_on_the_cpu(ray_cluster, sample_with_vectors, tmp_path):
    data = sample_with_vectors
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_ray", "--data", str(data), "--device", "cpu", "--quick",
                           "--epochs", "2", "--trials", "1", "--requests", "24", "--port", str(free_port()),
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert set(result) == {"env", "train", "ingest", "tune", "serve", "precision"}
    errors = {k: v["error"] for k, v in result.items() if "error" in v}
    assert not errors, errors
    train = result["train"]
    assert train["epochs"] == 2 and train["samples_per_s_ray"] > 0 and train["samples_per_s_without_ray"] > 0
    assert train["resume"] == "skipped in --quick"  # a driver killed and resumed: tests/test_training_ray.py
    # 4,000 rows time Ray Data's start-up, not its throughput: the ratio's target (0.9) is
    # bench/stream_throughput's, at 100k rows; here both paths must have trained on the rows
    ingest = result["ingest"]
    assert ingest["rows"] == 4_000 and ingest["stream_samples_per_s"] > 0 and ingest["memory_samples_per_s"] > 0
    tune = result["tune"]
    assert tune["packed"]["returncode"] == 0 and not tune["packed"]["errored"]  # "whole" needs a GPU to differ
    for placement in (result["serve"][name] for name in ("cpu", "gpu") if name in result["serve"]):
        assert [level["clients"] for level in placement] == [1, 32]
        assert all(np.isfinite(level["p50_ms"]) and level["p99_ms"] >= level["p50_ms"] for level in placement)
        assert max(int(size) for size in placement[1]["batch_sizes"]) > 1  # 32 clients make batches
    assert set(result["precision"]) == {"bf16", "section_seconds"}  # in --quick, the train section's run,
    assert train["precision"] == "bf16"  # trained in bf16 through Ray Train
    assert all(0 < v["val_mrr"] <= 1 for k, v in result["precision"].items() if k != "section_seconds")
