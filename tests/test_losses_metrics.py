"""Loss pieces and retrieval metrics (no Ray)."""

import math

import torch

from cube.eval.metrics import chance_metrics, ranks, retrieval_metrics
from cube.model import CellularCube, CubeConfig
from cube.train.losses import LossConfig, cube_loss, dialogue_loss, internal_loss, surface_loss


def test_dialogue_loss_prefers_the_matching_answer():
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    right = dialogue_loss(a + 0.01 * torch.randn_like(a), a, 0.05, 1.0)
    wrong = dialogue_loss(a.roll(1, 0), a, 0.05, 1.0)
    assert right < 0.1 < wrong


def test_surface_target_carries_no_gradient():
    back = torch.randn(4, 2, 3, 3, requires_grad=True)
    target = torch.randn(4, 2, 3, 3, requires_grad=True)
    surface_loss(back, target).backward()
    assert back.grad is not None and target.grad is None


def test_internal_loss_is_the_mean_squared_update():
    dx = torch.full((2, 3, 4, 5, 6), 0.5)
    assert math.isclose(internal_loss(dx).item(), 0.25)


def test_total_uses_fixed_weights():
    cfg = LossConfig(dialogue=2.0, surface=0.5, internal=3.0)
    model = CellularCube(CubeConfig(width=4, height=4, depth=3, channels=4, hidden=8, io_channels=1, steps=2), 8)
    q, a = torch.randn(4, 8), torch.randn(4, 8)
    terms = cube_loss(model(q), a, model.encode_face(a), cfg)
    expected = 2.0 * terms["dialogue"] + 0.5 * terms["surface"] + 3.0 * terms["internal"]
    torch.testing.assert_close(terms["total"], expected)
    assert not any(isinstance(p, torch.nn.Parameter) for p in vars(cfg).values())


def test_ranks_and_metrics():
    pool = torch.eye(4)
    pred = torch.tensor([[1.0, 0, 0, 0], [0, 0.2, 1.0, 0], [0, 0, 0, 1.0]])
    target = torch.tensor([0, 1, 3])
    assert ranks(pred, pool, target).tolist() == [1, 2, 1]
    m = retrieval_metrics(pred, pool, target)
    assert math.isclose(m["recall@1"], 2 / 3, rel_tol=1e-6)
    assert math.isclose(m["mrr"], (1 + 0.5 + 1) / 3, rel_tol=1e-6)


def test_ties_count_against_the_prediction():
    pool = torch.ones(5, 3)
    assert ranks(torch.ones(1, 3), pool, torch.tensor([2])).item() == 5


def test_chance_level():
    c = chance_metrics(100)
    assert math.isclose(c["recall@1"], 0.01) and math.isclose(c["recall@5"], 0.05)
    assert 0.05 < c["mrr"] < 0.06
