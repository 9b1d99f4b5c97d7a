"""Baselines on synthetic data with known structure, and the real bundled teacher (no Ray)."""

import numpy as np
import pytest
import torch

from cube.eval.baselines import Centering, MLPRecipe, TrainData, fit_baselines, mlp
from cube.eval.metrics import HeldOut, Split, retrieval_metrics
from cube.eval.report import baseline_report
from cube.teachers import HFTeacher, TeacherConfig, TeacherError, resolve_source


def linear_task(n, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g) + 3.0  # an offset: centring matters
    return Split(q, q @ torch.eye(dim).roll(1, 0) + 0.05 * torch.randn(n, dim, generator=g))


def held_out(split: Split) -> HeldOut:
    n = len(split.q)
    return HeldOut(split.q, split.a, torch.arange(n), [f"q{i}" for i in range(n)], [f"a{i}" for i in range(n)])


def test_ridge_recovers_a_linear_map_and_mean_answer_is_at_chance():
    train, val, test = linear_task(400), held_out(linear_task(60, seed=1)), held_out(linear_task(60, seed=2))
    models = fit_baselines(TrainData.in_memory(train), val, seeds=1)
    c = Centering.fit(train)
    score = {k: retrieval_metrics(p[0].predict(test.q), c.answers(test.pool, p[0].space), test.target)["mrr"]
             for k, p in models.items()}
    assert score["ridge_centred"] > 0.95
    assert score["mean_answer"] < 0.2
    assert score["ridge_centred"] > score["identity_centred"]


def nonlinear_task(n, dim=16, seed=0):
    """Answers are a sign-flipped copy of the question: no linear map and no identity ranks them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, dim, generator=g)
    return Split(q, torch.where(q[:, :1] > 0, q, -q.roll(3, 1)) + 0.05 * torch.randn(n, dim, generator=g))


def test_mlp_learns_a_nonlinear_map_picks_its_epochs_on_val_and_averages_seeds():
    train, val, test = nonlinear_task(600), held_out(nonlinear_task(80, seed=1)), held_out(nonlinear_task(80, seed=2))
    recipe = MLPRecipe(hidden=64, epoch_grid=(2, 10))
    preds = mlp(TrainData.in_memory(train), val, "centred", seeds=2, recipe=recipe)
    assert len(preds) == 2 and "epochs=10 (chosen on val)" in preds[0].detail
    report = baseline_report(TrainData.in_memory(train), val, test, seeds=2)
    seed_mrrs = [retrieval_metrics(p.predict(test.q), Centering.fit(train).answers(test.pool, p.space),
                                   test.target)["mrr"] for p in preds]
    assert seed_mrrs[0] != seed_mrrs[1]  # two seeds, two models: the spread reported is a real one
    c = Centering.fit(train)
    mlp_mrr = (
        sum(retrieval_metrics(p.predict(test.q), c.answers(test.pool, p.space), test.target)["mrr"] for p in preds) / 2
    )
    assert mlp_mrr > report["baselines"]["identity_centred"]["mrr"] + 0.2
    assert mlp_mrr > report["baselines"]["ridge_centred"]["mrr"]


def test_bundled_minilm_embeds_locally():
    teacher = HFTeacher(TeacherConfig(name="minilm", max_length=16))
    out = teacher.embed(["Why is the sky blue?", "Rayleigh scattering favours short wavelengths.",
                         "How do I bake bread? " * 20])
    assert out.vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(out.vectors, axis=1), 1.0, rtol=1e-5)
    assert out.truncated.tolist() == [False, False, True]
    sim = out.vectors @ out.vectors.T
    assert sim[0, 1] > sim[0, 2]  # the related answer is closer than the unrelated text


def test_unknown_teacher_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TeacherError, match="Nothing is downloaded"):
        resolve_source("no-such-org/no-such-model")
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(TeacherError, match="has no config.json"):
        resolve_source(str(tmp_path))
