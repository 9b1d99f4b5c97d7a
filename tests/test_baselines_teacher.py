"""Baselines on synthetic data with known structure, and the real bundled teacher (no Ray)."""

import numpy as np
import pytest
import torch

from cube.baselines import Centering, Split, fit_baselines, mlp_hidden_for, ResidualMLP
from cube.metrics import retrieval_metrics
from cube.teacher import Teacher, TeacherConfig, TeacherError, resolve_source


def linear_task(n, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=g)
    q = torch.randn(n, dim, generator=g) + 3.0  # an offset: centring matters
    return Split(q, q @ w + 0.05 * torch.randn(n, dim, generator=g))


def test_ridge_recovers_a_linear_map_and_mean_answer_is_at_chance():
    train, val, test = linear_task(400), linear_task(60, seed=1), linear_task(60, seed=2)
    train.a, val.a, test.a = train.q @ torch.eye(16).roll(1, 0), val.q @ torch.eye(16).roll(1, 0), test.q @ torch.eye(16).roll(1, 0)
    models = fit_baselines(train, val, param_budget=2000)
    c = Centering.fit(train)
    score = {k: retrieval_metrics(p.predict(test.q), c.answers(test.a, p.space), torch.arange(60))["mrr"]
             for k, p in models.items()}
    assert score["ridge_centred"] > 0.95
    assert score["mean_answer"] < 0.2
    assert score["ridge_centred"] > score["identity_centred"]


def test_mlp_width_tracks_the_parameter_budget():
    h = mlp_hidden_for(384, 700_000)
    params = sum(p.numel() for p in ResidualMLP(384, h).parameters())
    assert abs(params - 700_000) / 700_000 < 0.02


def test_bundled_minilm_embeds_locally():
    teacher = Teacher(TeacherConfig(name="minilm", max_length=16))
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
