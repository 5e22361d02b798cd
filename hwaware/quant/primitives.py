"""Quantization primitives in pure torch: the reference every other path is held against.

Shapes: a tensor ``x`` is viewed as ``[C, n]`` by :func:`as_channels` (``C`` = number of scales);
``scale`` and ``zero_point`` are ``[C]`` (``[1]`` for per-tensor).

Rounding is round-half-to-even everywhere (``torch.round`` and the fused fake-quant ops agree).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from hwaware.quant import native
from hwaware.quant.spec import QuantSpec

__all__ = [
    "as_channels",
    "channel_minmax",
    "channel_range",
    "compute_qparams",
    "round_scale",
    "quantize",
    "dequantize",
    "fake_quantize",
    "fake_quantize_learnable",
    "fake_quantize_dynamic",
    "sqnr_db",
]


def as_channels(x: Tensor, spec: QuantSpec) -> Tensor:
    """View ``x`` as ``[C, n]``: one row per scale of ``spec``'s granularity."""
    g = spec.granularity
    if x.dim() == 0:
        raise ValueError(f"cannot quantize a 0-d tensor with granularity {g!r}")
    if g == "per_tensor":
        return x.reshape(1, -1)
    if g == "per_channel":
        return x.reshape(x.shape[0], -1)
    if g == "per_row":
        return x.reshape(-1, x.shape[-1])
    # per_group: contiguous groups along the last (K) dimension
    k = x.shape[-1]
    if k % spec.group_size != 0:
        raise ValueError(
            f"per_group quantization needs the last dimension to be a multiple of group_size={spec.group_size}, "
            f"got shape {tuple(x.shape)}"
        )
    return x.reshape(-1, spec.group_size)


def channel_minmax(x2d: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-row ``(min, max)`` of a ``[C, n]`` view, in float32."""
    mn, mx = torch.aminmax(x2d.detach(), dim=1)
    return mn.float(), mx.float()


# Row offsets below this are flushed to exactly 0 (row-wise FBGEMM layout). Adam's weight decay
# drives rarely seen embedding rows geometrically toward 0 (~3e-38 after a few epochs of the
# recipe); their products in a dot interaction are denormal, which x86 computes far more slowly
# (the recipe's bmm interaction slowed down markedly). No model can tell 5e-20 from 0.
OFFSET_FLUSH = 2.0 ** -64


def _flush_offset(offset: Tensor) -> Tensor:
    return torch.where(offset.abs() < OFFSET_FLUSH, torch.zeros_like(offset), offset)


def channel_range(x2d: Tensor, spec: QuantSpec) -> Tuple[Tensor, Tensor]:
    """What :func:`compute_qparams` needs of a ``[C, n]`` view, as cheaply as possible.

    Narrow-range symmetric qparams depend only on ``max|x|``, so ``(-max|x|, max|x|)`` gives
    identical scales; ``abs().amax()`` was much faster than ``aminmax`` on the recipe's activations
    here. Everything else gets the true per-row ``(min, max)``.
    """
    if spec.symmetric and spec.narrow_range:
        a = x2d.detach().abs().amax(dim=1).float()
        return -a, a
    return channel_minmax(x2d)


def round_scale(scale: Tensor, spec: QuantSpec) -> Tensor:
    """Round a float32 scale to what the deployed format stores (``spec.scale_dtype``), kept float32."""
    if spec.scale_dtype == "float16":
        tiny = torch.finfo(torch.float16).tiny
        return scale.clamp(tiny, torch.finfo(torch.float16).max).half().float()
    return scale


def compute_qparams(min_val: Tensor, max_val: Tensor, spec: QuantSpec) -> Tuple[Tensor, Tensor]:
    """Scale and zero point from observed ranges.

    Returns ``(scale [C] float32, zero_point [C])``. ``zero_point`` is int32 except for the FBGEMM
    row-wise layout (``spec.float_offset``), where it is the float32 row offset (the row minimum).
    Symmetric and integer-affine ranges always contain 0 so that zero is exactly representable.
    """
    min_val = min_val.float()
    max_val = max_val.float()
    eps = torch.finfo(torch.float32).eps
    qmin, qmax = spec.qmin, spec.qmax
    if spec.float_offset:
        scale = round_scale(((max_val - min_val) / (qmax - qmin)).clamp_min(eps), spec)
        offset = min_val
        if spec.scale_dtype == "float16":
            offset = offset.half().float()
        return scale, _flush_offset(offset)
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val))
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val))
    if spec.symmetric:
        # the negative side can use |qmin| levels, the positive side qmax levels
        scale = torch.maximum(-min_neg / (-qmin), max_pos / qmax).clamp_min(eps)
        scale = round_scale(scale, spec)
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = round_scale(((max_pos - min_neg) / (qmax - qmin)).clamp_min(eps), spec)
    zp = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int32)
    return scale, zp


def _bcast(t: Tensor) -> Tensor:
    return t.reshape(-1, 1)


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Integer codes with ``x``'s shape: int8 when symmetric, uint8 when affine (int32 never needed)."""
    x2d = as_channels(x.detach().float(), spec)
    s = _bcast(scale.float())
    if spec.float_offset:
        q = torch.round((x2d - _bcast(zero_point.float())) / s)
    else:
        # x * (1/s), as the fused fake-quant kernels compute it: x / s can round a value one ulp
        # from a half-level to the other code, and then export would pack what QAT never saw
        q = torch.round(x2d * (1.0 / s)) + _bcast(zero_point.float())
    q = q.clamp(spec.qmin, spec.qmax)
    return q.to(torch.int8 if spec.symmetric else torch.uint8).reshape(x.shape)


def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Float32 values from integer codes (inverse of :func:`quantize` up to rounding)."""
    q2d = as_channels(q, spec).float()
    s = _bcast(scale.float())
    if spec.float_offset:
        x = q2d * s + _bcast(zero_point.float())
    else:
        x = (q2d - _bcast(zero_point.float())) * s
    return x.reshape(q.shape)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize-dequantize with a straight-through gradient (zero outside the clipping range).

    Uses torch's fused ``fake_quantize_per_{tensor,channel}_affine`` for integer zero points; the
    FBGEMM float-offset layout has no fused op and is written out (its range is the row's own
    min/max, so nothing is clipped and the plain straight-through estimator is exact).
    """
    shape = x.shape
    x2d = as_channels(x, spec)
    if spec.float_offset:
        s = _bcast(scale.to(x.dtype))
        off = _bcast(zero_point.to(x.dtype))
        xh = torch.round((x2d - off) / s).clamp(spec.qmin, spec.qmax) * s + off
        # forward value exactly xh (x + (xh - x) is not, in float32); gradient 1
        return (xh.detach() + (x2d - x2d.detach())).reshape(shape)
    zp = zero_point.to(torch.int32)
    if x2d.shape[0] == 1 and spec.granularity == "per_tensor":
        y = torch.fake_quantize_per_tensor_affine(x2d, scale.float().reshape(()), zp.reshape(()), spec.qmin, spec.qmax)
    else:
        y = torch.fake_quantize_per_channel_affine(x2d, scale.float(), zp, 0, spec.qmin, spec.qmax)
    return y.reshape(shape)


class _UnclippedFakeQuant(torch.autograd.Function):
    """Quantize-dequantize whose range covers the tensor: nothing clips, so the straight-through
    gradient is exactly the identity and no mask or autograd graph of small ops is needed."""

    @staticmethod
    def forward(ctx, x2d: Tensor, scale: Tensor, zero_point: Optional[Tensor], qmin: int, qmax: int, float_offset: bool,
                exact_offset: bool = False) -> Tensor:
        dtype = x2d.dtype
        if dtype in (torch.float16, torch.bfloat16):
            # in float32, as export quantizes the weight (w.float()) and the fused kernels compute: a
            # bf16-rounded scale let |x / s| reach qmax + 1/2, a code outside the range
            x2d = x2d.float()
        s = scale.to(x2d.dtype).reshape(-1, 1)
        if float_offset:
            off = zero_point.to(x2d.dtype).reshape(-1, 1)
            q = (x2d - off).div_(s).round_()
            if not exact_offset:  # exact fp32 row min/max: q is in [0, qmax (1 + eps)], no clamp needed
                q.clamp_(qmin, qmax)
            y = q.mul_(s).add_(off)
        elif zero_point is None:  # symmetric: zp = 0 changes no value
            # (clamped also with a narrow range from the tensor's own max|x|: an fp16 scale saturated
            # at its maximum no longer covers that max)
            y = (x2d * (1.0 / s)).round_().clamp_(qmin, qmax).mul_(s)
        else:
            # same arithmetic, in the same order, as torch's fused fake-quant kernels: round(x * (1/s)) + zp
            zp = zero_point.to(x2d.dtype).reshape(-1, 1)
            y = (x2d * (1.0 / s)).round_().add_(zp).clamp_(qmin, qmax).sub_(zp).mul_(s)
        return y if y.dtype == dtype else y.to(dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None, None, None, None, None, None


class _Identity(torch.autograd.Function):
    """Forward: a value computed elsewhere (``y``); backward: straight through to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def fake_quantize_dynamic(x: Tensor, spec: QuantSpec) -> Tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """Fake-quantize ``x`` with qparams computed from ``x`` itself (per-token activations,
    gathered embedding rows, weights tracked each step), in as few ops as possible.

    Returns ``(y, scale, zero_point, stat)``: ``y`` equals ``fake_quantize(x, scale, zero_point)``
    with ``compute_qparams`` of ``x``'s range, exactly; ``zero_point`` is None when symmetric (0);
    ``stat`` holds the per-row range statistic, for a deferred NaN/inf check.
    """
    x2d = as_channels(x, spec)
    if spec.symmetric and spec.narrow_range:
        res = native.fq_sym_rows(x2d, spec.qmax, spec.scale_dtype == "float16")
        if res is not None:  # one C call, same values (see hwaware/quant/native.py)
            y, scale = res
            return _Identity.apply(x2d, y).reshape(x.shape), scale, None, scale
        # narrow-range symmetric qparams depend only on max|x|: identical to compute_qparams
        a = x2d.detach().abs().amax(dim=1).float()
        scale = round_scale((a / spec.qmax).clamp_min_(torch.finfo(torch.float32).eps), spec)
        y = _UnclippedFakeQuant.apply(x2d, scale, None, spec.qmin, spec.qmax, False)
        return y.reshape(x.shape), scale, None, a
    if spec.float_offset:
        res = native.fq_affine_rows(x2d, spec.qmax, spec.scale_dtype == "float16")
        if res is not None:
            y, scale, offset = res
            return _Identity.apply(x2d, y).reshape(x.shape), scale, offset, scale
        # FBGEMM row-wise (embedding rows): compute_qparams' arithmetic written out on [C, 1]
        # shapes, since a CTR step runs this once per table on small tensors (op count matters)
        mn, mx = torch.aminmax(x2d.detach().float(), dim=1, keepdim=True)  # (float32 qparams, as packed)
        scale = round_scale((mx - mn).div_(spec.qmax - spec.qmin).clamp_min_(torch.finfo(torch.float32).eps), spec)
        offset = _flush_offset(mn.half().float() if spec.scale_dtype == "float16" else mn)
        # a flushed offset is no longer the exact row min: keep the clamp then
        exact = spec.scale_dtype == "float32" and bool((offset == mn).all())
        y = _UnclippedFakeQuant.apply(x2d, scale, offset, spec.qmin, spec.qmax, True, exact)
        return y.reshape(x.shape), scale.reshape(-1), offset.reshape(-1), scale  # NaN/inf reach the scale
    mn, mx = channel_minmax(x2d)
    scale, zp = compute_qparams(mn, mx, spec)
    zp = None if spec.symmetric else zp
    y = _UnclippedFakeQuant.apply(x2d, scale, zp, spec.qmin, spec.qmax, spec.float_offset)
    return y.reshape(x.shape), scale, zp, mx - mn


def fake_quantize_learnable(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """LSQ fake quantization: gradients flow to ``x`` (straight-through) and to ``scale``.

    The scale gradient is scaled by ``1/sqrt(n * qmax)`` (n = values per scale), as in Esser et al.
    """
    shape = x.shape
    x2d = as_channels(x, spec)
    grad_factor = 1.0 / math.sqrt(x2d.shape[1] * spec.qmax)
    s = scale
    if spec.scale_dtype == "float16":  # store-exact scale, straight-through for its rounding
        s = s + (round_scale(s.detach(), spec) - s.detach())
    zp = zero_point.float()
    if spec.granularity == "per_tensor":
        y = torch._fake_quantize_learnable_per_tensor_affine(x2d, s.reshape(1), zp.reshape(1), spec.qmin, spec.qmax, grad_factor)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(x2d, s, zp, 0, spec.qmin, spec.qmax, grad_factor)
    return y.reshape(shape)


def sqnr_db(reference: Tensor, approx: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``20 log10(||ref|| / ||ref - approx||)``."""
    ref = reference.detach().double()
    err = (ref - approx.detach().double()).norm()
    if err == 0:
        return math.inf
    return float(20.0 * torch.log10(ref.norm() / err))
