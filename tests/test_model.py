"""Stacked hourglass with AAM (method.md section 3): shapes, exact parameter counts (3.7), E2H routing (3.6),
CoordConv channels (3.4), activations (3.5), input validation and official-checkpoint key filtering (3.8.1)."""

from __future__ import annotations

import math

import pytest
import torch

from flare.models.hourglass import (
    BOUNDARY_THRESHOLD,
    ConvBlock,
    CoordConv,
    Residual,
    StackedHourglass,
    coord_channels,
    load_official_state_dict,
    stacked_hourglass,
)
from flare.models.layouts import COFW29, W300_68, WFLW98

SMALL = {"num_stacks": 2, "channels": 32, "input_size": 64}


def _run(model: torch.nn.Module, batch: int = 2, size: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("layout, n, e", [(COFW29, 29, 7), (W300_68, 68, 9), (WFLW98, 98, 9)])
def test_forward_shapes(layout, n, e):
    torch.manual_seed(0)
    model = stacked_hourglass(layout, **SMALL)
    outs = _run(model)
    assert len(outs) == 2
    for out in outs:
        assert out.heatmaps.shape == (2, n, 16, 16)
        assert out.fused.shape == (2, n, 16, 16)
        assert out.points.shape == (2, n, 16, 16)
        assert out.edges.shape == (2, e, 16, 16)
        assert torch.isfinite(out.fused).all()
        assert ((out.points > 0) & (out.points < 1)).all() and ((out.edges > 0) & (out.edges < 1)).all()


def test_forward_without_aam_and_other_sizes():
    torch.manual_seed(0)
    model = stacked_hourglass(WFLW98, aam=False, num_stacks=1, channels=16, input_size=128, depth=2)
    (out,) = _run(model, batch=1, size=128)
    assert out.heatmaps.shape == (1, 98, 32, 32)
    assert out.points is None and out.edges is None
    assert out.fused is out.heatmaps
    assert not hasattr(model, "e2h_transform")


# method.md 3.7: independent analytic counts of the "used" parameters (official registered minus dead skips).
@pytest.mark.parametrize(
    "layout, aam, expected",
    [(WFLW98, True, 13_476_468), (W300_68, True, 13_368_708), (COFW29, True, 13_225_028),
     (WFLW98, False, 13_282_760)],
)
def test_full_size_parameter_counts(layout, aam, expected):
    model = stacked_hourglass(layout, aam=aam)  # instantiate only, no forward
    assert sum(p.numel() for p in model.parameters()) == expected
    # The official network also registers 3,700,864 dead identity-skip parameters (3.7, 3.8.1):
    # 56 Res(256->256) and 1 Res(128->128) blocks with a 1x1 conv + bias each.
    identity = [m for m in model.modules() if isinstance(m, Residual) and m.skip_layer is None]
    dead = sum(m.in_channels * m.out_channels + m.out_channels for m in identity)
    assert dead == 56 * (256 * 256 + 256) + (128 * 128 + 128) == 3_700_864


def test_coordconv_input_widths():
    model = stacked_hourglass(WFLW98, **SMALL)
    assert model.pre[0].conv.weight.shape == (64, 6, 7, 7)  # 3 + ramp_H, ramp_W, r
    assert model.hgs[0].coordconv.conv.weight.shape == (32, 35, 1, 1)  # f + 3
    assert model.hgs[1].coordconv.conv.weight.shape == (32, 37, 1, 1)  # f + 5 boundary channels
    assert model.hgs[0].low2.coordconv is None  # only the outermost hourglass level has a CoordConv


def test_coord_channels_order_and_boundary():
    x = torch.zeros(1, 4, 3, 5)  # H = 3 rows, W = 5 columns
    heat = torch.zeros(1, 2, 3, 5)
    heat[0, 1, 2, 4] = 0.5  # last landmark above 0.05 at (row 2, col 4)
    heat[0, 1, 0, 0] = 0.04  # below the threshold
    heat[0, 0] = 1.0  # other landmarks never matter
    c = coord_channels(x, heat)
    assert c.shape == (1, 5, 3, 5)
    torch.testing.assert_close(c[0, 0, :, 2], torch.tensor([-1.0, 0.0, 1.0]))  # ramp along H (rows)
    torch.testing.assert_close(c[0, 1, 1, :], torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]))  # ramp along W
    assert c[0, 2, 0, 0].item() == pytest.approx(1.0)  # r / max at a corner
    assert c[0, 2, 1, 2].item() == pytest.approx(0.0)  # centre
    assert c[0, 2, 0, 1].item() == pytest.approx(math.sqrt(1 + 0.25) / math.sqrt(2))
    expected_bh = torch.zeros(3, 5)
    expected_bh[2, 4] = 1.0
    expected_bw = torch.zeros(3, 5)
    expected_bw[2, 4] = 1.0
    torch.testing.assert_close(c[0, 3], expected_bh)
    torch.testing.assert_close(c[0, 4], expected_bw)
    assert coord_channels(x).shape == (1, 3, 3, 5)


def test_e2h_buffers_and_mask_routing():
    torch.manual_seed(0)
    model = stacked_hourglass(WFLW98, **SMALL)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert "e2h_transform.weight" not in params and "e2h_transform.bias" not in params
    w, b = buffers["e2h_transform.weight"], buffers["e2h_transform.bias"]
    assert w.shape == (98, 9, 1, 1) and not w.requires_grad
    # Pupils 96, 97 are in no group (method.md 2.1): zero row, bias 1; point 0 is FaceContour only.
    assert w[96].sum() == 0 and w[97].sum() == 0 and b[96] == 1 and b[97] == 1
    assert w[0, :, 0, 0].tolist() == [1.0] + [0.0] * 8 and b[0] == 0
    assert b.sum() == 2

    for out in _run(model):
        # A landmark in no group gets mask = point.
        torch.testing.assert_close(out.fused[:, 96], out.points[:, 96] * out.heatmaps[:, 96])
        torch.testing.assert_close(out.fused[:, 0], out.edges[:, 0] * out.points[:, 0] * out.heatmaps[:, 0])
        # Eye corner 60 is in RightEye (group 5).
        torch.testing.assert_close(out.fused[:, 60], out.edges[:, 5] * out.points[:, 60] * out.heatmaps[:, 60])


def test_e2h_point_in_two_groups_cofw():
    torch.manual_seed(0)
    model = stacked_hourglass(COFW29, **SMALL)
    out = _run(model)[-1]
    # COFW point 22 lies in LowerLip (5) and UpperLip (6): its E2H sum is edge5 + edge6 (method.md 2.3).
    torch.testing.assert_close(
        out.fused[:, 22], (out.edges[:, 5] + out.edges[:, 6]) * out.points[:, 22] * out.heatmaps[:, 22]
    )
    torch.testing.assert_close(out.fused[:, 28], out.points[:, 28] * out.heatmaps[:, 28])  # in no group


def test_heatmap_activation_sign():
    torch.manual_seed(0)
    star = stacked_hourglass(W300_68, **SMALL)
    for out in _run(star):
        assert (out.heatmaps >= 0).all() and (out.heatmaps > 0).any()
        # InstanceNorm then ReLU: the pre-ReLU map has zero mean, so roughly half the pixels are 0.
        zero_frac = (out.heatmaps == 0).float().mean().item()
        assert 0.2 < zero_frac < 0.8
    torch.manual_seed(0)
    raw = stacked_hourglass(W300_68, heatmap_activation="none", **SMALL)
    outs = _run(raw)
    assert any((o.heatmaps < 0).any() for o in outs)
    for o in outs:  # "multiply" on raw scores is the same product (method.md 3.6 default)
        torch.testing.assert_close(o.fused, raw.e2h_transform(o.edges) * o.points * o.heatmaps)


def test_fusion_modes():
    torch.manual_seed(0)
    log_add = stacked_hourglass(W300_68, heatmap_activation="none", fusion="log_add", **SMALL)
    for o in _run(log_add):
        mask = log_add.e2h_transform(o.edges) * o.points
        torch.testing.assert_close(o.fused, o.heatmaps + torch.log(mask + 1e-6))
    none = stacked_hourglass(W300_68, fusion="none", **SMALL)
    for o in _run(none):
        torch.testing.assert_close(o.fused, o.heatmaps)
        assert o.points is not None


def test_instance_norm_has_no_running_stats():
    torch.manual_seed(0)
    model = stacked_hourglass(W300_68, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        both = model(x)[-1].heatmaps
        first = model(x[:1])[-1].heatmaps
    torch.testing.assert_close(both[:1], first)  # per-instance statistics in eval: batch-independent


def test_every_parameter_receives_a_gradient():
    torch.manual_seed(0)
    model = stacked_hourglass(COFW29, **SMALL)
    outs = model(torch.randn(2, 3, 64, 64))
    loss = sum(o.fused.sum() + o.points.sum() + o.edges.sum() for o in outs)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("size", [32, 63, 96, 100, 320])
def test_invalid_input_size_raises(size):
    with pytest.raises(ValueError):
        StackedHourglass(29, COFW29.e2h_routing(), input_size=size, num_stacks=1, channels=8)


def test_other_invalid_arguments_raise():
    routing = COFW29.e2h_routing()
    with pytest.raises(ValueError):
        StackedHourglass(29, routing, heatmap_activation="softmax")
    with pytest.raises(ValueError):
        StackedHourglass(29, routing, fusion="add")
    with pytest.raises(ValueError):
        StackedHourglass(29, None, aam=True)
    with pytest.raises(ValueError):
        StackedHourglass(29, routing, num_edges=9)
    with pytest.raises(ValueError):
        StackedHourglass(68, routing)
    model = stacked_hourglass(COFW29, **SMALL)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 128, 128))


def test_load_official_state_dict_drops_only_dead_skips():
    torch.manual_seed(0)
    source = stacked_hourglass(COFW29, **SMALL)
    official = {f"module.{k}": v.clone() for k, v in source.state_dict().items()}
    # Add the dead identity-skip convs the official code registers (method.md 3.8.1).
    identity = {n: m.out_channels for n, m in source.named_modules()
                if isinstance(m, Residual) and m.skip_layer is None}
    assert len(identity) == 1 + 2 * 14  # Res(128->128) in the stem + (13 hourglass + 1 feature) per stack
    for name, c in identity.items():
        official[f"module.{name}.skip_layer.conv.weight"] = torch.randn(c, c, 1, 1)
        official[f"module.{name}.skip_layer.conv.bias"] = torch.randn(c)
    assert "module.pre.1.skip_layer.conv.weight" in official  # a real 64->128 skip: kept

    torch.manual_seed(1)
    target = stacked_hourglass(COFW29, **SMALL)
    dropped = load_official_state_dict(target, official)
    assert len(dropped) == 2 * len(identity)
    assert all(".skip_layer." in k for k in dropped) and "pre.1.skip_layer.conv.weight" not in dropped
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v)

    official["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError):
        load_official_state_dict(target, official)


@pytest.mark.parametrize(("kernel", "stride", "boundary", "bn"), [(1, 1, False, False), (1, 1, True, False),
                                                                 (7, 2, False, True), (3, 1, True, False)])
def test_coordconv_split_equals_the_concatenation(kernel, stride, boundary, bn):
    """The coordinate channels' share computed once per forward (CoordConv.forward) is the same function, with the
    same gradients, as one convolution over [x, coordinate channels] (method.md 3.4, CoordConv.reference)."""
    torch.manual_seed(0)
    conv = CoordConv(6, 8, kernel, stride, boundary=boundary, bn=bn, relu=bn).double()
    x = torch.randn(3, 6, 16, 16, dtype=torch.float64, requires_grad=True)
    heat = torch.rand(3, 4, 16, 16, dtype=torch.float64) * 0.1 if boundary else None  # mask on and off
    if heat is not None:
        assert 0 < (heat[:, -1] > BOUNDARY_THRESHOLD).double().mean() < 1
    outs, grads = [], []
    assert conv.training  # the split runs in training; eval mode runs the reference (one Conv for export)
    for fn in (conv, conv.reference):
        conv.zero_grad()
        x.grad = None
        out = fn(x, heat)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in conv.parameters()])
    assert outs[0].shape == (3, 8, 16 // stride, 16 // stride)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    conv.eval()
    torch.testing.assert_close(conv(x, heat), conv.reference(x, heat), rtol=0, atol=0)


def test_coordconv_refuses_a_wrong_width():
    conv = CoordConv(6, 8, 1)
    with pytest.raises(ValueError, match="expects 6 input channels, got 5"):
        conv(torch.zeros(1, 5, 8, 8))


@pytest.mark.parametrize(("cin", "cout", "bn"), [(8, 16, False), (16, 8, True), (6, 68, False)])
def test_pointwise_conv_equals_the_convolution(cin, cout, bn):
    """A 1x1 ConvBlock on a channels_last input (one matrix product over the pixels, the bias in its epilogue)
    is the same function, with the same gradients, as its Conv2d (ConvBlock.reference), in training and eval;
    the output stays channels_last; NCHW inputs and conv modules of another type (int8, QAT) run the module."""
    torch.manual_seed(0)
    block = ConvBlock(cin, cout, 1, bn=bn, relu=bn).double().to(memory_format=torch.channels_last)
    x = torch.randn(3, cin, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    outs, grads = [], []
    for fn in (block, block.reference):
        block.zero_grad()
        x.grad = None
        out = fn(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
    assert outs[0].is_contiguous(memory_format=torch.channels_last)
    # the weight's gradient has the parameter's strides, size-1 dimensions too (DDP's bucket contract)
    block.zero_grad(set_to_none=True)
    block(x).sum().backward()
    assert block.conv.weight.grad.stride() == block.conv.weight.stride() == (cin, 1, cin, cin)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

    def ops(fn, inp):
        seen = []

        class Log(torch.utils._python_dispatch.TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                seen.append(func.overloadpacket.__name__)
                return func(*args, **(kwargs or {}))

        with Log(), torch.no_grad():
            fn(inp)
        return seen

    trained = ops(block, x)
    assert "addmm" in trained and "convolution" not in trained
    if not bn:  # (batch norm counts its batches with an add_)
        assert not {"add", "add_"} & set(trained)  # the bias is added inside the matrix product
    assert "convolution" in ops(block, x.contiguous())  # NCHW input (inference, export): the Conv2d
    block.eval()  # validation on the CUDA fast path: channels_last, as in training
    assert "addmm" in ops(block, x) and "convolution" not in ops(block, x)
    torch.testing.assert_close(block(x), block.reference(x), rtol=1e-12, atol=1e-12)

    class Swapped(torch.nn.Conv2d):  # e.g. a quantization-aware or fused conv put in its place
        pass

    block.conv = Swapped(cin, cout, 1).double().to(memory_format=torch.channels_last)
    assert "convolution" in ops(block, x)


def test_model_with_pointwise_convs_computes_the_same_function(monkeypatch):
    """The model in training on channels_last input, its 1x1 convolutions as matrix products, against the same
    weights and input with every convolution a Conv2d: outputs and gradients, float64. (Gradients are compared
    on the scale of the largest: a conv bias in front of batch norm has a zero gradient up to rounding.)"""
    torch.manual_seed(0)
    model = stacked_hourglass(W300_68, **SMALL).double().train().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    results = []
    for reference in (False, True):
        if reference:
            monkeypatch.setattr(ConvBlock, "forward", ConvBlock.reference)
        model.zero_grad()
        outs = model(x)
        sum((o.fused * (k + 1)).sum() + o.heatmaps.sum() for k, o in enumerate(outs)).backward()
        results.append(([o.fused.detach() for o in outs], [p.grad.clone() for p in model.parameters()]))
        if not reference:  # every gradient has its parameter's strides, size-1 dims too (DDP's bucket contract)
            assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    scale = max(float(g.abs().max()) for g in results[1][1])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10 * scale)
