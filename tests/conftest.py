"""Shared fixtures. One real Ray cluster (`ray start --head` on loopback, token auth on) serves
the whole integration tier: Ray Data, Train, Serve and `ray job submit` all run against it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Token auth for the test cluster, set before anything imports ray: Ray reads the mode once.
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN", uuid.uuid4().hex)
# Fail a stuck Train worker-group start instead of hanging the suite.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
# Ray Train's controller polls its workers every 2 s, and a worker's report waits for that poll;
# the suite's epochs take well under a second, so most of its training time was that wait. Every
# cluster of the suite (the shared head, `cube cluster up`, a job's embedded one) inherits this.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embeddings and converted models go to a per-session cache, never ~/.cache."""
    path = Path(os.environ.get("CUBE_TEST_CACHE") or tmp_path_factory.mktemp("cube-cache"))
    os.environ["CUBE_CACHE"] = str(path)
    return path


class Cluster:
    def __init__(self, gcs: str, dashboard: str, env: dict[str, str]) -> None:
        self.address, self.dashboard, self.env = gcs, dashboard, env


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A head node on loopback with 4 logical CPUs on these 2 cores (two for Ray Data's light stages
    beside two training workers, as an embedded cluster has), and this process connected as a driver.

    Token authentication stays on (Ray's default since 2.59): a random token is given to the
    head, this driver and every `ray job submit` through RAY_AUTH_TOKEN (set above).
    """
    import ray

    port, dash, agent = free_port(), free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    # Ray drains a node for up to 30 s on SIGTERM, for its Serve replicas' sake; the suite's
    # head stops once every test is done, with nothing left to drain for.
    head_env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         # the job agent's default port may be held by another Ray on this machine (a user's own)
         f"--dashboard-agent-listen-port={agent}",
         "--object-store-memory=400000000", "--disable-usage-stats"],
        env=head_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            ray.init(address=address, log_to_driver=True)
            break
        except Exception as e:
            print(f"waiting for the ray head: {e}", file=sys.stderr)
            if time.time() > deadline or head.poll() is not None:
                head.kill()
                raise RuntimeError(f"ray head did not come up; see {log.name}") from e
            time.sleep(1.0)
    os.environ["RAY_ADDRESS"] = address
    try:
        yield Cluster(address, f"http://127.0.0.1:{dash}", env)
    finally:
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        log.close()
        # `ray start --block` leaves its address behind; a later bare ray.init() would chase it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and str(port) in current.read_text():
            current.unlink()


def submit_job(cluster: Cluster, env_vars: dict[str, str], *entrypoint: str,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . -- python -m ENTRYPOINT`, waiting for it to end."""
    import json

    runtime_env = json.dumps({"env_vars": env_vars})
    deadline = time.time() + 90
    while True:
        proc = subprocess.run(
            [
                str(BIN / "ray"),
                "job",
                "submit",
                "--address",
                cluster.dashboard,
                "--working-dir",
                str(ROOT),
                "--runtime-env-json",
                runtime_env,
                "--",
                "python",
                "-m",
                *entrypoint,
            ],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        # A fresh head answers before its job agent is up; Ray's own message says to try again.
        if "No available agent to submit job" not in proc.stderr or time.time() > deadline:
            return proc
        time.sleep(3)


SMOKE_OVERRIDES = ["optim.epochs=3"]  # configs/smoke.yaml plus these: the suite's standard run


@pytest.fixture(scope="session")
def qa_sample(tmp_path_factory) -> Path:
    """Every third pair of the shipped data (479 pairs, all 24 topics, "Why is the sky blue?"
    among them): the integration tier's data. A third of the whole file's cost in embedding,
    training and fitting the baselines; `cube demo` and tests/test_data.py use the whole file."""
    from cube.data.qa import SHIPPED_DATASET, load_qa

    path = tmp_path_factory.mktemp("data") / "qa_sample.jsonl"
    load_qa(SHIPPED_DATASET).iloc[2::3][["question", "answer", "topic"]].to_json(path, orient="records", lines=True)
    return path


@pytest.fixture(scope="session")
def sample_with_vectors(qa_sample, tmp_path_factory) -> Path:
    """The sample as a Parquet file that brings its own embeddings (MiniLM's, in the columns
    `question_embedding` and `answer_embedding`): the input of a bring-your-own-embeddings run."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cube.teachers import HFTeacher, TeacherConfig

    pairs = pd.read_json(qa_sample, lines=True)
    teacher = HFTeacher(TeacherConfig())
    col = lambda v: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1])  # noqa: E731
    path = tmp_path_factory.mktemp("byo") / "pairs.parquet"
    pq.write_table(pa.table({"question": pairs["question"], "answer": pairs["answer"],
                             "question_embedding": col(teacher.embed(pairs["question"].tolist()).vectors),
                             "answer_embedding": col(teacher.embed(pairs["answer"].tolist()).vectors)}), path)
    return path


@pytest.fixture(scope="session")
def demo(ray_cluster, qa_sample, tmp_path_factory) -> tuple[Path, dict, subprocess.CompletedProcess]:
    """(run, report, process) of `cube demo` on the sample with the smoke config: it trains one
    undisturbed 2-worker run, evaluates it and asks it three questions over HTTP. That run is the
    integration tests' shared one, and its console is what tests/test_demo.py reads."""
    import json

    run = tmp_path_factory.mktemp("runs") / "smoke"
    proc = subprocess.run([sys.executable, "-m", "jobs.demo", "--data", str(qa_sample), "--output", str(run),
                           "--port", str(free_port()), "--config", "configs/smoke.yaml",
                           *[a for o in SMOKE_OVERRIDES for a in ("--set", o)]],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, json.loads((run / "eval.json").read_text()), proc


@pytest.fixture(scope="session")
def smoke_run(demo) -> tuple[Path, dict]:
    """(run, report): the demo's run, shared by the integration tests."""
    return demo[0], demo[1]


def assert_shards_cover_the_training_split(run, metrics) -> None:
    """Every epoch, two workers' shards together streamed each training row exactly once, but for
    the one row that Ray Train's equal split drops when the rows do not divide by two: their row
    counts are equal and add up, and the sums of their question vectors add up to the split's
    (less that one row's)."""
    import numpy as np

    from cube.data.rundir import RunDir

    split = RunDir(run).split()
    row_sums = np.concatenate([q.astype(np.float64).sum(1) for q, _ in split.vector_batches("train")])
    for _, epoch in metrics.iterrows():
        a, b = epoch["shard_rows_rank0"], epoch["shard_rows_rank1"]
        assert a == b == len(row_sums) // 2, (a, b, len(row_sums))
        missing = row_sums.sum() - epoch["shard_checksum_rank0"] - epoch["shard_checksum_rank1"]
        if len(row_sums) % 2:
            assert np.abs(row_sums - missing).min() < 1e-6, missing  # exactly one row left out
        else:
            assert abs(missing) < 1e-6, missing


def write_small_lm(folder: Path, texts: list[str], vocab: int = 3000, width: int = 128) -> Path:
    """A small causal LM (LLaMA architecture, 2 layers, untrained) with a word-level tokenizer
    fitted on `texts`: a Hugging Face folder that `decoder.lm` takes like any other, small enough
    to be trained from scratch (`decoder.train_lm=true`) in the suite. SmolLM2 is the real
    decoder; on this CPU it takes minutes an epoch (docs/generation.md)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="<unk>"))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.decoder = decoders.WordPiece()  # joins the words with spaces
    words.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab, show_progress=False,
                                                               special_tokens=["<|endoftext|>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<unk>")
    eos = tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


DECODER_EPOCHS = 10
DECODER_OVERRIDES = [f"epochs={DECODER_EPOCHS}", "decoder.train_lm=true", "decoder.inject=true", "decoder.hidden=256",
                     "lr=0.005", "decoder.max_answer_tokens=48", "val_answers=32", "keep=last"]


@pytest.fixture(scope="session")
def decoded_run(smoke_run, tmp_path_factory) -> tuple[Path, float]:
    """(the shared run with RUN/decoder, the epoch after which its first driver was killed):
    `cube decoder` with a small LM on 2 workers, its driver killed after an epoch, then resumed
    with `--resume` to the end. The Serve tests serve this decoder at /v1/generate."""
    import signal

    import pandas as pd

    from cube.data.rundir import RunDir

    run = smoke_run[0]
    answers = RunDir(run).split().table("train", ["answer"]).column("answer").to_pylist()
    lm = write_small_lm(tmp_path_factory.mktemp("lm") / "small-lm", answers)
    metrics = run / "decoder" / "metrics.csv"
    cmd = [sys.executable, "-m", "jobs.cli", "decoder", "--run", str(run), "--set", f"decoder.lm={lm}",
           *[a for o in DECODER_OVERRIDES for a in ("--set", o)]]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while not (metrics.is_file() and len(pd.read_csv(metrics)) >= 1):
        assert proc.poll() is None, f"cube decoder ended before it could be interrupted: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, "the decoder's first epoch never finished"
        time.sleep(0.2)
    interrupted_after = float(pd.read_csv(metrics)["epoch"].max())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resume = subprocess.run([sys.executable, "-m", "jobs.cli", "decoder", "--run", str(run), "--resume"], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, resume.stderr[-3000:]
    return run, interrupted_after
