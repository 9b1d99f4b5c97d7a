"""The cube itself: shapes, locality, transport, and validation of its config (no Ray)."""

import dataclasses

import pytest
import torch

from cube.model import KERNELS, CellularCube, CubeConfig, count_parameters

SMALL = CubeConfig(width=6, height=5, depth=4, channels=6, hidden=8, io_channels=2, steps=4)


def test_shapes_and_residual_start_at_identity():
    model = CellularCube(SMALL, embed_dim=12).eval()
    q = torch.randn(3, 12)
    out = model(q)
    assert out.pred.shape == (3, 12)
    assert out.back.shape == (3, 2, 5, 6)
    assert out.last_update.shape == (3, 6, 4, 5, 6)
    # zero-initialised decoder + residual: the untrained cube predicts the question itself
    torch.testing.assert_close(out.pred, q)


def test_signal_injected_at_front_reaches_back_after_depth_minus_one_steps():
    model = CellularCube(SMALL, embed_dim=12).eval()
    front = torch.randn(2, SMALL.io_channels, SMALL.height, SMALL.width)
    zeros = torch.zeros_like(front)
    for steps, reaches in ((SMALL.depth - 2, False), (SMALL.depth - 1, True)):
        with torch.no_grad():
            a, _ = model.run_lattice(front, steps=steps)
            b, _ = model.run_lattice(zeros, steps=steps)
        moved = (a[:, :, -1] - b[:, :, -1]).abs().max().item()
        assert (moved > 1e-6) == reaches, (steps, moved)


def test_update_is_local_one_cell_per_step():
    """Perturbing one front cell can only affect cells within `steps` hops (3×3×3 rule)."""
    cfg = CubeConfig(width=9, height=9, depth=4, channels=4, hidden=8, io_channels=1, steps=3, transport_init=True)
    model = CellularCube(cfg, embed_dim=4).eval()
    with torch.no_grad():
        for p in model.rule.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a generic (non-zero) rule
        front = torch.zeros(1, 1, 9, 9)
        poked = front.clone()
        poked[0, 0, 4, 4] = 1.0
        a, _ = model.run_lattice(front, steps=2)
        b, _ = model.run_lattice(poked, steps=2)
    changed = (a - b).abs().sum(dim=1)[0] > 1e-7  # (D, H, W)
    zs, ys, xs = changed.nonzero(as_tuple=True)
    assert changed.any()
    assert zs.max() <= 2 and (ys - 4).abs().max() <= 2 and (xs - 4).abs().max() <= 2


def test_all_cells_share_one_rule():
    model = CellularCube(CubeConfig(), embed_dim=384)
    rule_params = count_parameters(model.rule)
    assert rule_params < 20_000  # one small rule, not one per cell (2,475 cells)
    # One rule for every cell means the update commutes with a shift of the lattice (away from its
    # borders): a per-cell rule would not.
    torch.manual_seed(0)
    for p in model.rule.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 8, 6, 9, 9)
    with torch.no_grad():
        shifted = model.rule(x.roll(1, dims=3))
        torch.testing.assert_close(shifted[..., 2:-2, 2:-2], model.rule(x).roll(1, dims=3)[..., 2:-2, 2:-2])


def test_gradient_reaches_the_rule_through_the_lattice():
    model = CellularCube(SMALL, embed_dim=12)
    with torch.no_grad():
        model.decoder.weight.normal_(0, 0.1)
    model(torch.randn(4, 12)).pred.pow(2).sum().backward()
    assert model.rule.perceive.weight.grad.abs().sum() > 0
    assert model.encoder.weight.grad.abs().sum() > 0


def test_fire_mask_is_stochastic_in_training_and_deterministic_in_eval():
    cfg = CubeConfig(width=5, height=5, depth=3, channels=4, hidden=8, io_channels=1, steps=3, fire_rate=0.5)
    model = CellularCube(cfg, embed_dim=8)
    with torch.no_grad():
        model.decoder.weight.normal_(0, 0.1)
    q = torch.randn(2, 8)
    model.train()
    assert not torch.equal(model(q).pred, model(q).pred)
    model.eval()
    assert torch.equal(model(q).pred, model(q).pred)


@pytest.mark.parametrize("bad, match", [
    ({"steps": 3, "depth": 11}, "never reach the back"),
    ({"io_channels": 9, "channels": 8}, "cannot exceed"),
    ({"fire_rate": 0.0}, "fire_rate"),
    ({"perception": "sobel"}, "transport_init"),
    ({"width": 0}, "width"),
])
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        CubeConfig(**bad)


def test_sobel_perception_runs_without_transport():
    cfg = CubeConfig(width=5, height=5, depth=3, channels=4, hidden=8, io_channels=1, steps=3,
                     perception="sobel", transport_init=False)
    out = CellularCube(cfg, embed_dim=8)(torch.randn(2, 8))
    assert out.pred.shape == (2, 8)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "conv3d"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_lattice_kernels_compute_the_same_rule(kernel, channels_last):
    """The GPU's conv formulations are the conv3d rule: outputs and every gradient agree to
    float64 rounding, on a trained-looking rule and an asymmetric cube."""
    torch.manual_seed(0)
    model = CellularCube(SMALL, embed_dim=8).double()
    with torch.no_grad():
        for p in model.rule.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, SMALL.channels, SMALL.depth, SMALL.height, SMALL.width, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn_like(x)

    def run(k: str):
        model.use_kernel(k).zero_grad()
        xi = x.clone().requires_grad_()
        y = model.rule(xi)
        (y * weight).sum().backward()
        return [y.detach(), xi.grad] + [p.grad.clone() for p in model.rule.parameters()]

    for got, want in zip(run(kernel), run("conv3d")):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert run(kernel)[0].is_contiguous(memory_format=torch.channels_last_3d)


def test_lattice_kernel_refusals():
    with pytest.raises(ValueError, match="one of"):
        CellularCube(SMALL, embed_dim=8).use_kernel("winograd")
    sobel = CellularCube(dataclasses.replace(SMALL, perception="sobel", transport_init=False), embed_dim=8)
    with pytest.raises(ValueError, match="only with kernel='conv3d'"):
        sobel.use_kernel("conv2d")


def test_steps_jitter_varies_training_steps_only():
    cfg = CubeConfig(width=5, height=5, depth=3, channels=4, hidden=8, io_channels=1, steps=3, steps_jitter=2)
    model = CellularCube(cfg, embed_dim=16)
    calls: list[int] = []
    model.rule.register_forward_hook(lambda *_: calls.append(1))

    def steps_taken() -> int:
        calls.clear()
        model(torch.randn(2, 16))
        return len(calls)

    torch.manual_seed(0)
    model.train()
    seen = {steps_taken() for _ in range(30)}
    assert seen == {3, 4, 5}
    model.eval()
    assert {steps_taken() for _ in range(5)} == {3}


def test_mlp_adapter_with_the_lattice_off_is_a_residual_mlp_of_the_face_width():
    """The ablation that says what the lattice adds: same adapters, nothing in between."""
    torch.manual_seed(0)
    cfg = CubeConfig(width=4, height=3, depth=4, channels=4, hidden=8, io_channels=2, steps=4, adapter="mlp",
                     normalize_input=True, lattice=False)
    model = CellularCube(cfg, 16).eval()
    with torch.no_grad():
        model.decoder.weight.normal_(0, 0.1)
    q = torch.randn(5, 16)
    qn = torch.nn.functional.normalize(q, dim=-1)
    hidden = torch.nn.functional.gelu(
        model.encoder[1](torch.nn.functional.layer_norm(qn, (16,), model.encoder[0].weight, model.encoder[0].bias))
    )
    torch.testing.assert_close(model(q).pred, qn + model.decoder(hidden))
    with_lattice = CellularCube(dataclasses.replace(cfg, lattice=True), 16).eval()
    with_lattice.load_state_dict(model.state_dict())
    assert not torch.allclose(with_lattice(q).pred, model(q).pred)  # the lattice sits between them


def test_normalize_input_makes_the_prediction_scale_free():
    torch.manual_seed(0)
    model = CellularCube(CubeConfig(width=4, height=4, depth=3, channels=4, hidden=8, io_channels=2, steps=3,
                                    normalize_input=True), 12).eval()
    q = torch.randn(3, 12)
    torch.testing.assert_close(model(q).pred, model(7.0 * q).pred)


def test_skip_adds_the_lattice_to_a_direct_map_and_its_ablation_is_the_direct_map_alone():
    """skip=True: pred = skip(front) + decoder(back) (+ question). Untrained, the back face's
    decoder is zero, so the cube starts as its own ablation; with the lattice off, the decoder
    is frozen and the prediction is the direct path alone."""
    torch.manual_seed(0)
    cfg = CubeConfig(width=4, height=3, depth=4, channels=4, hidden=8, io_channels=2, steps=4, adapter="mlp",
                     skip=True)
    model = CellularCube(cfg, 16).eval()
    with torch.no_grad():
        model.skip.weight.normal_(0, 0.1)
    q = torch.randn(5, 16)
    front = model.encode_face(q).flatten(1)
    torch.testing.assert_close(model(q).pred, q + model.skip(front))  # the lattice's share starts at zero
    with torch.no_grad():
        model.decoder.weight.normal_(0, 0.1)
    back = model(q).back.flatten(1)
    torch.testing.assert_close(model(q).pred, q + model.skip(front) + model.decoder(back))
    model.train()
    model(q).pred.pow(2).sum().backward()
    assert model.rule.perceive.weight.grad.abs().sum() > 0 and model.skip.weight.grad.abs().sum() > 0

    off = CellularCube(dataclasses.replace(cfg, lattice=False), 16).eval()
    off.load_state_dict(model.state_dict())
    torch.testing.assert_close(off(q).pred, q + off.skip(front))
    assert not off.decoder.weight.requires_grad and not any(p.requires_grad for p in off.rule.parameters())

    # which decoders start at zero: the back face's with residual or skip, the skip's with residual
    plain = CellularCube(dataclasses.replace(cfg, skip=False, residual=False), 16)
    assert plain.decoder.weight.abs().sum() > 0
    direct = CellularCube(dataclasses.replace(cfg, residual=False), 16)
    assert direct.decoder.weight.abs().sum() == 0 and direct.skip.weight.abs().sum() > 0
