"""The whole pipeline on the shipped dataset (or --data FILE), on an embedded local Ray (or $RAY_ADDRESS):

  1. load data/qa.jsonl              4. evaluate on held-out pairs against the baselines
  2. embed it with Ray Data           5. serve it with Ray Serve and ask three held-out
  3. train the cube with Ray Train       questions over HTTP

    python -m jobs.demo                      # writes runs/demo
    python -m jobs.demo --set optim.epochs=2 # a quicker look

The demo trains 5 epochs where `cube train` trains 8, to stay within about 5 minutes on a
2-core laptop (on the shipped data validation MRR peaks around epoch 5 anyway);
`--set optim.epochs=8` gives the default.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from pathlib import Path

import requests

from cube.data.qa import SHIPPED_DATASET, load_qa
from cube.data.rundir import RunDir
from cube.eval.report import format_report
from cube.job_config import TrainConfig
from jobs.common import add_config_flags, config_from_args, ensure_ray, run_main, setup_logging
from jobs.serve import start, stop
from jobs.trainer import train

LAPTOP_SERVE = Path(__file__).resolve().parent.parent / "configs" / "serve_laptop.yaml"  # a quarter CPU a replica

log = logging.getLogger("cube.demo")
MARKER = ".cube-demo"  # only folders the demo made itself are ever replaced
DEMO_OVERRIDES = ["optim.epochs=5"]  # under the user's --set, which win


def ask(url: str, questions: list[str]) -> list[dict]:
    replies = []
    for q in questions:
        r = requests.post(f"{url}/v1/answer", json={"question": q}, timeout=60)
        r.raise_for_status()
        replies.append(r.json())
    return replies


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cube demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default=str(SHIPPED_DATASET), help="question/answer file (default: the shipped data/qa.jsonl)"
    )
    p.add_argument(
        "--output", type=Path, default=Path("runs/demo"), help="run folder (a previous demo there is replaced)"
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port for the Serve step")
    add_config_flags(p)
    return p


def shorten(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.config is None:  # a --config file of the user's keeps its own epochs
        args.overrides = [*DEMO_OVERRIDES, *args.overrides]
    cfg = config_from_args(TrainConfig, args)
    out: Path = args.output
    if out.exists():
        if not (out / MARKER).exists():
            raise SystemExit(f"{out} exists and was not made by `cube demo`; pass another --output")
        shutil.rmtree(out)
    start_time = time.perf_counter()
    out.mkdir(parents=True)
    (out / MARKER).touch()
    setup_logging(args.verbose, out / "ray.log")
    pairs = load_qa(args.data, cfg.data)
    n_topics = pairs["topic"].nunique()  # 0 when the file has no topic column
    topics = f" over {n_topics} topics" if n_topics else ""
    print(f"cube demo: {len(pairs)} question-answer pairs{topics} ({Path(args.data).name}), "
          f"teacher {cfg.teacher.name}, run folder {out}", flush=True)
    embedded = ensure_ray()
    report = train(args.data, out, cfg)
    print("\n" + format_report(report, n_examples=3))
    test = RunDir(out).split().table("test", ["question", "answer"]).to_pandas()
    test = test.sort_values("question", ignore_index=True)  # the same picks whatever order Ray Data wrote
    picks = test.iloc[[0, len(test) // 2, len(test) - 1]]
    url = start(out, port=args.port, config=LAPTOP_SERVE)
    try:
        replies = ask(url, picks["question"].tolist())
    finally:
        # An embedded cluster takes Serve down with it at exit. serve.shutdown() makes the raylet
        # print that the controller's own graceful_shutdown task "failed" (it kills itself), so
        # it is called only on a shared cluster, where Serve must not outlive the demo.
        if not embedded:
            stop()
    print(f"Three held-out questions over HTTP ({url}/v1/answer; the bank holds every answer of the corpus):")
    for (_, row), reply in zip(picks.iterrows(), replies):
        verdict = "right" if reply["answer"] == row["answer"] else "wrong; true: " + shorten(row["answer"], 80)
        print(f"  Q: {row['question']}\n  A: {shorten(reply['answer'])}  ({verdict}, score {reply['score']:.2f})")
    print(
        f"\nPictures: {out / 'curves.png'} (training curves); `cube analyze --run {out}` draws what forms inside "
        f"the cube."
    )
    print(f"Ray's own logs: {out / 'ray.log'}. Demo finished in {time.perf_counter() - start_time:.0f} s.")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
