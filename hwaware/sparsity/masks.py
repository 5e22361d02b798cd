"""2:4 masks: which layers can be pruned, which weights each keeps, and how they are enforced.

2:4 is taken along the input dimension K: in every contiguous group of 4 weights of a row of the
``[N, K]`` weight, at most 2 are non-zero (DESIGN.md). A Linear's weight is ``[N, K]`` as stored;
a Conv's is read through its im2col view ``[C_out, C_in/groups * kh * kw]`` (the GEMM a conv
lowers to), so its groups of 4 run along ``kw``, then ``kh``, then ``C_in``.

Masks are ``bool`` tensors shaped like the weight (``True`` = kept). Pure functions: no Lightning.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from hwaware.quant.attention import InProjection
from hwaware.quant.attach import (UNSUPPORTED_LAYERS, bare_weights, check_skip_matches, lazy_reason, matching_pattern,
                                  weight_read_by_parent)

__all__ = [
    "PRUNABLE_TYPES", "find_prunable", "weight_2d", "weight_key", "computed_weight", "magnitude_mask_24", "gradual_mask_24", "is_mask_24",
    "mask_sparsity", "cubic_fraction", "sr_ste_decay_",
]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


def weight_2d(module: nn.Module) -> Tensor:
    """The layer's weight as the ``[N, K]`` GEMM operand, to read (a copy where the weight's memory is
    not in that order: a ``channels_last`` conv's); masks are applied to the weight itself."""
    w = module.weight
    return w.reshape(w.shape[0], -1)


def weight_key(module: nn.Module) -> int:
    """What identifies the tensor a layer's ``weight`` is trained as, for finding weights two layers
    share: the Parameter itself (``module.weight`` of a parametrized layer is a new tensor on every
    read, whose ``id`` a later one can reuse), or the layer where the weight is computed."""
    p = module._parameters.get("weight")
    if p is None and isinstance(module, InProjection):  # a view of its attention module's in_proj_weight
        p = module.weight
    return id(p) if p is not None else id(module)


def computed_weight(module: nn.Module) -> bool:
    """Whether ``module.weight`` is computed from other parameters (``parametrize``, the hook-based
    ``weight_norm``) rather than being a trained Parameter itself."""
    return parametrize.is_parametrized(module, "weight") or "weight" not in module._parameters


def find_prunable(model: nn.Module, skip: Sequence[str] = ()) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
    """``(layers to prune, {name: reason} for every Linear/Conv left dense)``.

    Embedding tables are never pruned (a row-wise table has no K dimension to make 2:4); neither is
    a layer whose parent multiplies its ``.weight`` itself (``nn.MultiheadAttention``'s
    ``out_proj``: no 2:4 kernel would run it). A layer whose K (input dimension, im2col for convs)
    is not a multiple of 4 is skipped with its reason,
    as is any layer matching an ``fnmatch`` pattern in ``skip`` (by its name or a parent's, as
    ProgressiveQuantization matches: ``"top_mlp"`` skips ``top_mlp.0``).

    Raises:
        ValueError: a ``skip`` pattern that matches no module of ``model`` (a typo would prune
            the layer it meant to keep).
    """
    layers, skipped = {}, {}
    # a weight tied to an embedding table is a table (never pruned); one shared by two layers is
    # pruned once, under its first name
    modules = dict(model.named_modules())
    tables = {weight_key(m): name for name, m in modules.items() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    owners: Dict[int, str] = {}
    for name, m in modules.items():
        skipped.update(dict.fromkeys(bare_weights(name, m), "a bare Parameter nn.MultiheadAttention multiplies itself; "
                                     "2:4 masks apply to Linear and Conv layers: stays dense"))
        if isinstance(m, UNSUPPORTED_LAYERS) and name:
            skipped[name] = f"no 2:4 masks for {type(m).__name__} (Linear and Conv1d/2d only): stays dense"
            continue
        if not isinstance(m, PRUNABLE_TYPES) or not name:
            continue
        pattern = matching_pattern(name, skip)
        if pattern is not None:
            skipped[name] = f"matches skip pattern {pattern!r}"
            continue
        if weight_read_by_parent(modules, name):
            parent = modules[name.rpartition(".")[0]]
            skipped[name] = (f"its parent {type(parent).__name__} multiplies .weight itself, so no 2:4 kernel runs it and "
                             "export stores it dense: pruning it would cost accuracy for nothing")
            continue
        if isinstance(modules.get(name.rpartition(".")[0]), nn.MultiheadAttention):
            # routed for quantization (it calls this layer now): still left dense, so that the layers
            # pruned do not depend on whether quantization attached before pruning planned
            skipped[name] = ("a projection of an nn.MultiheadAttention quantization routed into layers: 2:4 pruning "
                             "leaves attention dense")
            continue
        if lazy_reason(m) is not None:
            raise ValueError(f"layer {name!r}: {lazy_reason(m)}")
        if computed_weight(m):
            skipped[name] = ("its weight is computed (weight_norm or another parametrization), not a trained Parameter: a "
                             "mask on it would not reach the parameters it is computed from; stays dense")
            continue
        key = weight_key(m)
        if key in tables:
            skipped[name] = f"its weight is tied to embedding {tables[key]!r}; embedding tables are never pruned"
            continue
        if key in owners:
            skipped[name] = f"shares its weight with {owners[key]!r}, pruned there"
            continue
        k = m.weight[0].numel()
        if k % 4:
            what = "in_features" if isinstance(m, nn.Linear) else "C_in/groups * kernel size (im2col K)"
            skipped[name] = f"input dimension K={k} ({what}) is not a multiple of 4"
            continue
        owners[key] = name
        layers[name] = m
    check_skip_matches(model, skip, [n for n, m in modules.items() if n and isinstance(m, PRUNABLE_TYPES)], "Linear/Conv")
    return layers, skipped


def _groups(w2d: Tensor) -> Tensor:
    n, k = w2d.shape
    return w2d.reshape(n, k // 4, 4)


def magnitude_mask_24(w2d: Tensor) -> Tensor:
    """Keep the 2 largest ``|w|`` of every group of 4 along K (ties: the lower position)."""
    n, k = w2d.shape
    order = _groups(w2d.detach().abs()).sort(dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=w2d.device)
    mask.scatter_(-1, order[..., :2], True)
    return mask.reshape(n, k)


def gradual_mask_24(w2d: Tensor, current: Tensor, fraction: float) -> Tensor:
    """Prune further groups to 2:4 until ``fraction`` of this layer's groups are pruned.

    Groups already pruned in ``current`` keep their mask (pruning is monotone); the next groups are
    those whose two smallest ``|w|`` sum to the least (the least weight magnitude removed).
    """
    n, k = w2d.shape
    cur = _groups(current)
    pruned = ~cur.all(-1)  # [N, K/4]
    total = pruned.numel()
    target = min(total, int(round(fraction * total)))
    need = target - int(pruned.sum())
    if need <= 0:
        return current.clone()
    a = _groups(w2d.detach().abs())
    cost = a.sort(dim=-1).values[..., :2].sum(-1)  # magnitude a group loses when pruned
    cost = cost.masked_fill(pruned, float("inf")).reshape(-1)
    chosen = cost.topk(need, largest=False, sorted=False).indices
    new = cur.clone().reshape(-1, 4)
    new[chosen] = magnitude_mask_24(w2d.detach().reshape(-1, 4)[chosen].reshape(-1, 4)).reshape(-1, 4)
    return new.reshape(n, k)


def is_mask_24(mask: Tensor) -> bool:
    """True when every group of 4 along K keeps at most 2 entries."""
    m = mask.reshape(mask.shape[0], -1)
    return m.shape[1] % 4 == 0 and bool((_groups(m).sum(-1) <= 2).all())


def mask_sparsity(w2d: Tensor) -> float:
    """Fraction of exact zeros in the weight."""
    return float((w2d == 0).sum()) / max(1, w2d.numel())


def cubic_fraction(step: int, total_steps: int) -> float:
    """Zhu & Gupta (2017) gradual schedule: ``1 - (1 - t/T)^3``; fast early, gentle at the end."""
    if total_steps <= 0:
        return 1.0
    t = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - t) ** 3


def sr_ste_decay_(grad: Tensor, dense: Tensor, mask: Tensor, lam: float) -> Tensor:
    """SR-STE (Zhou et al. 2021, eq. 5): ``g += lam * (~mask) * w`` on the dense weights, in place.

    The gradient was computed through the masked weight and is applied to the dense one (the
    straight-through part); the extra term decays exactly the weights the mask currently drops,
    so masks stop flipping between nearly equal weights as training proceeds.
    """
    return grad.add_(dense.masked_fill(mask, 0), alpha=lam)
