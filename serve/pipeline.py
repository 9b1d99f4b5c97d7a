"""A loaded run, ready to answer: the cube checkpoint, the answer bank and what describes them.

The CubePredictor deployment wraps one `LoadedRun`; `InProcessPipeline` chains a teacher and a
`LoadedRun` in one process, which is what the benchmark compares HTTP against. No Serve here.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from cube.data.bank import SearchConfig
from cube.data.rundir import RunDir
from cube.data.storage import Storage
from cube.eval.answering import Answer, as_tensor, lattice_activity
from cube.eval.inference import predict
from cube.teachers import load_teacher
from cube.train.checkpoint import load_checkpoint
from serve.bank import load_bank


def teacher_key(identity: dict[str, Any]) -> str:
    """A short fingerprint of a teacher identity: vectors with different keys are not comparable."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def held_out_summary(run: RunDir) -> dict[str, Any] | None:
    """The cube's and the best baseline's held-out metrics from eval.json, if the run has one."""
    path = run.path / "eval.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    best = report.get("best_baseline")
    return {
        "cube": report.get("cube"),
        "best_baseline": best,
        "best_baseline_metrics": report.get("baselines", {}).get(best),
        "chance": report.get("chance"),
        "pool_size": report.get("pool_size"),
        "n_questions": report.get("n_questions"),
        "evaluated_on": report.get("evaluated_on"),
    }


def answers_json(answers: list[Answer]) -> list[dict[str, Any]]:
    return [{"answer": a.answer, "score": a.score} for a in answers]


class Embedded(NamedTuple):
    """What TeacherEmbedder returns for one text, and what CubePredictor takes."""

    vector: np.ndarray  # (E,) raw teacher embedding
    teacher_key: str  # teacher_key() of the teacher that made it
    ms: float  # the forward pass of the batch it ran in
    batch_size: int


class ModelMismatch(RuntimeError):
    """A question vector made by another teacher than the one this run was trained on (during a
    swap between runs of different teachers): the caller should retry."""


class LoadedRun:
    """A served run in memory. Everything is read at start: from a path in place; from a URI
    through a private copy of its small files (the checkpoint and the JSON), removed once read,
    and the answer bank straight from the URI. Nothing is left behind on the replica's node."""

    def __init__(self, run_dir: str | Path, answers: str | None = None, store_folder: str | None = None,
                 device: str = "cpu", search: SearchConfig = SearchConfig()) -> None:
        with Storage.of(run_dir).reading() as path:
            run = RunDir(path)
            run.require("model", "bank.json", "teacher.json")
            self.name = Path(str(run_dir).rstrip("/")).name
            self.run_dir = str(run_dir)
            self.teacher, self.dim = run.teacher()
            self.model, self.checkpoint = load_checkpoint(run.model_dir, expected_teacher=self.teacher.identity())
            self.model.to(device)
            self.bank, self.extra_answers = load_bank(run, self.model.a_mean, answers, store_folder)
            self.bank.index_with(search, prebuilt=run.bank_root())  # the run's saved index where it fits
            self.search = search
            self.version = f"{self.name}@{file_digest(run.model_dir / 'model.safetensors')}"
            self.held_out = held_out_summary(run)
        self.teacher_key = teacher_key(self.teacher.identity())

    def check(self, vectors: np.ndarray, key: str) -> None:
        """Raises ModelMismatch for vectors of another teacher."""
        if key != self.teacher_key or vectors.shape[-1] != self.model.embed_dim:
            raise ModelMismatch(f"question vectors come from another teacher than run {self.version}'s; retry")

    @torch.no_grad()
    def answer(self, vectors: np.ndarray, ks: list[int]) -> list[dict[str, Any]]:
        """(B, E) raw question vectors, one k each → per question: the centred prediction, the
        k best answers, and the batch's cube and search milliseconds."""
        t0 = time.perf_counter()
        pred = predict(self.model, as_tensor(vectors))  # (B, E) centred
        t1 = time.perf_counter()
        ranked = self.bank.top(pred, max(ks))
        t2 = time.perf_counter()
        timings = {"cube": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3}  # for the whole batch
        return [{"vector": p.numpy(), "answers": answers_json(r[:k]), "timings": timings, "batch_size": len(ks),
                 "model_version": self.version} for p, r, k in zip(pred, ranked, ks)]

    def identity(self, vector: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The identity baseline: the question's own embedding against the raw answers."""
        return answers_json(self.bank.top(as_tensor(vector).reshape(1, -1), k, raw=True)[0])

    def trace(self, vector: np.ndarray) -> dict[str, Any]:
        layers = lattice_activity(self.model, vector)  # (D, H, W)
        cfg = self.model.cfg
        return {
            "model_version": self.version,
            "depth": int(layers.shape[0]),
            "height": cfg.height,
            "width": cfg.width,
            "channels": cfg.channels,
            "steps": cfg.steps,
            "lattice": cfg.lattice,
            "skip": cfg.skip,
            "max": float(layers.max()),
            "measure": "mean |state| over channels after the last step; layer 0 holds the question, the last is "
            "read out",
            "layers": np.round(layers, 5).tolist(),
        }

    def info(self) -> dict[str, Any]:
        return {
            "run": self.name,
            "run_dir": self.run_dir,
            "model_version": self.version,
            "teacher": {**self.teacher.identity(), "backend": self.teacher.backend, "dim": self.dim},
            "cube": asdict(self.model.cfg),
            "embed_dim": self.model.embed_dim,
            "checkpoint": {"epoch": self.checkpoint.get("epoch"), "val": self.checkpoint.get("val")},
            "held_out": self.held_out,
            "bank_size": len(self.bank),
            "search": {"kind": self.search.kind, "lists": self.bank.index.nlist if self.bank.index else None,
                       "probes": self.search.probes if self.bank.index else None},
            "extra_answers": self.extra_answers,
        }


class InProcessPipeline:
    """Teacher → cube → bank in this process: the same functions the deployments call."""

    def __init__(self, run_dir: str | Path, device: str = "cpu") -> None:
        self.run = LoadedRun(run_dir, device=device)
        self.embedder = load_teacher(self.run.teacher, device)

    def answer(self, questions: list[str], top_k: int = 1) -> list[dict[str, Any]]:
        vectors = self.embedder.embed(questions).vectors
        return self.run.answer(vectors, [top_k] * len(questions))
