"""Start and stop a multi-node Ray cluster on this machine (loopback), for trying multi-node jobs.

    cube cluster up [--workers 2] [--cpus-per-node 1] [--port 6379] [--dashboard-port 8265]
    cube cluster status
    cube cluster down

`up` starts a head and N worker nodes on 127.0.0.1, each its own `ray start` process with its own
CPUs and object store, so Ray schedules across them as across machines (SPREAD placement, one
Train worker per node, a node dying under a job). It ends by printing the dashboard's URL and
the line that points every cube command and `ray job submit` at the cluster:

    dashboard: http://127.0.0.1:8265
    export RAY_ADDRESS=127.0.0.1:6379 RAY_API_SERVER_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=token

`down` stops only the nodes that `up` started: their processes are recorded in the state folder
(--state, default ~/.cache/cube/cluster), and any other Ray on this machine is left alone,
unlike `ray stop`, which stops them all. Each node's output is in STATE/<node>.log. Ray
registers the nodes under the machine's own IP address even though they are started with
--node-ip-address=127.0.0.1; clients still connect through 127.0.0.1. Each node keeps its own Ray
temp folder (/tmp/cube-ray-PORT-NODE), as separate machines would, so nothing of this cluster
lands in /tmp/ray, where other Rays on the machine keep theirs.

Token authentication stays on (Ray's default since 2.59): the nodes run with RAY_AUTH_MODE=token
and the token in $RAY_AUTH_TOKEN or ~/.ray/auth_token (created with `ray get-auth-token
--generate` when there is none). Clients need RAY_AUTH_MODE=token and the same token, which
they find in ~/.ray/auth_token by themselves. Set RAY_AUTH_MODE=disabled before `up` to run
without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from cube.data.cache import cache_root
from jobs.common import run_main

HOST = "127.0.0.1"
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up


class ClusterError(RuntimeError):
    """A node did not start, a port is taken, or the state folder says something else runs."""


def ray_executable() -> Path:
    """The `ray` of the running Python's environment, never another one on PATH."""
    exe = Path(sys.executable).parent / "ray"
    if not exe.is_file():
        raise ClusterError(f"no `ray` executable next to {sys.executable}; install ray into this environment")
    return exe


def default_state() -> Path:
    return cache_root() / "cluster"


# ---------------------------------------------------------------- ports, processes, state


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))  # all interfaces: the GCS listens on every address
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _process(pid: int) -> psutil.Process | None:
    """The live process `pid` (None if it is gone or a zombie: it has exited)."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except psutil.NoSuchProcess:
        return None


def alive(pid: int) -> bool:
    """Whether `pid` is still a `ray start` process (a recycled pid is not ours)."""
    proc = _process(pid)
    if proc is None:
        return False
    try:
        args = proc.cmdline()
    except psutil.AccessDenied:
        return True
    except psutil.NoSuchProcess:
        return False
    return "start" in args and any(a.endswith("ray") for a in args)


def node_processes(pid: int) -> list[int]:
    """Every live process of the node whose `ray start --block` is `pid`: its process group
    (the GCS, raylet, dashboard, agents) and the descendants of those (Ray workers and actors,
    which run in process groups of their own)."""
    group = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(proc.pid) == pid and proc.status() != psutil.STATUS_ZOMBIE:
                group.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    if not alive(pid):
        # The leader is gone, and its pid may since lead another process group: keep only the
        # group's Ray processes, and do not follow their children.
        return sorted(p.pid for p in group if "ray" in " ".join(p.info["cmdline"] or []))
    found = {p.pid for p in group}
    for proc in group:
        try:
            found |= {c.pid for c in proc.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            continue
    return sorted(found)


def read_state(state: Path) -> dict | None:
    path = state / "cluster.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_state(state: Path, data: dict) -> None:
    state.mkdir(parents=True, exist_ok=True)
    tmp = state / "cluster.json.tmp"
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    tmp.replace(state / "cluster.json")


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------- auth


def node_env() -> dict[str, str]:
    """The environment of every node: this one, with token auth unless it is turned off."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # a head must never go looking for another cluster
    env.setdefault("RAY_AUTH_MODE", "token")
    # `cube cluster down` stops every node, so no node is left to take over a draining node's
    # work: Ray 2.60's drain on SIGTERM (up to 30 s a node) would only delay the stop.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    return env


def ensure_token(env: dict[str, str]) -> None:
    """With token auth, make sure there is a token for the nodes to share (Ray's own rules)."""
    if env["RAY_AUTH_MODE"].lower() != "token":
        return
    if env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH") or (Path.home() / ".ray" / "auth_token").is_file():
        return
    done = subprocess.run([str(ray_executable()), "get-auth-token", "--generate"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise ClusterError(f"`ray get-auth-token --generate` failed: {done.stderr.strip()}")


# ---------------------------------------------------------------- nodes


def start_node(name: str, args: list[str], env: dict[str, str], state: Path) -> dict:
    """Start one node as `ray start --block ARGS` in a process group of its own."""
    log = state / f"{name}.log"
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([str(ray_executable()), "start", "--block", *args], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return {"name": name, "pid": proc.pid, "log": str(log), "_proc": proc}


def wait_started(node: dict, timeout: float, watch: list[dict] = (), settle: float = 2.0) -> None:
    """Wait until the node's `ray start` reports it up and stays up for `settle` seconds (with
    --block it stops the whole node, within a second, when one of its processes dies early),
    while every node in `watch` keeps running.

    Raises:
        ClusterError: naming the node that exited or did not start in time, with its log.
    """
    deadline = time.monotonic() + timeout
    log = Path(node["log"])
    up_since = None
    while True:
        for other in [node, *watch]:
            if other["_proc"].poll() is not None:
                other_log = Path(other["log"])
                raise ClusterError(f"`ray start` for {other['name']} exited with code {other['_proc'].returncode}:\n"
                                   f"{log_tail(other_log)}\n  (full log: {other_log})")
        if up_since is None and STARTED in log.read_text(encoding="utf-8", errors="replace"):
            up_since = time.monotonic()
        if up_since is not None and time.monotonic() - up_since >= settle:
            return
        if up_since is None and time.monotonic() > deadline:
            raise ClusterError(f"{node['name']} did not start within {timeout:.0f} s; its log so far:\n"
                               f"{log_tail(log)}\n  (full log: {log})")
        time.sleep(0.5)


def stop_nodes(pids: list[int], timeout: float) -> None:
    """SIGTERM each node's `ray start --block` (which then stops its own Ray processes), wait up
    to `timeout` for all of the nodes' processes to end, then SIGKILL whatever is left of them."""
    procs = [proc for pid in pids for p in node_processes(pid) if (proc := _process(p)) is not None]
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for proc in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(left, timeout=10)  # SIGKILL is not instant either


def node_temp_dir(port: int, name: str) -> Path:
    # Short and under /tmp: Ray's socket paths inside it must stay under 108 characters.
    return Path(f"/tmp/cube-ray-{port}-{name}")


def remove_temp_dirs(data: dict) -> None:
    for path in data.get("temp_dirs", []):
        shutil.rmtree(path, ignore_errors=True)


def running(data: dict | None) -> list[dict]:
    return [n for n in (data or {}).get("nodes", []) if alive(n["pid"])]


# ---------------------------------------------------------------- commands


def up(args: argparse.Namespace) -> int:
    state: Path = args.state
    if running(read_state(state)):
        old = read_state(state)
        raise ClusterError(f"a cluster started by `cube cluster up` is still running at {old['address']} "
                           f"(state in {state}); stop it with `cube cluster down` first, or pass another --state")
    if args.workers < 0 or args.cpus_per_node < 1:
        raise ClusterError("need --workers >= 0 and --cpus-per-node >= 1")
    for flag, port in (("--port", args.port), ("--dashboard-port", args.dashboard_port)):
        if not port_is_free(port):
            raise ClusterError(f"port {port} is in use (another Ray cluster?); choose a free one with {flag}")
    state.mkdir(parents=True, exist_ok=True)
    env = node_env()
    ensure_token(env)
    address = f"{HOST}:{args.port}"
    dashboard = f"http://{HOST}:{args.dashboard_port}"
    common = [f"--node-ip-address={HOST}", f"--num-cpus={args.cpus_per_node}", f"--num-gpus={args.gpus_per_node}",
              f"--object-store-memory={args.object_store_mb * 1024 * 1024}", "--disable-usage-stats"]
    data = {"address": address, "dashboard": dashboard, "auth_mode": env["RAY_AUTH_MODE"], "ray": str(ray_executable()),
            "cpus_per_node": args.cpus_per_node, "nodes": []}
    started: list[dict] = []

    def save() -> None:
        data["nodes"] = [{k: v for k, v in n.items() if not k.startswith("_")} for n in started]
        write_state(state, data)

    def record(node: dict) -> None:
        started.append(node)
        save()

    def launch(name: str, extra: list[str]) -> dict:
        # Ports Ray would otherwise take at a fixed default (the dashboard agent's 52365, the
        # client server's 10001) are chosen free, so that this cluster never collides with
        # another Ray on the machine; Ray picks the rest at random.
        node = start_node(name, [*extra, f"--dashboard-agent-listen-port={free_port()}", *common, *temp_dir(name)],
                          env, state)
        node["_extra"] = extra
        record(node)
        return node

    def temp_dir(name: str) -> list[str]:
        """A Ray temp folder of its own for each node, as on separate machines. In the shared
        default (/tmp/ray), a node unpacking a job's working_dir replaces the folder that the
        job's driver runs in, and a job's driver connects to whichever cluster on the machine
        last wrote /tmp/ray/ray_current_cluster (Ray's job supervisor resolves "auto" there)."""
        path = node_temp_dir(args.port, name)
        if str(path) not in data.setdefault("temp_dirs", []):
            data["temp_dirs"].append(str(path))
        return [f"--temp-dir={path}"]

    def confirm(node: dict, up: list[dict]) -> None:
        """Wait for a launched node (while the nodes in `up` keep running); launch it once more
        if it fails. On a busy machine Ray's own timeouts bite: a raylet has a fixed 30 s to
        register, the head's client server gives up waiting for its node; a second try
        usually gets through."""
        try:
            wait_started(node, args.timeout, watch=up)
        except ClusterError:
            if any(n["_proc"].poll() is not None for n in up):
                raise  # an earlier node died: another try would not help
            log = Path(node["log"])
            print(f"{node['name']} failed to start (see {log.with_suffix('.failed.log')}); trying once more",
                  file=sys.stderr)
            stop_nodes([node["pid"]], timeout=30)
            started.remove(node)
            save()
            log.replace(log.with_suffix(".failed.log"))
            wait_started(launch(node["name"], node["_extra"]), args.timeout, watch=up)

    try:
        head = launch("head", ["--head", f"--port={args.port}", "--include-dashboard=true", f"--dashboard-host={HOST}",
                               f"--dashboard-port={args.dashboard_port}", f"--ray-client-server-port={free_port()}"])
        confirm(head, [])
        # One worker at a time: started together they compete for the CPU, and on a busy
        # machine that made a raylet miss Ray's 30 s registration limit.
        for i in range(1, args.workers + 1):
            confirm(launch(f"worker-{i}", [f"--address={address}"]), [head])
    except BaseException:
        stop_nodes([n["pid"] for n in reversed(started)], timeout=30)
        remove_temp_dirs(data)
        (state / "cluster.json").unlink(missing_ok=True)
        raise
    total = args.cpus_per_node * (args.workers + 1)
    print(f"cluster up: a head and {args.workers} worker node(s) on {HOST}, {args.cpus_per_node} CPU each "
          f"({total} CPUs); node logs in {state}")
    print(f"dashboard: {dashboard}")
    print("then: cube train ... (or any cube command), or ray job submit --working-dir . -- python -m jobs.train ...")
    print(
        "stop it: cube cluster down" + ("" if state == default_state().expanduser().resolve() else f" --state {state}")
    )
    auth = " RAY_AUTH_MODE=token" if env["RAY_AUTH_MODE"].lower() == "token" else ""
    # RAY_ADDRESS for drivers (every cube command); RAY_API_SERVER_ADDRESS for `ray job`/`serve`,
    # which would otherwise take RAY_ADDRESS (the GCS, not the job API).
    print(f"export RAY_ADDRESS={address} RAY_API_SERVER_ADDRESS={dashboard}{auth}")
    return 0


def down(args: argparse.Namespace) -> int:
    data = read_state(args.state)
    if data is None:
        print(f"no cluster to stop (no state in {args.state})")
        return 0
    nodes = data.get("nodes", [])
    workers = [n["pid"] for n in nodes if n["name"] != "head"]
    heads = [n["pid"] for n in nodes if n["name"] == "head"]
    stop_nodes(workers, args.timeout)  # workers first, so that none of them reports a lost head
    stop_nodes(heads, args.timeout)
    left = [n["name"] for n in nodes if node_processes(n["pid"])]
    if left:
        raise ClusterError(f"could not stop {', '.join(left)}; see the logs in {args.state}")
    remove_temp_dirs(data)
    (args.state / "cluster.json").unlink(missing_ok=True)
    print(f"stopped the cluster at {data['address']} ({len(nodes)} node(s))")
    return 0


def status(args: argparse.Namespace) -> int:
    data = read_state(args.state)
    if data is None:
        print(f"no cluster started by `cube cluster up` (no state in {args.state})")
        return 1
    up_nodes = running(data)
    print(f"cluster at {data['address']}, dashboard {data['dashboard']}, auth {data['auth_mode']}")
    for node in data["nodes"]:
        state = "running" if node in up_nodes else "stopped"
        print(f"  {node['name']:<10} pid {node['pid']:<8} {state:<8} log {node['log']}")
    if not any(n["name"] == "head" for n in up_nodes):
        print("the head is not running: `cube cluster down` cleans up, then `cube cluster up` starts afresh")
        return 1
    env = {**node_env(), "RAY_AUTH_MODE": data["auth_mode"]}
    try:
        done = subprocess.run([data["ray"], "status", f"--address={data['address']}"], env=env,
                              capture_output=True, text=True, timeout=args.timeout)
        print(done.stdout.rstrip() or done.stderr.rstrip())
    except subprocess.TimeoutExpired:
        print(f"`ray status` did not answer within {args.timeout:.0f} s")
    return 0 if len(up_nodes) == len(data["nodes"]) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube cluster", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", type=Path, default=default_state(),
                        help="folder for the cluster's state and node logs (default: $CUBE_CACHE/cluster, "
                             "i.e. ~/.cache/cube/cluster)")
    sub = p.add_subparsers(dest="command", required=True, metavar="{up,down,status}")
    u = sub.add_parser("up", parents=[common], help="start a head and N worker nodes on 127.0.0.1")
    u.add_argument("--workers", type=int, default=2, help="worker nodes besides the head (default 2)")
    u.add_argument(
        "--cpus-per-node", type=int, default=1, help="CPUs each node offers Ray, the head included (default 1)"
    )
    u.add_argument("--gpus-per-node", type=int, default=0,
                   help="GPUs each node offers (default 0; on one machine every node would see the same devices)")
    u.add_argument("--port", type=int, default=6379, help="the head's GCS port (default 6379)")
    u.add_argument("--dashboard-port", type=int, default=8265, help="the dashboard and job API port (default 8265)")
    u.add_argument("--object-store-mb", type=int, default=256, help="object store of each node, in MiB (default 256)")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds each node may take to start (default 120)")
    d = sub.add_parser("down", parents=[common], help="stop the nodes that `up` started (and nothing else)")
    d.add_argument("--timeout", type=float, default=30.0,
                   help="seconds the nodes may take to stop before they are killed (default 30)")
    s = sub.add_parser("status", parents=[common], help="the nodes `up` started, and `ray status` of the cluster")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for `ray status` (default 60)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.state = args.state.expanduser().resolve()
    try:
        return {"up": up, "down": down, "status": status}[args.command](args)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
