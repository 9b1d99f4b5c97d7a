"""Loss pieces and retrieval metrics (no Ray)."""

import math

import pytest
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


def test_a_non_finite_prediction_ranks_last_and_never_scores():
    pool = torch.eye(4)
    pred = torch.tensor([[float("nan")] * 4, [1.0, 0, 0, float("inf")], [0, 1.0, 0, 0]])
    target = torch.tensor([0, 0, 1])
    assert ranks(pred, pool, target).tolist() == [4, 4, 1]
    m = retrieval_metrics(pred, pool, target)
    want = {"recall@1": 1 / 3, "recall@5": 1.0, "mrr": 1.5 / 3, "cos": -1 / 3, "nonfinite": 2 / 3}
    assert m == pytest.approx(want, rel=1e-6)
    all_nan = retrieval_metrics(torch.full((3, 4), float("nan")), pool, target)
    assert all_nan["mrr"] == 0.25 and all_nan["recall@1"] == 0 and all_nan["cos"] == -1 and all_nan["nonfinite"] == 1


def test_blocked_ranking_agrees_with_dense():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(300, 16, generator=g)
    target = torch.randint(0, 300, (1000,), generator=g)
    pred = pool[target] + 0.8 * torch.randn(1000, 16, generator=g)
    pred[7] = pool[target[7]]  # an exact hit, and a tie against it below
    pool[(target[7] + 1) % 300] = pool[target[7]]
    scores = torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(pool, dim=-1).T
    true = scores.gather(1, target.view(-1, 1))
    dense = 1 + (scores > true).sum(1) + (scores == true).sum(1) - 1  # the dense formula ranks used to be
    for block in (1, 7, 256, 5000):
        assert torch.equal(ranks(pred, pool, target, block=block), dense)
    assert ranks(pred, pool, target)[7] == 2


def test_top_k_in_blocks_is_exact():
    from cube.eval.metrics import top_k

    g = torch.Generator().manual_seed(1)
    keys, queries = torch.randn(500, 8, generator=g), torch.randn(40, 8, generator=g)
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    want = scores.topk(5, dim=1)
    for block in (1, 3, 64):
        got = top_k(queries, keys, 5, block=block)
        torch.testing.assert_close(got[0], want.values)
        assert torch.equal(got[1], want.indices)
