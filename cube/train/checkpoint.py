"""Checkpoints: safetensors for tensors, JSON for everything else. Nothing is ever unpickled.

A checkpoint folder holds

    model.safetensors     the cube's weights and centring buffers
    config.json           cube config, teacher identity, split seed, epoch and metrics
    train_state.safetensors / train_state.json   (optional) optimiser, scheduler and RNG state
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from cube.config import from_dict
from cube.model import CellularCube, CubeConfig

if TYPE_CHECKING:  # the loop imports nothing of this module; serving loads checkpoints without the loop
    from cube.train.loop import EpochEnd

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, malformed, or made for another teacher."""


def save_checkpoint(folder: str | Path, model: CellularCube, teacher: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write weights + config into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    config = {"format_version": FORMAT_VERSION, "cube": asdict(model.cfg), "embed_dim": model.embed_dim,
              "teacher": teacher, **meta}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} is not a cube checkpoint: {path.name} is missing")
    return json.loads(path.read_text())


def check_teacher(stored: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Refuse to combine vectors from different teachers (or poolings): they are not comparable.

    Raises:
        CheckpointError: listing every field that differs.
    """
    diffs = {
        k: (stored.get(k), expected.get(k)) for k in set(stored) | set(expected) if stored.get(k) != expected.get(k)
    }
    if diffs:
        detail = ", ".join(f"{k}: checkpoint={a!r} vs requested={b!r}" for k, (a, b) in sorted(diffs.items()))
        old = " (it predates the recording of the teacher's backend and dtype)" if "backend" not in stored else ""
        raise CheckpointError(f"{where} was trained with a different teacher ({detail}){old}; "
                              "embed with the checkpoint's teacher settings or retrain")


def load_checkpoint(
    folder: str | Path, expected_teacher: dict[str, Any] | None = None
) -> tuple[CellularCube, dict[str, Any]]:
    """(model in eval mode, config dict).

    Raises:
        CheckpointError: missing files, unknown format, or a teacher mismatch.
    """
    folder = Path(folder)
    config = read_config(folder)
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint format {config.get('format_version')} is not {FORMAT_VERSION}")
    if expected_teacher is not None:
        check_teacher(config["teacher"], expected_teacher, str(folder))
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{folder}: model.safetensors is missing")
    model = CellularCube(from_dict(CubeConfig, config["cube"]), config["embed_dim"])
    model.load_state_dict(load_file(weights))
    model.eval()
    return model, config


def save_train_state(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, Path(folder) / "train_state.safetensors")
    (Path(folder) / "train_state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_train_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    folder = Path(folder)
    if not (folder / "train_state.json").is_file():
        return None
    return load_file(folder / "train_state.safetensors"), json.loads((folder / "train_state.json").read_text())


def publish(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint folder to `dst` atomically (readers never see half a checkpoint)."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    old = dst.with_name(f".{dst.name}.old{os.getpid()}")
    if dst.exists():
        os.replace(dst, old)
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)
    return dst


def save_epoch(folder: str | Path, end: EpochEnd, teacher: dict[str, Any], split_seed: int) -> Path:
    """One resumable checkpoint: weights + config, and the optimiser/scheduler/RNG state."""
    save_checkpoint(
        folder, end.model, teacher, {"split_seed": split_seed, "epoch": end.metrics["epoch"], "val": end.val}
    )
    save_train_state(folder, *end.train_state())
    return Path(folder)
