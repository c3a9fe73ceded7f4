"""Stacked hourglass with CoordConv and AAM heads, as in STAR and ADNet (method.md section 3).

One architecture per file, a factory function, no registry. Module names mirror the official
implementation (``pre``, ``hgs``, ``features``, ``out_heatmaps``, ``out_pointmaps``, ``out_edgemaps``,
``merge_*``, ``e2h_transform``; blocks ``bn1/conv1.conv/.../skip_layer.conv``) so that official state dicts
load after :func:`load_official_state_dict` drops the dead identity-skip convolutions (method.md 3.8.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flare.models.layouts import Layout

HEATMAP_ACTIVATIONS = ("in_relu", "none")
FUSIONS = ("multiply", "none", "log_add")
MIN_INPUT, MAX_INPUT = 64, 256
BOUNDARY_THRESHOLD = 0.05  # method.md 3.4 item 4
LOG_ADD_EPS = 1e-6  # method.md 3.6, "log_add" fusion
IN_EPS = 1e-5  # method.md 3.5


def pointwise_conv(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """The 1x1 convolution ``conv`` of a channels_last ``x`` as one matrix product over its pixels,
    (N*H*W, C_in) @ W^T + b: the pixel-major view of a channels_last tensor is contiguous, so there is no copy,
    and the bias is added in the GEMM's epilogue (``addmm``, cuBLASLt on CUDA) instead of a separate pass.
    That pass, a per-channel broadcast add on a channels_last output, ran as a slow generic kernel on the
    H200 (0.38 ms per 128 x 256 x 64 x 64 output, 30 a step; bench/results/gpu/2026-11-27_h200/profile.txt).
    The result is channels_last. The weight matrix is an ``as_strided`` view of the whole parameter, not a
    reshape: its backward then gives the gradient the parameter's own strides, size-1 dimensions included, as
    cudnn's did (DDP compares every stride with its gradient buckets' and warns on a mismatch)."""
    n, c, h, w = x.shape
    weight = conv.weight
    matrix = weight.as_strided((weight.shape[0], c), weight.stride()[:2], weight.storage_offset())
    y = F.linear(x.permute(0, 2, 3, 1).reshape(n * h * w, c), matrix, conv.bias)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


class _GradLikeParam(torch.autograd.Function):
    """Identity whose backward hands the gradient back with the input's own strides (a copy when they differ):
    the gradient of a weight used through several slices is summed with contiguous strides, which for a
    channels_last 1x1 weight differ from the parameter's in the size-1 dims, and DDP warns on that."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, weight: Tensor) -> Tensor:
        ctx.stride = weight.stride()
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        if grad.stride() == ctx.stride:
            return grad
        return torch.empty_strided(grad.shape, ctx.stride, dtype=grad.dtype, device=grad.device).copy_(grad)


def is_pointwise(conv: nn.Module, x: Tensor) -> bool:
    """``conv`` is a plain 1x1 ``nn.Conv2d`` (not a subclass: quantized, QAT or fused modules keep their own
    forward) and ``x`` is channels_last, the layout only the training loop's CUDA fast path uses (its steps and
    validation; inference and export feed NCHW)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1)
            and conv.padding == (0, 0) and conv.dilation == (1, 1) and conv.groups == 1 and x.dim() == 4
            and x.permute(0, 2, 3, 1).is_contiguous())


class ConvBlock(nn.Module):
    """Conv (bias, 'same' padding for odd k) -> optional BN -> optional ReLU. Keys: ``conv``, ``bn``.

    A 1x1 convolution of a channels_last input runs as :func:`pointwise_conv` (the same function and weights,
    the bias fused into the matrix product); NCHW inputs (inference, export) and swapped-in conv modules (int8
    quantization) run :meth:`reference`, the module itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 bn: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              padding=(kernel_size - 1) // 2, bias=True)
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if not is_pointwise(self.conv, x):
            return self.reference(x)
        return self._finish(pointwise_conv(x, self.conv))

    def reference(self, x: Tensor) -> Tensor:
        """The convolution as ``nn.Conv2d`` (cudnn adds the bias in a pass of its own)."""
        return self._finish(self.conv(x))

    def _finish(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class Residual(nn.Module):
    """Pre-activation bottleneck Res(in -> out), mid = out/2 (method.md 3.2).

    The 1x1 skip convolution exists only when in != out (no dead identity-skip conv, 3.8.1).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = out_channels // 2
        self.in_channels, self.out_channels = in_channels, out_channels
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = ConvBlock(in_channels, mid, 1)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = ConvBlock(mid, mid, 3)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = ConvBlock(mid, out_channels, 1)
        self.skip_layer = ConvBlock(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        skip = x if self.skip_layer is None else self.skip_layer(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + skip


def coord_channels(x: Tensor, boundary_heat: Tensor | None = None) -> Tensor:
    """CoordConv extra channels for ``x`` (B, C, H, W) in the checkpoint order of method.md 3.4:
    ramp along H (2*row/(H-1) - 1), ramp along W, r = sqrt(ramp_H^2 + ramp_W^2)/max, and, when
    ``boundary_heat`` (B, N, H, W) is given, the two ramps masked by [clamp(heat[:, N-1], 0, 1) > 0.05].

    Ramp sizes come from the tensor shape (fixes the official size bug, 3.8.2). Returns (B, 3 or 5, H, W).
    """
    b, _, h, w = x.shape
    ramp_h = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    ramp_w = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    r = torch.sqrt(ramp_h * ramp_h + ramp_w * ramp_w)
    r = r / r.amax()
    channels = [ramp_h, ramp_w, r]
    if boundary_heat is not None:
        on = boundary_heat[:, -1:].clamp(0.0, 1.0) > BOUNDARY_THRESHOLD
        zero = torch.zeros((), device=x.device, dtype=x.dtype)
        channels += [torch.where(on, ramp_h, zero), torch.where(on, ramp_w, zero)]
    return torch.cat(channels, dim=1)


class CoordConv(nn.Module):
    """Conv over [x, coordinate channels] (method.md 3.4); 3 extra channels, 5 with ``boundary``.

    Keys: ``conv`` (+ ``bn``). Carries no parameters beyond the convolution (and optional BN).

    The convolution is linear, so it runs as conv(x, W_x) plus the coordinate channels' share, and that
    share is computed once per forward, not per sample: the ramps are the same for every image, so
    conv(ramps, W_c) + bias is one (1, out, h, w) map; the boundary channels of a 1x1 conv are
    mask[b] * conv(ramp_H, ramp_W; W_b) (the mask is a per-pixel scalar). Same function and weights as the
    concatenation, without the (B, C + 5, H, W) copy, its layout conversion and cudnn's channel padding to a
    multiple of 8 (bench/results/gpu profile). Training runs the split; eval mode runs :meth:`reference`, the
    concatenation, so inference and export keep one Conv with the checkpoint's weight (int8 quantization
    needs it).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 boundary: bool = False, bn: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.boundary = boundary
        extra = 5 if boundary else 3
        self.conv = nn.Conv2d(in_channels + extra, out_channels, kernel_size, stride,
                              padding=(kernel_size - 1) // 2, bias=True)
        self.bn = nn.BatchNorm2d(out_channels) if bn else None
        self.relu = relu

    def forward(self, x: Tensor, boundary_heat: Tensor | None = None) -> Tensor:
        if self.boundary != (boundary_heat is not None):
            raise ValueError(f"CoordConv(boundary={self.boundary}) needs boundary_heat iff boundary")
        conv, c = self.conv, x.shape[1]
        w = conv.weight
        if c + (5 if self.boundary else 3) != w.shape[1]:
            raise ValueError(f"CoordConv expects {w.shape[1] - (5 if self.boundary else 3)} input channels, got {c}")
        if not self.training:
            return self.reference(x, boundary_heat)
        ramps = coord_channels(x[:1])  # (1, 3, H, W): the same for every image
        w = _GradLikeParam.apply(w)  # its slices' summed gradient gets the parameter's strides back
        out = F.conv2d(x, w[:, :c], None, conv.stride, conv.padding)
        out = out + F.conv2d(ramps, w[:, c:c + 3], conv.bias, conv.stride, conv.padding)
        if boundary_heat is not None:
            on = (boundary_heat[:, -1:].clamp(0.0, 1.0) > BOUNDARY_THRESHOLD).to(out.dtype)
            if conv.kernel_size == (1, 1) and conv.stride == (1, 1):
                out = torch.addcmul(out, on, F.conv2d(ramps[:, :2], w[:, c + 3:]).to(out.dtype))
            else:
                out = out + F.conv2d(on * ramps[:, :2], w[:, c + 3:], None, conv.stride, conv.padding)
        return self._finish(out)

    def reference(self, x: Tensor, boundary_heat: Tensor | None = None) -> Tensor:
        """method.md 3.4 as written: one convolution over the concatenation [x, coordinate channels]."""
        return self._finish(self.conv(torch.cat([x, coord_channels(x, boundary_heat)], dim=1)))

    def _finish(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class Hourglass(nn.Module):
    """HG(n, f) of method.md 3.3: 3n + 1 residual blocks, n max-poolings, nearest x2 upsampling.

    ``coord`` prepends the 1x1 CoordConv(f + 3 or f + 5 -> f) of the stack input (3.1); ``boundary``
    selects the 5-channel variant used by stacks >= 1.
    """

    def __init__(self, depth: int, channels: int, coord: bool = False, boundary: bool = False) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"hourglass depth must be >= 1, got {depth}")
        self.depth = depth
        self.coordconv = CoordConv(channels, channels, 1, boundary=boundary) if coord else None
        self.up1 = Residual(channels, channels)
        self.low1 = Residual(channels, channels)
        self.low2 = Hourglass(depth - 1, channels) if depth > 1 else Residual(channels, channels)
        self.low3 = Residual(channels, channels)

    def forward(self, x: Tensor, boundary_heat: Tensor | None = None) -> Tensor:
        if self.coordconv is not None:
            x = self.coordconv(x, boundary_heat)
        up = self.up1(x)
        low = self.low3(self.low2(self.low1(F.max_pool2d(x, 2, 2))))
        return up + F.interpolate(low, scale_factor=2.0, mode="nearest")


class E2HTransform(nn.Module):
    """Fixed edge-to-heatmap routing (method.md 3.6): E2H(edge)_n = sum_e R[n, e] edge_e + b_n.

    R (N, E) and b (N,) are buffers (``weight`` stored as (N, E, 1, 1), ``bias`` (N,)), never parameters.
    """

    def __init__(self, routing: np.ndarray, bias: np.ndarray) -> None:
        super().__init__()
        r = torch.as_tensor(np.asarray(routing, dtype=np.float32))
        b = torch.as_tensor(np.asarray(bias, dtype=np.float32))
        if r.ndim != 2 or b.shape != (r.shape[0],):
            raise ValueError(f"routing must be (N, E) and bias (N,), got {tuple(r.shape)} and {tuple(b.shape)}")
        self.register_buffer("weight", r.reshape(r.shape[0], r.shape[1], 1, 1).clone())
        self.register_buffer("bias", b.clone())

    def forward(self, edges: Tensor) -> Tensor:
        return F.conv2d(edges, self.weight.to(edges.dtype), self.bias.to(edges.dtype))


@dataclass
class StackOutput:
    """Per-stack outputs (B, ., h, w). ``heatmaps``: activated, unfused heat (3.5). ``fused``: the map the
    landmark loss and the decoder read (AAM fusion of 3.6, or ``heatmaps`` when AAM/fusion is off).
    ``points``/``edges``: sigmoid AAM heads, None without AAM."""

    heatmaps: Tensor
    fused: Tensor
    points: Tensor | None = None
    edges: Tensor | None = None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class StackedHourglass(nn.Module):
    """K-stack hourglass with CoordConv and AAM (method.md 3.1).

    Args:
        num_points: N landmarks.
        routing: (R (N, E), bias (N,)) E2H routing (``Layout.e2h_routing()``); required when ``aam``.
        num_edges: E; inferred from ``routing`` when 0, else must match it.
        num_stacks, channels, depth: K, f and n of the hourglass.
        input_size: S in [64, 256], divisible by 4 * 2**depth; the heatmap side is S/4.
        aam: build the point/edge heads, their merges and the E2H mask.
        heatmap_activation: "in_relu" (STAR) or "none" (RwSA raw scores), 3.5.
        fusion: "multiply", "none" or "log_add" (3.6); ignored without AAM.
    """

    def __init__(self, num_points: int, routing: tuple[np.ndarray, np.ndarray] | None = None,
                 num_edges: int = 0, num_stacks: int = 4, channels: int = 256, depth: int = 4,
                 input_size: int = 256, aam: bool = True, heatmap_activation: str = "in_relu",
                 fusion: str = "multiply") -> None:
        super().__init__()
        _check_choice("heatmap_activation", heatmap_activation, HEATMAP_ACTIVATIONS)
        _check_choice("fusion", fusion, FUSIONS)
        if num_points < 1 or num_stacks < 1 or channels < 2 or channels % 2:
            raise ValueError(f"need num_points >= 1, num_stacks >= 1 and even channels >= 2; got "
                             f"{num_points}, {num_stacks}, {channels}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        multiple = 4 * 2**depth
        if not MIN_INPUT <= input_size <= MAX_INPUT or input_size % multiple:
            raise ValueError(f"input_size must be in [{MIN_INPUT}, {MAX_INPUT}] and divisible by {multiple} "
                             f"(heatmap S/4 pooled {depth} times), got {input_size}")
        self.num_points, self.num_stacks, self.input_size = num_points, num_stacks, input_size
        self.heatmap_size = input_size // 4
        self.aam, self.heatmap_activation, self.fusion = aam, heatmap_activation, fusion
        f = channels

        self.pre = nn.Sequential(
            CoordConv(3, 64, kernel_size=7, stride=2, bn=True, relu=True),
            Residual(64, 128),
            nn.MaxPool2d(2, 2),
            Residual(128, 128),
            Residual(128, f),
        )
        self.hgs = nn.ModuleList(Hourglass(depth, f, coord=True, boundary=i > 0) for i in range(num_stacks))
        self.features = nn.ModuleList(
            nn.Sequential(Residual(f, f), ConvBlock(f, f, 1, bn=True, relu=True)) for _ in range(num_stacks)
        )
        self.out_heatmaps = nn.ModuleList(ConvBlock(f, num_points) for _ in range(num_stacks))
        self.merge_features = nn.ModuleList(ConvBlock(f, f) for _ in range(num_stacks - 1))
        self.merge_heatmaps = nn.ModuleList(ConvBlock(num_points, f) for _ in range(num_stacks - 1))

        self.num_edges = 0
        if aam:
            if routing is None:
                raise ValueError("aam=True needs the E2H routing (R, bias), e.g. layout.e2h_routing()")
            self.e2h_transform = E2HTransform(*routing)
            n_r, e_r = self.e2h_transform.weight.shape[:2]
            if n_r != num_points or (num_edges and num_edges != e_r) or e_r < 1:
                raise ValueError(f"routing is ({n_r}, {e_r}); expected ({num_points}, {num_edges or 'E >= 1'})")
            self.num_edges = e_r
            self.out_pointmaps = nn.ModuleList(ConvBlock(f, num_points) for _ in range(num_stacks))
            self.out_edgemaps = nn.ModuleList(ConvBlock(f, e_r) for _ in range(num_stacks))
            self.merge_pointmaps = nn.ModuleList(ConvBlock(num_points, f) for _ in range(num_stacks - 1))
            self.merge_edgemaps = nn.ModuleList(ConvBlock(e_r, f) for _ in range(num_stacks - 1))

    def _activate(self, raw: Tensor) -> Tensor:
        """method.md 3.5: ReLU(InstanceNorm(raw)) (no affine, per-instance stats, eps 1e-5) or identity."""
        if self.heatmap_activation == "in_relu":
            return F.relu(F.instance_norm(raw, eps=IN_EPS))
        return raw

    def _fuse(self, heat: Tensor, mask: Tensor) -> Tensor:
        """method.md 3.6: mask * heat, heat + log(mask + 1e-6), or heat unchanged."""
        if self.fusion == "multiply":
            return mask * heat
        if self.fusion == "log_add":
            return heat + torch.log(mask + LOG_ADD_EPS)
        return heat

    def forward(self, x: Tensor) -> list[StackOutput]:
        """x (B, 3, S, S) -> one :class:`StackOutput` per stack, maps of side S/4."""
        s = self.input_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[-2:] != (s, s):
            raise ValueError(f"expected input (B, 3, {s}, {s}), got {tuple(x.shape)}")
        x = self.pre(x)
        outputs: list[StackOutput] = []
        heat: Tensor | None = None
        for i in range(self.num_stacks):
            feature = self.features[i](self.hgs[i](x, heat))
            heat = self._activate(self.out_heatmaps[i](feature))
            points = edges = None
            fused = heat
            if self.aam:
                points = torch.sigmoid(self.out_pointmaps[i](feature))
                edges = torch.sigmoid(self.out_edgemaps[i](feature))
                fused = self._fuse(heat, self.e2h_transform(edges) * points)
            if i < self.num_stacks - 1:
                x = x + self.merge_features[i](feature) + self.merge_heatmaps[i](heat)
                if self.aam:
                    x = x + self.merge_pointmaps[i](points) + self.merge_edgemaps[i](edges)
            outputs.append(StackOutput(heatmaps=heat, fused=fused, points=points, edges=edges))
        return outputs


def stacked_hourglass(layout: Layout, **kwargs) -> StackedHourglass:
    """Build the model for ``layout``: N, E and the E2H routing come from the layout (method.md 2, 3.6)."""
    aam = kwargs.pop("aam", True)
    return StackedHourglass(
        layout.num_points,
        routing=layout.e2h_routing() if aam else None,
        num_edges=layout.num_edges if aam else 0,
        aam=aam,
        **kwargs,
    )


def identity_skip_keys(model: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Keys of ``state_dict`` under ``<block>.skip_layer.`` where ``<block>`` is a :class:`Residual` of
    ``model`` with in == out (the official code's dead skip convolutions, method.md 3.8.1)."""
    identity = {name for name, m in model.named_modules() if isinstance(m, Residual) and m.skip_layer is None}
    dropped = []
    for key in state_dict:
        block, sep, _ = key.partition(".skip_layer.")
        if sep and block in identity:
            dropped.append(key)
    return dropped


def load_official_state_dict(model: StackedHourglass, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load an official STAR/ADNet ``StackedHGNetV1`` state dict (method.md 3.8.1).

    A leading ``module.`` (DDP) prefix is stripped; the ``skip_layer`` keys of identity blocks are dropped by
    an explicit filter; everything else loads strictly (missing or unexpected keys raise). Returns the
    dropped keys.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    dropped = set(identity_skip_keys(model, state_dict))
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in dropped}, strict=True)
    return sorted(dropped)
