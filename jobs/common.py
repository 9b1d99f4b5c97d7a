"""What every Ray entrypoint shares: connecting to Ray, config flags, logging, readable failures,
and the check that a job's resources exist before Ray is asked for them."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cube.config import load_config

T = TypeVar("T")
log = logging.getLogger("cube")
_embedded = False  # whether this process started the Ray cluster it uses (nothing can join it)


class ResourceError(RuntimeError):
    """A job asks for more than the cluster has (and, where allowed, more than joined in time)."""


class SweepError(RuntimeError):
    """A sweep none of whose trials reported a result; the message says where their errors are."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: bad data, config, run folder, teacher, resources."""
    from cube.data.bank import BankError
    from cube.data.qa import DataError
    from cube.data.rundir import RunError
    from cube.data.storage import StorageError
    from cube.data.store import StoreError
    from cube.teachers import TeacherError
    from cube.train.checkpoint import CheckpointError

    return (DataError, RunError, CheckpointError, StoreError, StorageError, TeacherError, ResourceError, BankError,
            SweepError, FileNotFoundError, ValueError)


def user_error_in(
    error: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first error of `kinds` among `error`, its causes and, for Ray Train's WorkerGroupError,
    its workers' errors (Ray wraps a worker's error in its own, often twice), or None."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        todo += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]
        todo += [w for w in (getattr(e, "worker_failures", None) or {}).values() if isinstance(w, BaseException)]
    return None


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run an entrypoint so that a user error is one line on stderr and a non-zero exit, not a
    traceback: that line is what `ray job logs` shows, and the exit makes the job FAILED. The
    full traceback goes to the job's log file (the run's ray.log, or one in $CUBE_CACHE/logs),
    which the line names."""
    try:
        return main(argv)
    except user_errors() as e:
        where = _log_traceback(e)
        print(f"error: {e}" + (f" (traceback in {where})" if where else ""), file=sys.stderr)
        return 1


def _log_traceback(error: BaseException) -> Path | None:
    """Write `error`'s traceback to the log file of this job (opening one if there is none)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        from cube.data.cache import cache_dir

        path = cache_dir("logs") / f"{Path(sys.argv[0]).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
        files = [handler]
    log.error("the job failed: %s", error, exc_info=error, extra={FILE_ONLY: True})
    for h in files:
        h.flush()
    return Path(files[0].baseFilename)


OURS = ("cube", "jobs")  # our loggers: the console shows these
FILE_ONLY = "cube_file_only"  # a record with this attribute set goes to log files, never to the console
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
_verbose = False


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
DRIVER_MMAP_THRESHOLD = 2**20  # blocks at least this large are mapped, and unmapped when freed


def use_system_allocator() -> None:
    """Arrow's default allocator (jemalloc) keeps what a process freed; a driver that streams
    millions of vectors through it (validation, the means, the baselines' normal equations)
    would hold gigabytes it no longer uses. The system allocator gives large blocks back. Every
    entrypoint calls this first (through setup_logging); its Ray workers get it through the job's
    runtime environment (ensure_ray)."""
    import pyarrow as pa

    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    pa.set_memory_pool(pa.system_memory_pool())
    if sys.platform.startswith("linux"):
        # glibc serves blocks of up to 32 MB from its heap once a few were freed (its dynamic
        # mmap threshold), and a heap keeps what it held: an evaluation on a 100k-pair split left
        # the driver at 1.35 GB after it, 0.69 GB with this. Not for training processes: there
        # the lattice's per-step activations would be mapped and unmapped every step.
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, DRIVER_MMAP_THRESHOLD)


def trim_heap() -> None:
    """Give the pages that glibc's malloc keeps after a phase's large temporaries (a validation
    sample built from millions of rows, an evaluation's pool) back to the OS, so that the next
    phase starts from a flat footprint. Other C libraries (macOS) return memory themselves."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).malloc_trim(0)


def setup_logging(verbose: bool = False, log_file: Path | None = None) -> None:
    """Our own progress on the console; Ray's logs in `log_file` (a run folder's ray.log), and
    on the console as well only with `verbose`.

    Ray's libraries print from their own handlers; `route_ray_logs` (called again once Ray is
    up, since Ray configures its loggers on import and on init) sends them here instead."""
    global _verbose
    _verbose = verbose
    use_system_allocator()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.addFilter(lambda r: not getattr(r, FILE_ONLY, False))
    if not verbose:
        console.addFilter(
            lambda r: r.name.split(".")[0] in OURS or r.levelno >= logging.ERROR and r.name.split(".")[0] != "ray"
        )
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(log_file, encoding="utf-8")
        file.setFormatter(fmt)
        handlers.append(file)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python warnings (Ray's deprecations of its own internals among them) go to the log file
    # through the `py.warnings` logger, and to the console only with `verbose`.
    logging.captureWarnings(True)
    if "ray" in sys.modules:
        route_ray_logs()


def route_ray_logs() -> None:
    """Send Ray's driver-side loggers through ours (to the log file; to the console if verbose)."""
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):  # console handlers (Ray's PlainRayHandler among them), not files
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        logger.propagate = True
        logger.setLevel(logging.INFO)


def route_raylet_messages() -> None:
    """Ray's driver prints what the raylet pushes to it (such as its notice that many worker
    processes have started, which is normal where light stages take fractions of a CPU) straight
    to the terminal, past every logging setting. Send those lines to the job's log instead, and
    to the console only with -v."""
    import ray._private.worker as ray_worker

    original = ray_worker.print_to_stdstream
    if getattr(original, "routed_by_cube", False):
        return

    def routed(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet" and not _verbose:
            for line in data.get("lines", []):
                logging.getLogger("ray").warning("(raylet) %s", line)
            return
        original(data, ignore_prefix)

    routed.routed_by_cube = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = routed


def configure_ray_data() -> None:
    """This driver's Ray Data settings, set before it builds a dataset: one progress bar per
    pipeline (not one per operator), and no plan printout."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_operator_progress_bars = _verbose
    ctx.print_on_execution_start = _verbose
    route_ray_logs()  # importing ray.data gave its logger a console handler of its own


# Logical CPUs an embedded cluster has beyond its cores, for Ray Data's light stages (listing the
# input files, reading Parquet blocks for the training workers): they do little work, but Ray
# schedules them against CPUs, and one training worker per core would otherwise leave them none.
DATA_CPUS = 2


def ensure_ray(num_cpus: int | None = None) -> bool:
    """Join the cluster in $RAY_ADDRESS, or start an embedded local one (the laptop case).
    Returns True when the cluster is embedded (nothing can ever join it).

    An embedded cluster keeps the dashboard on: Tune needs it to free the placement groups of
    Train trials that it stops early (without it the next trial waits forever). Workers' output
    stays in Ray's session logs unless logging is verbose.
    """
    import ray

    global _embedded
    if ray.is_initialized():
        return _embedded
    route_ray_logs()  # before init too: init itself logs (the token-auth notice)
    quiet = {"log_to_driver": _verbose, "logging_level": logging.INFO if _verbose else logging.WARNING}
    # Arrow's default allocator keeps what a worker freed; blocks of vectors are large. The
    # system allocator gives memory back: for this job's workers, on any cluster.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    # glibc gives each thread that allocates its own arena (up to 8 per core): in a worker with
    # many threads, freed blocks are scattered over them and the footprint keeps growing. Two do.
    quiet["runtime_env"] = {"env_vars": {"ARROW_DEFAULT_MEMORY_POOL": os.environ["ARROW_DEFAULT_MEMORY_POOL"],
                                         "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **quiet)
    else:
        log.info("starting an embedded local Ray cluster (set RAY_ADDRESS to use an existing one)")
        # address="local": always a fresh cluster, never a stale one left in /tmp/ray by a crash.
        if num_cpus is None:
            num_cpus = len(os.sched_getaffinity(0)) + DATA_CPUS
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, **quiet)
        _embedded = True
    route_ray_logs()
    route_raylet_messages()
    return _embedded


def node_resources() -> list[dict[str, float]]:
    """The resources of each alive node."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def fits(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> bool:
    """Whether every bundle finds a node with room, placed first-fit largest-first (each bundle
    must sit on one node, as a Ray Train worker or a Tune trial does)."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: -sum(b.values())):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def describe_nodes(nodes: list[dict[str, float]]) -> str:
    shown = ("CPU", "GPU")
    return (
        "; ".join(f"node {i}: " + ", ".join(f"{k} {n.get(k, 0):g}" for k in shown) for i, n in enumerate(nodes))
        or "no nodes"
    )


READY_S = 15.0  # how long a placement group the cluster can hold may take to be placed


def require_resources(bundles: list[dict[str, float]], what: str, wait_s: float = 0.0) -> None:
    """Fail at once when the cluster cannot hold `bundles` now, instead of letting Ray wait forever.

    Asks Ray itself: a placement group of the bundles (each on one node, as a Train worker or a
    Tune trial sits), removed as soon as it is placed. That counts what is free, not the nodes'
    totals, and a pending group is what an autoscaler (`ray up`, KubeRay) starts nodes for. On an
    embedded cluster nothing can join, so it waits only the moment a placement takes; elsewhere
    up to `wait_s` for nodes to join or free up.

    Raises:
        ResourceError: naming what was asked and what each node has.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [{k: v for k, v in b.items() if v} for b in bundles]
    wait = READY_S if _embedded else max(wait_s, READY_S)
    # A bundle that no node could hold even idle (a GPU on a CPU-only cluster) fails without the
    # placement's wait, unless nodes may join in the meantime.
    nodes_may_join = bool(wait_s) and not _embedded
    totals = node_resources()
    ready: list = []
    if nodes_may_join or all(fits([b], totals) for b in bundles):
        if wait > READY_S:
            log.info("waiting up to %.0f s for the cluster to hold %s", wait, what)
        group = placement_group(bundles, strategy="PACK")
        try:
            ready, _ = ray.wait([group.ready()], timeout=wait)
        finally:
            remove_placement_group(group)
    if ready:
        return
    counts: dict[str, int] = {}
    for b in bundles:
        counts[str(b)] = counts.get(str(b), 0) + 1
    asked = " + ".join(f"{n} x {b}" for b, n in counts.items())
    hint = "" if _embedded or wait_s else " (on an autoscaling cluster, set wait_for_resources_s to wait for nodes)"
    raise ResourceError(
        f"{what} needs {asked}, but the Ray cluster cannot place that now (its nodes: "
        f"{describe_nodes(node_resources())}; busy ones count as full); ask for fewer workers or GPUs, wait for "
        f"other jobs, or add nodes{hint}"
    )


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Ray's own logs and workers' output on the console (they go to RUN/ray.log otherwise)",
    )


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file with config values (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set optim.epochs=5 --set teacher=smollm2 (repeatable)")
    add_verbose_flag(parser)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The job config from --config and --set; a bad key or value exits with its message."""
    try:
        return load_config(cls, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"config error: {e}") from None
