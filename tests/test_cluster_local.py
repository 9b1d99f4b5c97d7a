"""`cube cluster up/status/down` for real: a head and 2 worker nodes on loopback, seen by a driver
in another process, then stopped, leaving every other Ray on the machine (the suite's shared
cluster among them) running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port
from jobs.cluster import node_processes, port_is_free

pytestmark = pytest.mark.ray

PROBE = """
import json, os, ray
ray.init(address=os.environ["RAY_ADDRESS"], logging_level="ERROR", log_to_driver=False)
print(json.dumps([n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]))
"""


def cube(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cluster_up_status_down(ray_cluster, tmp_path):
    state = tmp_path / "cluster"
    port, dashboard = free_port(), free_port()
    # Token auth as for the shared cluster: conftest put RAY_AUTH_MODE and RAY_AUTH_TOKEN in os.environ.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"]
    up = cube("cluster", "up", "--workers", "2", "--cpus-per-node", "1", "--port", str(port),
              "--dashboard-port", str(dashboard), "--state", str(state), env=env, timeout=600)
    nodes = json.loads((state / "cluster.json").read_text())["nodes"] if (state / "cluster.json").exists() else []
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        lines = up.stdout.strip().splitlines()
        assert lines[-1] == (f"export RAY_ADDRESS=127.0.0.1:{port} "
                             f"RAY_API_SERVER_ADDRESS=http://127.0.0.1:{dashboard} RAY_AUTH_MODE=token")
        assert f"dashboard: http://127.0.0.1:{dashboard}" in lines
        assert sorted(n["name"] for n in nodes) == ["head", "worker-1", "worker-2"]

        probe = subprocess.run([sys.executable, "-c", PROBE], env={**env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                               capture_output=True, text=True, timeout=180)
        assert probe.returncode == 0, probe.stderr
        assert json.loads(probe.stdout.strip().splitlines()[-1]) == [1.0, 1.0, 1.0]  # 3 alive nodes, 1 CPU each

        status = cube("cluster", "status", "--state", str(state), env=env, timeout=180)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" running ") == 3
    finally:
        down = cube("cluster", "down", "--state", str(state), env=env, timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(not node_processes(n["pid"]) for n in nodes), "a node of the cluster is still running"
    assert not (state / "cluster.json").exists() and port_is_free(port)
    import ray  # the suite's shared cluster, which this driver is connected to, is still there

    assert [n for n in ray.nodes() if n["Alive"]], "`cube cluster down` stopped a Ray it had not started"
    again = cube("cluster", "status", "--state", str(state), env=env, timeout=120)
    assert again.returncode == 1 and "no cluster" in again.stdout
