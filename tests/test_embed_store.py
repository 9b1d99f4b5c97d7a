"""Integration tier for the teachers issue: `cube embed` end to end on the shared Ray cluster,
kill-and-resume of the embedding store, teacher-written answers, and training on SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from conftest import ROOT

from cube.data import store
from cube.data.qa import SHIPPED_DATASET, load_qa, text_hash

pytestmark = pytest.mark.ray


def cube_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", *args]


def test_kill_mid_run_then_resume_embeds_only_the_rest(ray_cluster, tmp_path):
    df = load_qa(SHIPPED_DATASET).iloc[:400]  # 800 texts: enough to interrupt at batch 16, quick to finish
    rows = [{"question": f"{q} (v)", "answer": f"{a} (v)"} for q, a in zip(df["question"], df["answer"])]
    data = tmp_path / "big.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "store"
    expected = set(text_hash([r[c] for r in rows for c in ("question", "answer")]).tolist())
    proc = subprocess.Popen(cube_cmd("embed", str(data), "--output", str(out), "--batch-size", "16"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while len(store.parts(out)) < 3:
        assert proc.poll() is None, "embedding finished before it could be interrupted; use more rows"
        assert time.time() < deadline, "no parts appeared"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # The embedded cluster's teacher actor outlives its driver by a moment, and may finish the
    # part it was writing: read the store once it has stopped changing.
    parts, steady = store.parts(out), time.time()
    while time.time() - steady < 3:
        time.sleep(0.5)
        if (now := store.parts(out)) != parts:
            parts, steady = now, time.time()
    done = set(store.keys(out).tolist())
    assert 0 < len(done) < len(expected)
    before = {p: p.stat().st_mtime_ns for p in store.parts(out)}

    result = subprocess.run(cube_cmd("embed", str(data), "--output", str(out), "--batch-size", "64"), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = store.read_all(out, columns=["key"]).column("key").to_pylist()
    assert set(keys) == expected and len(keys) == len(expected)  # complete, nothing embedded twice
    assert f"({len(expected) - len(done)} embedded now)" in result.stdout
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())  # finished parts untouched


def test_generate_answers_for_a_question_only_file(ray_cluster, tmp_path):
    out = tmp_path / "gen"
    result = subprocess.run(
        cube_cmd("embed", "tests/data/questions.jsonl", "--output", str(out), "--generate-answers",
                 "--generator", "smollm2", "--set", "generator.max_new_tokens=40"),
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    qa = pq.read_table(out / "qa.parquet").to_pandas()
    assert len(qa) == 3 and set(qa["generator"]) == {"smollm2"}
    paris = qa[qa["question"].str.contains("France")]["answer"].iloc[0]
    assert "paris" in paris.lower(), paris
    assert (qa["answer"].str.len() > 10).all()
    keys = set(store.keys(out).tolist())
    assert set(text_hash(qa["question"]).tolist()) | set(text_hash(qa["answer"]).tolist()) == keys


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"question": "ok?", "answer": "fine."}) + "\n" + json.dumps({"question": "", "answer": "x"}) + "\n"
    )
    out = tmp_path / "never"
    for args, message in [((str(bad),), "row 2 column 'question' is empty"),
                          (("tests/data/tiny.jsonl", "--teacher", "no-org/no-model"), "Nothing is downloaded"),
                          ((str(tmp_path / "missing.csv"),), "no such file")]:
        result = subprocess.run(cube_cmd("embed", *args, "--output", str(out)), cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-2000:])
        assert not out.exists() or not store.parts(out)


def test_train_end_to_end_with_smollm2(ray_cluster, tmp_path):
    from cube.config import load_config
    from cube.job_config import TrainConfig
    from jobs.trainer import train

    small = tmp_path / "small.jsonl"
    load_qa(SHIPPED_DATASET).iloc[::16][["question", "answer", "topic"]].to_json(small, orient="records", lines=True)
    cfg = load_config(
        TrainConfig,
        ROOT / "configs" / "smoke.yaml",
        ["teacher=smollm2", "optim.batch_size=16", "optim.epochs=1", "workers=1", "baselines=mean_answer"],
    )
    report = train(small, tmp_path / "run", cfg)
    assert report["teacher"]["name"] == "smollm2"
    assert report["cube"]["mrr"] > report["baselines"]["mean_answer"]["mrr"]
    assert json.loads((tmp_path / "run" / "model" / "config.json").read_text())["embed_dim"] == 576
