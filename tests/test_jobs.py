"""Jobs as `ray job submit … -- python -m jobs.<verb>` against the shared cluster (token auth on):
eval and analyze read a run, a failing job is FAILED with one readable line, a job asking for
resources the cluster lacks fails at once, and `serve deploy serve/config.yaml` serves a run.
The train, embed and tune jobs are submitted to the multi-node cluster (tests/test_multinode.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from conftest import BIN, ROOT, free_port, submit_job
from ray.job_submission import JobStatus, JobSubmissionClient

from cube.data.rundir import RunDir

pytestmark = pytest.mark.ray


submit = submit_job


@pytest.fixture(scope="module")
def job_env(isolated_cache):
    return {"CUBE_CACHE": str(isolated_cache)}  # the session's embedding cache: no re-embedding


@pytest.fixture(scope="module")
def job_run(smoke_run):
    """The suite's shared run: a submitted training job is tested on the multi-node cluster
    (tests/test_multinode.py), and these jobs only read a run."""
    return smoke_run[0]


def test_eval_and_analyze_jobs_on_a_run(ray_cluster, job_env, job_run):
    proc = submit(ray_cluster, job_env, "jobs.eval", "--run", str(job_run), "--json", "--baselines", "identity")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pool = len(set(RunDir(job_run).split().table("test", ["answer"]).column("answer").to_pylist()))
    assert f'"pool_size": {pool}' in proc.stdout
    proc = submit(ray_cluster, job_env, "jobs.analyze", "--run", str(job_run), "--damage-trials", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (job_run / "analysis" / "report.md").is_file()


FAILING = [  # (a job's entrypoint, what its last log line must say)
    (["jobs.train", "--data", "no/such/file.jsonl", "--output", "/tmp/cube-never"], "no/such/file.jsonl: no such file"),
    (["jobs.eval", "--run", "/tmp/cube-not-a-run"], "is not a finished cube run"),
    (["jobs.train", "--data", "data/qa.jsonl", "--output", "/tmp/cube-never", "--set", "optim.epochs=zero"],
     "optim.epochs"),
    (["jobs.train", "--data", "data/qa.jsonl", "--output", "/tmp/cube-never", "--set", "placement=DIAGONAL"],
     "placement must be PACK or SPREAD"),
    (["jobs.eval", "--run", "nosuchscheme://bucket/run"], "cannot open storage URI"),
]


def test_a_failing_job_is_failed_with_one_readable_line(ray_cluster, job_env):
    """Each job is FAILED, its last log line says what went wrong, and it fails within two
    minutes. The five `ray job submit` runs go at once, as jobs on a shared cluster do."""
    start = time.time()
    with ThreadPoolExecutor(len(FAILING)) as pool:
        procs = list(pool.map(lambda case: submit(ray_cluster, job_env, *case[0]), FAILING))
    client = JobSubmissionClient(ray_cluster.dashboard)
    for (entrypoint, message), proc in zip(FAILING, procs):
        assert proc.returncode != 0, entrypoint
        job_id = re.search(r"raysubmit_\w+", proc.stdout + proc.stderr).group(0)
        assert client.get_job_info(job_id).status == JobStatus.FAILED, entrypoint
        logs = client.get_job_logs(job_id)
        assert message in logs.strip().splitlines()[-1], logs[-3000:]  # the last line says what went wrong
        assert "Traceback" not in logs, logs[-3000:]
    assert time.time() - start < 120


def test_asking_for_gpus_the_cluster_lacks_fails_at_once(ray_cluster, job_run, tmp_path):
    start = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.train",
            "--data",
            "data/qa.jsonl",
            "--output",
            str(tmp_path / "g"),
            "--config",
            "configs/smoke.yaml",
            "--set",
            "use_gpu=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "training with 2 workers (and Ray Data's reader) needs 2 x {'CPU': 1.0, 'GPU': 1.0}" in proc.stderr
    assert "GPU 0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "g" / "split").exists()  # refused before the data was read
    assert time.time() - start < 60  # it does not wait for GPUs that cannot come


def test_serve_deploy_with_the_shipped_config(ray_cluster, job_run, tmp_path):
    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    config["applications"][0]["args"]["run_dir"] = str(job_run)
    config["applications"][0]["args"]["config"] = str(ROOT / "configs" / "serve_laptop.yaml")  # 4 replicas, 1 CPU
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    serve = [str(BIN / "serve")]
    # Serve keeps the HTTP options it started with: one left running on the shared cluster would
    # ignore this config's port
    subprocess.run(serve + ["shutdown", "-y", "--address", ray_cluster.dashboard], env=ray_cluster.env,
                   capture_output=True, timeout=120)
    proc = subprocess.run(serve + ["deploy", str(path), "--address", ray_cluster.dashboard], env=ray_cluster.env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    try:
        deadline = time.time() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not up yet, or still loading the model
                pass
            if time.time() > deadline:
                status = subprocess.run(serve + ["status", "--address", ray_cluster.dashboard], env=ray_cluster.env,
                                        capture_output=True, text=True, timeout=60)
                raise AssertionError(f"the deployed app never became healthy:\n{status.stdout}{status.stderr}")
            time.sleep(1)
        r = requests.post(f"http://127.0.0.1:{port}/v1/answer", json={"question": "Why is the sky blue?"}, timeout=60)
        assert r.status_code == 200 and r.json()["answer"]
    finally:
        subprocess.run(serve + ["shutdown", "-y", "--address", ray_cluster.dashboard], env=ray_cluster.env,
                       capture_output=True, timeout=120)
