"""Pure-torch references for the ``hwaware::*`` ops: every kernel (CPU, Triton) is tested against these.

They favour obviously-right arithmetic over speed: integer matmuls are exact (float64 holds every
int8 x int8 dot product up to K = 2^37 / 127^2 exactly), dequantization goes through
:mod:`hwaware.ops.packing`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from hwaware.ops.packing import decompress_24, dequantize_int4_weight, dequantize_rowwise

__all__ = ["quantize_per_token_ref", "int8_linear_ref", "w8a8_epilogue_ref", "int4_linear_ref", "embedding_bag_rowwise_ref",
           "sparse24_linear_ref", "dot_interaction_ref", "dot_interaction_backward_ref", "EMBEDDING_BAG_MODES"]

EMBEDDING_BAG_MODES = {0: "sum", 1: "mean", 2: "max"}


def quantize_per_token_ref(x2d: Tensor):
    """Dynamic symmetric per-token int8: ``(q int8 [M, K] in [-127, 127], scale float32 [M])``.

    ``scale = max|x_m| / 127`` (eps-clamped, as ``compute_qparams``), ``q = round_half_even(x * (1/scale))``.
    """
    x = x2d.float()
    scale = (x.abs().amax(dim=1) / 127.0).clamp_min(torch.finfo(torch.float32).eps)
    q = torch.round(x * (1.0 / scale)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_linear_ref(x: Tensor, qweight: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """W8A8: per-token int8 ``x`` times per-channel int8 ``qweight [N, K]``, exact integer accumulate.

    ``out = (q_x @ q_w^T) * s_x[:, None] * s_w[None, :] + bias``, cast to ``x.dtype``, shape ``[..., N]``.
    """
    k = x.shape[-1]
    qx, sx = quantize_per_token_ref(x.reshape(-1, k))
    acc = qx.double() @ qweight.double().t()  # exact: |acc| <= K * 127^2 << 2^53
    return w8a8_epilogue_ref(acc, sx, w_scale, bias).to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def w8a8_epilogue_ref(acc: Tensor, sx: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """float64 ``acc * sx[:, None] * w_scale[None, :] (+ bias)`` for an exact integer accumulator ``acc [M, N]``."""
    out = acc.double() * sx.double()[:, None] * w_scale.double()[None, :]
    return out if bias is None else out + bias.double()


def int4_linear_ref(x: Tensor, packed: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
                    bias: Optional[Tensor] = None) -> Tensor:
    """Weight-only int4: ``x @ dequant(W)^T + bias`` with ``dequant(W) = (q - zp) * s`` per group (fp32 math)."""
    w = dequantize_int4_weight(packed, scales, zeros, group_size)
    out = F.linear(x.float(), w, None if bias is None else bias.float())
    return out.to(x.dtype)


def embedding_bag_rowwise_ref(weight_fused: Tensor, bits: int, dim: int, indices: Tensor, offsets: Tensor, mode: int,
                              per_sample_weights: Optional[Tensor] = None, include_last_offset: bool = False) -> Tensor:
    """``F.embedding_bag`` on the dequantized FBGEMM row-wise table (mode 0 sum, 1 mean, 2 max)."""
    table = dequantize_rowwise(weight_fused, bits, dim)
    return F.embedding_bag(indices, table, offsets, mode=EMBEDDING_BAG_MODES[mode],
                           per_sample_weights=per_sample_weights, include_last_offset=include_last_offset)


def sparse24_linear_ref(x: Tensor, values: Tensor, meta: Tensor, w_scale: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None) -> Tensor:
    """2:4 compressed weights: the dense weight from :func:`decompress_24`, then ``F.linear`` (float
    values) or :func:`int8_linear_ref` (int8 values with ``w_scale``)."""
    w = decompress_24(values, meta)
    if values.dtype == torch.int8:
        return int8_linear_ref(x, w, w_scale, bias)
    out = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    return out.to(x.dtype)


def _pair_index(nvec: int, device) -> Tensor:
    rows, cols = torch.triu_indices(nvec, nvec, offset=1, device=device)
    return rows * nvec + cols  # flat positions of the strictly upper triangle of [V, V], row-major


def dot_interaction_ref(vectors, pad: int) -> Tensor:
    """DLRM's dot interaction as torch ops: ``cat([x, pairs, zeros(pad)])`` with ``x = vectors[0]`` and
    ``pairs`` the strictly-upper-triangular entries (row-major) of ``S S^T``, ``S = stack(vectors, 1)``."""
    x = vectors[0]
    stacked = torch.stack(list(vectors), dim=1)  # [B, V, D]
    dots = torch.bmm(stacked, stacked.transpose(1, 2))  # [B, V, V]
    pairs = dots.flatten(1).index_select(1, _pair_index(len(vectors), x.device))
    parts = [x, pairs] + ([x.new_zeros(x.shape[0], pad)] if pad else [])
    return torch.cat(parts, dim=1)


def dot_interaction_backward_ref(grad: Tensor, vectors, pad: int):
    """Gradients of :func:`dot_interaction_ref` with respect to each of ``vectors``: with ``G`` the
    symmetric ``[V, V]`` matrix of the pair gradients, ``grad S = G S`` (+ the ``x`` columns' gradient)."""
    nvec = len(vectors)
    batch, dim = vectors[0].shape
    npair = nvec * (nvec - 1) // 2
    g = grad.new_zeros(batch, nvec * nvec)
    g[:, _pair_index(nvec, grad.device)] = grad[:, dim:dim + npair]
    g = g.view(batch, nvec, nvec)
    gs = torch.bmm(g + g.transpose(1, 2), torch.stack(list(vectors), dim=1))  # [B, V, D]
    gs[:, 0] += grad[:, :dim]
    return [gs[:, k].contiguous() for k in range(nvec)]
