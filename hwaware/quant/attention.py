"""``nn.MultiheadAttention`` with its projections as layers of their own, so they can be quantized.

torch's ``nn.MultiheadAttention`` multiplies its ``in_proj_weight`` (a bare Parameter) and its
``out_proj.weight`` itself, inside ``F.multi_head_attention_forward``: no child layer is ever
called, so neither fake quantization nor a packed deploy layer could run there. Routing an
attention module (:func:`route_attention`) swaps its class for :class:`RoutedMultiheadAttention`,
whose ``forward`` is torch's computation step for step except that it *calls* two layers:

- ``in_proj``: an :class:`InProjection`, an ``nn.Linear`` (``embed_dim`` -> ``3 * embed_dim``)
  whose ``weight`` and ``bias`` are the module's own ``in_proj_weight`` / ``in_proj_bias``
  Parameters, read from it (an optimizer, a checkpoint and the gradients see one tensor);
- ``out_proj``: the module's own ``out_proj`` Linear.

So hwaware's callbacks and export treat them as the Linear layers ``<name>.in_proj`` and
``<name>.out_proj``: quantized, KL-validated, fallen back and packed like any other. Nothing a user
has changes: ``state_dict`` keys and ``named_parameters`` stay torch's (the ``in_proj`` view holds
no Parameter), ``isinstance(m, nn.MultiheadAttention)`` holds, and in FP32 a
self-attention call computes the same operations on the same tensors as torch's slow path (equal
outputs; torch's eval fast path, a fused kernel, rounds differently).

Cross-attention (``query`` is not ``key``, or ``key`` is not ``value``) runs ``in_proj`` once per
distinct input and keeps the rows it needs: one layer, so one set of quantization parameters,
at up to three times the projection work of torch's sliced weights.

Not routed (they stay FP32, with the reason): separate ``kdim`` / ``vdim`` projections
(``q_proj_weight``...), ``add_bias_kv`` and ``add_zero_attn``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["InProjection", "RoutedMultiheadAttention", "route_attention", "unroute_attention", "route_refusal",
           "in_projection_view", "drop_packed_in_projections", "child_name"]


class InProjection(nn.Linear):
    """The in-projection of a :class:`RoutedMultiheadAttention`: an ``nn.Linear`` whose ``weight``
    and ``bias`` are its attention module's ``in_proj_weight`` / ``in_proj_bias``, read from the
    module on every access. It holds no Parameter of its own, so it saves and loads nothing, and
    nothing that replaces the module's Parameters (``load_state_dict(assign=True)``, ``to_empty``,
    a deep copy) can leave it reading stale ones.
    """

    def __init__(self, owner: nn.MultiheadAttention) -> None:
        nn.Module.__init__(self)  # (not nn.Linear's: it would allocate a weight of its own)
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner is this module's parent

    def reset_parameters(self) -> None:
        """Nothing: the Parameters are the attention module's, initialized as torch initializes them
        (``model.apply(lambda m: m.reset_parameters())`` would re-draw them with Linear's init)."""

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._owner.in_proj_weight

    @property
    def bias(self) -> Optional[Tensor]:  # type: ignore[override]
        return self._owner.in_proj_bias

    @property
    def in_features(self) -> int:  # type: ignore[override]
        return self._owner.embed_dim

    @property
    def out_features(self) -> int:  # type: ignore[override]
        return 3 * self._owner.embed_dim


def route_refusal(m: nn.MultiheadAttention) -> Optional[str]:
    """Why ``m`` cannot be routed (its weights stay FP32), or None."""
    if not m._qkv_same_embed_dim:
        return ("it has separate q/k/v projection weights (kdim or vdim != embed_dim), which hwaware does not "
                "route into layers: stays FP32")
    if m.bias_k is not None or m.add_zero_attn:
        return "add_bias_kv / add_zero_attn: hwaware does not route such attention into layers, stays FP32"
    if getattr(m, "in_proj_weight", None) is None:
        return "it has no in_proj_weight"
    out = m.out_proj
    if type(out).forward is not nn.Linear.forward or out._forward_hooks or out._forward_pre_hooks:
        # torch multiplies out_proj.weight itself: routed, the module would call this forward (or
        # these hooks), which torch never runs, and compute something else in FP32
        return (f"its out_proj ({type(out).__name__}) overrides forward() or has hooks, which torch's attention never "
                "runs (it multiplies out_proj.weight itself): routing would change what it computes, so it stays FP32")
    return None


def in_projection_view(m: nn.MultiheadAttention) -> InProjection:
    """The ``in_proj`` layer ``m`` would get when routed (its own, once it is): changes nothing."""
    if isinstance(m, RoutedMultiheadAttention):
        return m.in_proj
    return InProjection(m)


def route_attention(m: nn.MultiheadAttention) -> RoutedMultiheadAttention:
    """Route ``m`` in place (see the module docstring); a routed module is returned as it is.

    Raises:
        ValueError: ``m`` cannot be routed (:func:`route_refusal`).
    """
    if isinstance(m, RoutedMultiheadAttention):
        return m
    if type(m) is not nn.MultiheadAttention:
        raise TypeError(f"route_attention: {type(m).__name__} is not an nn.MultiheadAttention (a subclass may "
                        "compute attention its own way)")
    if (why := route_refusal(m)) is not None:
        raise ValueError(f"route_attention: {why}")
    children = dict(m._modules)  # in_proj first: the order the planner lists the two layers in
    m._modules.clear()
    m._modules["in_proj"] = InProjection(m)
    m._modules.update(children)
    m.__class__ = RoutedMultiheadAttention
    return m


def unroute_attention(m: nn.Module) -> None:
    """Undo :func:`route_attention` (after its layers were detached from quantization): ``m`` is a
    plain ``nn.MultiheadAttention`` again. Anything else is left as it is."""
    if not isinstance(m, RoutedMultiheadAttention):
        return
    if type(m.in_proj) is not InProjection:
        raise ValueError(f"unroute_attention: in_proj is a {type(m.in_proj).__name__}, not the in_proj_weight view "
                         "routing made (quantized or packed): detach it first, or keep the module routed")
    del m._modules["in_proj"]
    m.__class__ = nn.MultiheadAttention


def drop_packed_in_projections(model: nn.Module) -> None:
    """In each routed module of ``model`` whose ``in_proj`` a deploy layer replaced, drop the FP32
    ``in_proj_weight`` / ``in_proj_bias``: no longer used (they would be stored and loaded beside
    the packed ones)."""
    for m in model.modules():
        if isinstance(m, RoutedMultiheadAttention) and not isinstance(m.in_proj, InProjection):
            m.in_proj_weight = None
            m.in_proj_bias = None


def child_name(parent: str, leaf: str) -> str:
    """The qualified name of ``parent``'s child or attribute ``leaf`` (``parent`` "" : the root's)."""
    return f"{parent}.{leaf}" if parent else leaf


def _unflatten_qkv(proj: Tensor, parts: int, e: int) -> Tuple[Tensor, ...]:
    # [..., parts * E] -> parts tensors [..., E], as torch's _in_projection_packed lays them out
    proj = proj.unflatten(-1, (parts, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    return tuple(proj[i] for i in range(parts))


class RoutedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that calls ``self.in_proj`` and ``self.out_proj`` (made by
    :func:`route_attention`; never constructed directly)."""

    in_proj: nn.Module

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        if isinstance(self.in_proj, InProjection) and self.in_proj._owner is not self:
            # a shallow copy of this module (nn.DataParallel's replicas) holds the original's view
            object.__setattr__(self.in_proj, "_owner", self)
        if query.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: query must be 2-D (unbatched) or 3-D, got shape {tuple(query.shape)}")
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:  # (as torch: transposing keeps which inputs are the same tensor)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights

    def _attention(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor], need_weights: bool,
                   attn_mask: Optional[Tensor], average_attn_weights: bool, is_causal: bool) -> Tuple[Tensor, Optional[Tensor]]:
        # F.multi_head_attention_forward, sequence-first, with the two projections called as layers
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            same_kv, same_qk = key is value, query is key
            query = query.unsqueeze(1)
            key = query if same_qk else key.unsqueeze(1)
            value = key if same_kv else value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        if embed_dim != self.embed_dim:
            raise ValueError(f"{type(self).__name__}: expected inputs of embed_dim {self.embed_dim}, got {embed_dim}")
        if key.shape != value.shape:
            raise ValueError(f"{type(self).__name__}: key shape {tuple(key.shape)} does not match value shape {tuple(value.shape)}")
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint alone: scaled_dot_product_attention's causal path
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False  # merged with the padding mask below: no longer causal
        head_dim = embed_dim // num_heads
        e = embed_dim
        if key is value:
            if query is key:
                q, k, v = _unflatten_qkv(self.in_proj(query), 3, e)
            else:
                q = self.in_proj(query)[..., :e]
                _, k, v = _unflatten_qkv(self.in_proj(key), 3, e)
        else:
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e:2 * e]
            v = self.in_proj(value)[..., 2 * e:]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}.")
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                       f"{(bsz * num_heads, tgt_len, src_len)}.")
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            if not torch.jit.is_tracing():
                F._check_key_padding_mask(key_padding_mask, src_len, bsz)
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            q_scaled = q * math.sqrt(1.0 / float(head_dim))
            if attn_mask is not None:
                weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                weights = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(weights, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = self.out_proj(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                return out.squeeze(1), weights.squeeze(0)
            return out, weights
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else attn_mask.view(bsz, num_heads, -1, src_len)
        q = q.view(bsz, num_heads, tgt_len, head_dim)
        k = k.view(bsz, num_heads, src_len, head_dim)
        v = v.view(bsz, num_heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        return (out.squeeze(1), None) if not is_batched else (out, None)
