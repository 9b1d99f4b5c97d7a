"""Training from the Ray Data stream against the same loop over in-memory tensors, side by side.

    python -m bench.stream_throughput --run /work/scale/run-100k --rows 100000 --epochs 3

One Ray Train worker (1 CPU) runs `cube.train.loop.fit` twice on the same training rows of a
run's split: first streaming its shard (`get_dataset_shard(...).iter_torch_batches`, as
`cube train` does), then over the same rows collected into tensors first (what `fit` does with
a `Split`). Both report samples/s per epoch; the first epoch of each (start-up) is left out.
Prints the ratio stream / memory for the run's own cube and for the default cube (a slower step,
behind which the ingest hides). Target: at least 0.9.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch


def worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from cube.config import from_dict
    from cube.data.split import SplitData
    from cube.eval.metrics import Split
    from cube.job_config import TrainConfig
    from cube.train.loop import build_model, fit
    from jobs.trainer import ShardEpochs

    torch.set_num_threads(1)
    cfg = from_dict(TrainConfig, config["cfg"])
    device = ray.train.torch.get_device()
    split = SplitData(config["split_root"])
    val = split.held_out("val", questions=1000)
    shard = ray.train.get_dataset_shard("train")
    steps = config["rows"] // cfg.optim.batch_size
    out = {}
    for name in ("stream", "memory"):
        model = build_model(cfg.cube, torch.tensor(config["q_mean"]), torch.tensor(config["a_mean"]), device, seed=0)
        seen: list[float] = []
        if name == "stream":
            train = ShardEpochs(shard, cfg.optim.batch_size, steps, 0, 10_000)
        else:  # the same rows, collected once into tensors
            batches = list(shard.iter_torch_batches(batch_size=65_536, dtypes=torch.float32))
            train = Split(torch.cat([b["q_vec"] for b in batches]).to(device),
                          torch.cat([b["a_vec"] for b in batches]).to(device))
        fit(model, train, val, cfg.loss, cfg.optim, steps_per_epoch=steps,
            on_epoch=lambda end, seen=seen: seen.append(end.metrics["samples_per_s"]))
        out[name] = seen
    # Ray Train keeps only metrics that come with a checkpoint: the rates travel in one
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "rates.json").write_text(json.dumps(out))
        ray.train.report({}, checkpoint=ray.train.Checkpoint.from_directory(d))


def measure(run: Path, rows: int, epochs: int, cube_overrides: list[str], use_gpu: bool = False) -> dict[str, Any]:
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from cube.config import apply_overrides, from_dict, to_dict
    from cube.data.rundir import RunDir
    from cube.job_config import TrainConfig
    from jobs.stages import split_rows

    r = RunDir(run)
    cfg = r.config(TrainConfig)
    overrides = [f"optim.epochs={epochs}", *cube_overrides]
    cfg = from_dict(TrainConfig, apply_overrides(to_dict(cfg), TrainConfig, overrides))
    info = r.split_info()
    split = r.split()
    # the training read of `cube train`
    train = split_rows(split.root, "train", ["q_vec", "a_vec"], cfg.seed, cfg.pipeline).limit(rows)
    trainer = TorchTrainer(worker, train_loop_config={
        "cfg": to_dict(cfg), "split_root": str(Path(split.root).resolve()), "rows": rows,
        "q_mean": info["q_mean"], "a_mean": info["a_mean"]},
        datasets={"train": train}, scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu))
    result = trainer.fit()
    with result.checkpoint.as_directory() as d:
        rates = json.loads((Path(d) / "rates.json").read_text())
    stream, memory = rates["stream"][1:], rates["memory"][1:]
    return {"cube": " ".join(cube_overrides) or "the run's own", "rows": rows,
            "stream_samples_per_s": statistics.median(stream), "memory_samples_per_s": statistics.median(memory),
            "ratio": statistics.median(stream) / statistics.median(memory)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a `cube train` run folder (its split is read)")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import ray

    from jobs.common import ensure_ray, setup_logging

    setup_logging()
    ensure_ray()
    from cube.model import CubeConfig

    default = [f"cube.{k}={v}" for k, v in dataclasses.asdict(CubeConfig()).items()]
    rows = [measure(args.run, args.rows, args.epochs, []),
            measure(args.run, min(args.rows, 20_000), args.epochs, default)]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
