"""The answer writer (cube/decoder): its config and errors (no Ray), then the shared run's
decoder, trained by `cube decoder` on 2 Ray Train workers, killed after an epoch and resumed:
its record, and whether it writes from the embedding it is given on held-out answers."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import torch
from conftest import DECODER_EPOCHS, ROOT

from cube.decoder import DecoderConfig, load_decoder


def test_decoder_config_refuses_bad_values_and_a_missing_decoder_says_how_to_train_one(tmp_path):
    from cube.job_config import DecoderJobConfig

    with pytest.raises(ValueError, match="prompt_tokens"):
        DecoderConfig(prompt_tokens=0)
    with pytest.raises(ValueError, match="epochs"):
        DecoderJobConfig(epochs=0)
    with pytest.raises(FileNotFoundError, match="cube decoder --run RUN"):
        load_decoder(tmp_path)


@pytest.mark.ray
def test_the_decoder_run_resumed_after_its_driver_was_killed(decoded_run):
    run, interrupted_after = decoded_run
    metrics = pd.read_csv(run / "decoder" / "metrics.csv")
    assert metrics["epoch"].tolist() == list(range(1, DECODER_EPOCHS + 1))  # every epoch once
    resumed = metrics[metrics["resumed_from"] > 0]
    assert len(resumed) and resumed["resumed_from"].min() >= interrupted_after  # at most one epoch lost
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    best = torch.load(run / "decoder" / "model" / "train_state.pt", weights_only=False)["metrics"]
    assert best["epoch"] == DECODER_EPOCHS  # keep=last
    again = subprocess.run([sys.executable, "-m", "jobs.cli", "decoder", "--run", str(run)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "already holds a decoder" in again.stderr.strip().splitlines()[-1]


@pytest.mark.ray
def test_the_decoder_writes_from_the_embedding_it_is_given_on_held_out_answers(decoded_run):
    """On test answers (never trained on), the decoder's loss on each answer is lower after that
    answer's own embedding than after another's, and the text it writes from the true embedding
    is retrieved (by the teacher's embedding of it) no worse than text written from a shuffled one."""
    from cube.data.rundir import RunDir
    from cube.decoder.generation import score_texts
    from cube.teachers.hf import HFTeacher

    run, _ = decoded_run
    decoder = load_decoder(run / "decoder" / "model")
    test = RunDir(run).split().held_out("test")
    true = test.pool
    shuffled = true[torch.roll(torch.arange(len(true)), 1)]
    with torch.no_grad():
        own = [float(decoder.loss(true[i : i + 1], [test.answers[i]])) for i in range(len(true))]
        other = [float(decoder.loss(shuffled[i : i + 1], [test.answers[i]])) for i in range(len(true))]
    gap = torch.tensor(other) - torch.tensor(own)
    assert gap.mean() > 0.05 and (gap > 0).float().mean() > 0.6, (gap.mean(), (gap > 0).float().mean())

    teacher = HFTeacher(RunDir(run).teacher()[0])

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.from_numpy(teacher.embed([t or "." for t in texts]).vectors)

    per_answer = test.sample(len(test))  # the scored texts: one per question, against the whole pool
    rows = per_answer.target
    written = {name: decoder.generate(z[rows], 32)[0] for name, z in (("true", true), ("shuffled", shuffled))}
    scores = {name: score_texts(texts, per_answer, embed, decoder.a_mean) for name, texts in written.items()}
    assert all(t.strip() for t in written["true"][:5]), written["true"][:5]
    assert scores["true"]["mrr"] > scores["shuffled"]["mrr"], scores
