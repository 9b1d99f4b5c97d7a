"""Jobs on a real multi-node cluster: `cube cluster up` starts a head and 2 worker nodes on
loopback (1 CPU each, each its own `ray start` with its own raylet and object store), and jobs
reach it through `ray job submit` and JobSubmissionClient as they would reach a cloud cluster.

- a training job reads a Parquet dataset at a file:// URI, spreads its 2 workers over 2 nodes,
  writes its run to a file:// URI, loses a worker's node mid-run (every process of that node
  SIGKILLed) and still finishes, from its last checkpoint, with every epoch recorded once;
- an embedding job writes its store to a file:// URI;
- a sweep loses a node mid-sweep and still finishes, every trial recorded;
- `cube cluster down` stops those nodes and nothing else.

The tests run in file order: each node kill leaves one node fewer for the tests after it. A
failing job's one readable line is tested on the shared cluster (tests/test_jobs.py).
"""

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
from conftest import ROOT, Cluster, assert_shards_cover_the_training_split, free_port, submit_job
from ray.job_submission import JobStatus, JobSubmissionClient

from cube.data import store
from jobs.cluster import node_processes, port_is_free

pytestmark = pytest.mark.ray

# What the test asks the cluster, from a process of its own: this one may be the driver of the
# suite's shared cluster, and a process is the driver of one cluster only.
PROBE = """
import json, os, ray
from ray.util.state import list_actors
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: {"alive": n["Alive"], "head": "node:__internal_head__" in n["Resources"],
                       "cpus": n["Resources"].get("CPU", 0)} for n in ray.nodes()}
actors = [{"cls": a.class_name, "node": a.node_id, "pid": a.pid, "state": a.state} for a in list_actors(limit=10000)]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""
TRAIN = ["--config", "configs/smoke.yaml", "--set", "workers=2", "--set", "placement=SPREAD",
         "--set", "baselines=mean_answer"]  # the cube is what these tests compare


def cube(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


class MultiNode(Cluster):
    def __init__(self, gcs: str, dashboard: str, env: dict[str, str], state: Path) -> None:
        super().__init__(gcs, dashboard, env)
        self.state = state

    def nodes(self) -> list[dict]:
        """The nodes `cube cluster up` started: name and the pid of their `ray start`."""
        return json.loads((self.state / "cluster.json").read_text())["nodes"]

    def probe(self) -> dict:
        done = subprocess.run([sys.executable, "-c", PROBE], env={**self.env, "RAY_ADDRESS": self.address},
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    def running(self, *titles: str) -> dict[str, int]:
        """Node name → how many of its processes carry one of `titles` (Ray titles a busy
        actor's process `ray::Class.method`): read from /proc, in milliseconds, unlike a probe."""
        counts = {}
        for node in self.nodes():
            cmdlines = []
            for pid in node_processes(node["pid"]):
                try:
                    cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"))
                except OSError:
                    continue
            counts[node["name"]] = sum(any(c.startswith(f"ray::{t}") for t in titles) for c in cmdlines)
        return counts

    def kill_node(self, node: dict) -> None:
        """A node lost at once: SIGKILL to every process of it, raylet and Ray workers included."""
        for pid in node_processes(node["pid"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def client(self) -> JobSubmissionClient:
        # Ray 2.60 lets $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS, override the address given
        # here; this process has RAY_ADDRESS pointing at the suite's shared cluster.
        saved = {k: os.environ.pop(k, None) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        try:
            return JobSubmissionClient(self.dashboard)
        finally:
            os.environ.update({k: v for k, v in saved.items() if v is not None})


@pytest.fixture(scope="module")
def multinode(isolated_cache, tmp_path_factory):
    state = tmp_path_factory.mktemp("multinode")
    port, dashboard = free_port(), free_port()
    # conftest put token auth (RAY_AUTH_MODE, RAY_AUTH_TOKEN) and CUBE_CACHE in os.environ: the
    # nodes inherit them, so every node and job uses the session's embedding cache.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Two logical CPUs a node: a training worker and Ray Data's reader beside it, also once a
    # node is lost and two nodes carry the whole job.
    up = cube("cluster", "up", "--workers", "2", "--cpus-per-node", "2", "--port", str(port),
              "--dashboard-port", str(dashboard), "--state", str(state), env=env, timeout=600)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert up.stdout.strip().splitlines()[-1] == (
            f"export RAY_ADDRESS=127.0.0.1:{port} "
            f"RAY_API_SERVER_ADDRESS=http://127.0.0.1:{dashboard} RAY_AUTH_MODE=token"
        )
        yield MultiNode(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", env, state)
    finally:
        cube("cluster", "down", "--state", str(state), env=env, timeout=300)


@pytest.fixture(scope="module")
def job_env(isolated_cache) -> dict[str, str]:
    return {"CUBE_CACHE": str(isolated_cache)}


def wait_job(client: JobSubmissionClient, job_id: str, timeout: float = 900) -> JobStatus:
    deadline = time.time() + timeout
    while (status := client.get_job_status(job_id)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.time() < deadline, f"job {job_id} still {status} after {timeout:.0f} s"
        time.sleep(2)
    return status


def submit_async(cluster: MultiNode, env_vars: dict[str, str], *args: str) -> str:
    return cluster.client().submit_job(entrypoint=" ".join(["python", "-m", *args]),
                                       runtime_env={"working_dir": str(ROOT), "env_vars": env_vars})


def test_cluster_status_shows_three_nodes(multinode):
    status = cube("cluster", "status", "--state", str(multinode.state), env=multinode.env, timeout=180)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count(" running ") == 3
    alive = [n for n in multinode.probe()["nodes"].values() if n["alive"]]
    assert len(alive) == 3 and sum(n["head"] for n in alive) == 1 and [n["cpus"] for n in alive] == [2, 2, 2]


def test_train_job_from_a_parquet_uri_to_a_uri_spreads_its_workers_and_survives_losing_a_node(
        multinode, job_env, qa_sample, smoke_run, tmp_path):
    """The input is a Parquet dataset (two files) at a file:// URI, the output a file:// URI: the
    split is written there and each worker, on its own node, streams its shard from it. Mid-run a
    worker's node is lost (every process SIGKILLed): the job still finishes, from its last
    checkpoint at the URI, with every epoch recorded once, the shards covering the training split
    each epoch, and a test MRR as good as an undisturbed run's. `cube eval` then reads the run
    back from the URI as a job."""
    from cube.data.storage import Storage

    source = tmp_path / "bucket" / "pairs"
    source.mkdir(parents=True)
    pairs = pd.read_json(qa_sample, lines=True)
    pairs.iloc[::2].to_parquet(source / "part-0.parquet")
    pairs.iloc[1::2].to_parquet(source / "part-1.parquet")
    target = tmp_path / "bucket" / "run"
    staged = Storage.of(f"file://{target}").local / "metrics.csv"  # the driver's copy, written each epoch
    client = multinode.client()
    job_id = submit_async(multinode, job_env, "jobs.train", "--data", f"file://{source}", "--output",
                          f"file://{target}", *TRAIN, "--set", "optim.epochs=3", "--set", "max_failures=1")
    deadline = time.time() + 600
    while not (staged.is_file() and len(pd.read_csv(staged)) >= 1):
        assert client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job_id)[
            -3000:
        ]
        assert time.time() < deadline, "the first epoch never finished"
        time.sleep(0.2)
    done = len(pd.read_csv(staged))
    workers = multinode.running("RayTrainWorker")
    assert sum(workers.values()) == 2 and max(workers.values()) == 1, workers  # SPREAD: one per node
    victims = [n for n in multinode.nodes() if n["name"] != "head" and workers[n["name"]]]
    assert done < 3 and victims, (done, workers)  # mid-run, a worker node with a training worker
    multinode.kill_node(victims[0])

    assert wait_job(client, job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    for name in ("model/model.safetensors", "eval.json", "metrics.csv", "curves.png", "split.json", "bank.json",
                 "ray.log"):
        assert (target / name).is_file(), name
    assert list((target / "split" / "split=train").glob("*.parquet")) and list((target / "bank").glob("*.parquet"))
    assert list((target / "ray" / "train").glob("checkpoint_*")), "Ray Train did not checkpoint to the URI"
    metrics = pd.read_csv(target / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3]  # every epoch once, none skipped
    resumed = metrics[metrics["resumed_from"] > 0]
    assert len(resumed) and resumed["resumed_from"].min() >= done  # from the last checkpoint before the loss
    assert_shards_cover_the_training_split(target, metrics)
    report = json.loads((target / "eval.json").read_text())
    assert abs(report["cube"]["mrr"] - smoke_run[1]["cube"]["mrr"]) < 0.05  # as good as an undisturbed run
    alive = [n for n in multinode.probe()["nodes"].values() if n["alive"]]
    assert len(alive) == 2  # the lost node stayed lost: the job finished on the two left

    # `cube eval` reads the run back from the URI, as a job on another node would.
    proc = submit_job(multinode, job_env, "jobs.eval", "--run", f"file://{target}", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout[
        proc.stdout.index("\n{\n") + 1 : proc.stdout.rindex("\n}\n") + 2
    ]  # the report, amid Ray's lines
    assert json.loads(printed)["cube"]["mrr"] == pytest.approx(report["cube"]["mrr"])


def test_embed_job_through_the_client_writes_its_store_to_a_uri(multinode, job_env, tmp_path):
    target = tmp_path / "bucket" / "store"
    client = multinode.client()
    job_id = submit_async(multinode, job_env, "jobs.embed", "tests/data/tiny.jsonl", "--output", f"file://{target}")
    assert wait_job(client, job_id, timeout=600) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    assert store.read_all(target).num_rows == 16  # 8 questions + 8 answers
    assert (target / "teacher.json").is_file()


TRIAL_ACTORS = ("ImplicitFunc", "cube_trial")  # Tune's actor for a function trainable (titles of its process)
SPACE = (
    "cube.hidden: {distribution: choice, values: [8, 16]}\n"
    "optim.lr: {distribution: loguniform, low: 1.0e-3, high: 1.0e-2}\n"
)


def test_sweep_survives_losing_a_node(multinode, job_env, qa_sample, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    client = multinode.client()
    job_id = submit_async(multinode, job_env, "jobs.tune", "--data", str(qa_sample), "--space", str(space),
                          "--output", str(out), "--trials", "4", "--max-concurrent", "2", "--robustness-seeds", "0",
                          "--config", "configs/smoke.yaml", "--set", "optim.epochs=3")
    deadline, seen = time.time() + 600, set()
    while True:  # a trial running on a worker node, after the sweep's first reported epoch
        assert client.get_job_status(job_id) in (JobStatus.PENDING, JobStatus.RUNNING), client.get_job_logs(job_id)[
            -3000:
        ]
        assert time.time() < deadline, f"no trial ever ran on a worker node (trials per node seen: {sorted(seen)})"
        if any(p.stat().st_size for p in (out / "ray").glob("*/*/result.json")):
            trials = multinode.running(*TRIAL_ACTORS)
            seen.add(str(trials))
            victims = [n for n in multinode.nodes() if n["name"] != "head" and trials.get(n["name"])]
            if victims:
                break
        time.sleep(0.2)
    multinode.kill_node(victims[0])

    assert wait_job(client, job_id) == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-3000:]
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4  # every trial recorded: retried from its checkpoint, or errored with its reason
    assert (table["status"] != "errored").sum() >= 3 and table.loc[table["status"] == "errored", "error"].notna().all()
    for name in ("best/model/model.safetensors", "best_config.yaml", "pareto.png"):
        assert (out / name).exists(), name


def test_cluster_down_stops_its_nodes_and_nothing_else(multinode, ray_cluster):
    nodes = multinode.nodes()
    down = cube("cluster", "down", "--state", str(multinode.state), env=multinode.env, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(not node_processes(n["pid"]) for n in nodes), "a node of the cluster is still running"
    assert not (multinode.state / "cluster.json").exists()
    assert port_is_free(int(multinode.address.rsplit(":", 1)[1]))
    import ray  # the suite's shared cluster, which this process drives, is still there

    assert [n for n in ray.nodes() if n["Alive"]], "`cube cluster down` stopped a Ray it had not started"
    again = cube("cluster", "status", "--state", str(multinode.state), env=multinode.env, timeout=120)
    assert again.returncode == 1 and "no cluster" in again.stdout
