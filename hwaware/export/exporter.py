"""`export`: quantized model -> packed artifact, gated by a metric measured through the deploy ops.
`load`: artifact -> ``nn.Module`` on ``torch.ops.hwaware.*`` (verified before any tensor is read).

Export never knows about Lightning: it reads the quantization attached to the model
(:func:`hwaware.quant.quant_states`) and the FP32 weights kept at QAT start, or at 2:4 pruning
start when pruning came first (:func:`hwaware.quant.fp32_reference`). A model that never saw QAT is quantized post-training
(int8 per-channel weights, dynamic per-token activations, row-wise tables: nothing to calibrate).
"""
from __future__ import annotations

import collections.abc
import contextlib
import copy
import hashlib
import functools
import importlib
import inspect as _inspect
import io
import json
import math
import numbers
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from hwaware.export.artifact import ArtifactError, check_target, read_verified, verify_artifact, write_artifact
from hwaware.export.reads import ReplayedReads, leaf_bytes
from hwaware._predict import (HookedBatches, defines_predict_step, model_predictions, overridden_batch_hooks, returned_what as _what,
                              side_effect_free)
from hwaware.export.deploy import (DEPLOY_TYPES, Int4Linear, Int8Linear, RowwiseEmbedding, RowwiseEmbeddingBag, Sparse24Linear,
                                   chain_int8, fuse_relu, no_deploy_op, unpackable_specs)
from hwaware.export.selection import (SPARSE24_INT8_IMPL, SPARSE24_INT8_KERNEL, capture_rows, cpu_profile, isa_list, lost_features,
                                      select_int8_chains, select_int8_kernels, select_sparse24_kernels, wide_k_why)
import hwaware.ops as hwaware_ops
from hwaware.ops import FBGEMM_MAX_K, INT8_KERNELS, _check_int4_values, packing
from hwaware.ops.packing import _check_positive_scale, is_24
from hwaware.quant import native
from hwaware.quant.attention import (InProjection, RoutedMultiheadAttention, child_name, drop_packed_in_projections,
                                    in_projection_view, route_attention, route_refusal)
from hwaware.quant.attach import (QuantState, attach_quantization, bare_weights, detach_quantization, find_quantizable,
                                  fp32_reference, keep_layers_called, normalize_layer_specs, other_fp32_references,
                                  quant_states, routable, skip_patterns, weight_read_by_parent)
from hwaware.quant.spec import QuantSpec
from hwaware.sparsity.masks import weight_key

__all__ = ["export", "load", "Artifact", "RegressionError", "KernelPortabilityWarning", "METRICS"]

METRICS = ("auroc", "accuracy")
CPU_KERNELS = {
    "int8": "hwaware::int8_linear [cpu: measured choice, see selection]",
    "int4": "hwaware::int4_linear [cpu: no fast CPU int4 kernel: weight dequantized once to fp32, fp32 matmul]",
    "rowwise_int8": "hwaware::embedding_bag_rowwise [cpu: fbgemm embedding_bag_byte_rowwise_offsets]",
    "rowwise_int4": "hwaware::embedding_bag_rowwise [cpu: fbgemm embedding_bag_4bit_rowwise_offsets]",
    "rowwise_batched": ("hwaware::embedding_bags_rowwise [cpu: when the model calls its EmbeddingBagList, one C pass for "
                        "the list's row-wise tables of the same dim and mode (hwaware.recsys.DLRM reads them inside its "
                        "interaction instead: hwaware::embedding_interaction, _int8); called alone: embedding_bag_rowwise]"),
    "sparse24": "hwaware::sparse24_linear [cpu: measured choice, see selection]",
    "sparse24_int8": "hwaware::sparse24_linear [cpu: measured choice, see selection]",
}
INT4_24_NOTE = ("2:4-sparse weight: its 2:4 pattern is kept in the int4 values (zeros stay zeros) but not packed, "
                "there is no int4 2:4 format; stored and run as dense int4 (quantize it int8 per_channel to pack it "
                "2:4 as sparse24_int8)")
_BUFFER_PREFIX = "__nonpersistent__."
_PTQ_WEIGHT = QuantSpec(bits=8, granularity="per_channel")
_PTQ_ACT = QuantSpec(bits=8, granularity="per_row", dynamic=True)
_PTQ_TABLE = QuantSpec(bits=8, granularity="per_row", symmetric=False, dynamic=True)


class RegressionError(RuntimeError):
    """The exported model's metric dropped more than ``max_drop``; nothing was written."""

    def __init__(self, message: str, report: Dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


class KernelPortabilityWarning(UserWarning):
    """An artifact's kernels were timed on a CPU with instruction sets this one lacks: the recorded
    choice may be many times slower here (``load(path, kernels="measure")`` re-times them)."""



@dataclass
class Artifact:
    """What :func:`export` wrote: its ``path``, the ``manifest``, the regression ``report``, and
    ``model``, the in-memory deploy model (the one the gate measured)."""

    path: str
    manifest: Dict[str, Any] = field(repr=False)
    report: Optional[Dict[str, Any]] = field(repr=False, default=None)
    model: Optional[nn.Module] = field(repr=False, default=None, compare=False)

    @property
    def size_bytes(self) -> int:
        return sum(f["bytes"] for n, f in self.manifest["files"].items() if n != "program.pt2")

    def __repr__(self) -> str:
        layers = self.manifest["layers"]
        schemes: Dict[str, int] = {}
        for meta in layers.values():
            schemes[meta["scheme"]] = schemes.get(meta["scheme"], 0) + 1
        fp32 = self.manifest.get("fp32_bytes") or 0
        lines = [f"Artifact({self.path!r})",
                 f"  layers: {len(layers)} packed ({', '.join(f'{v} {k}' for k, v in sorted(schemes.items()))}), "
                 f"{len(self.manifest.get('dense_layers', {}))} dense",
                 f"  weights: {self.size_bytes:,} bytes" + (f" ({self.size_bytes / fp32:.1%} of FP32 {fp32:,})" if fp32 else "")]
        how = quantized_how(self.manifest)
        if how:
            lines.insert(1, f"  {how}")
        r = self.report
        if r:
            lines.append(f"  {r['metric']}: reference {r['reference']:.5f} -> exported {r['exported']:.5f} "
                         f"(drop {r['drop']:+.5f}, max_drop {r['max_drop']}) {'PASSED' if r['passed'] else 'FAILED'}")
            if "quantization_drop" in r:
                lines.append(f"  final weights with quantization off {r['final_weights_fp32']:.5f}: the export costs "
                             f"{r['quantization_drop']:+.5f} of them (not gated)")
        return "\n".join(lines)


def quantized_how(manifest: Mapping[str, Any]) -> Optional[str]:
    """How the artifact's layers were quantized (manifest ``post_training``), or None if unrecorded:
    a line of the artifact's summary and of ``hwaware inspect``."""
    ptq = manifest.get("post_training")
    if ptq is True:
        return "quantized: post-training (the model carried no QAT state: export calibrated it)"
    if ptq is False:
        return "quantized: by QAT (the training callback's specs, skips and KL fallbacks)"
    return None


def _user_stacklevel() -> int:
    """``warnings.warn``'s ``stacklevel`` that points at the first caller outside ``hwaware.export``
    (``hwaware.export(...)`` goes through the package's ``__call__``), for a warning raised in the
    function that calls this."""
    frame, level = sys._getframe(1), 1
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("hwaware.export"):
        frame, level = frame.f_back, level + 1
    return level


# -- module surgery -----------------------------------------------------------------------------


def _copy_model(model: nn.Module) -> nn.Module:
    """Deep copy without dragging along a trainer (LightningModule keeps one in ``_trainer``)."""
    memo: Dict[int, Any] = {}
    for name in ("_trainer", "_fabric"):
        obj = model.__dict__.get(name)
        if obj is not None:
            memo[id(obj)] = None
    return copy.deepcopy(model, memo)


def _fp32_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its quantization detached: its weights as FP32 layers run them."""
    ref = _copy_model(model)
    detach_quantization(ref)
    return ref


def _get_module(root: nn.Module, name: Any) -> Optional[nn.Module]:
    """The submodule at ``name``, or None where there is none (or ``name`` is not a string). Walks
    the registered submodules only: ``get_submodule`` reads attributes, and a name from a manifest
    could be a property that raises (LightningModule's ``trainer``)."""
    if not (isinstance(name, str) and name):
        return None
    m: Optional[nn.Module] = root
    for part in name.split("."):
        m = m._modules.get(part) if isinstance(m, nn.Module) else None
        if m is None:
            return None
    return m


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    parent._modules[child] = new


def _stored_once(state: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
    """The tensors to store, each once, and ``{key: key it is}`` for the entries that are another
    entry's tensor (a dense tied weight: ``lm_head.weight = tok_emb.weight`` is two ``state_dict``
    entries of one tensor; both were stored, and load gave the two layers separate copies)."""
    out: Dict[str, Tensor] = {}
    tied: Dict[str, str] = {}
    first: Dict[Tuple[Any, ...], str] = {}
    for k, v in state.items():
        same = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()),
                v.dtype) if v.numel() else None
        if same is not None and same in first:
            tied[k] = first[same]
            continue
        if same is not None:
            first[same] = k
        out[k] = v.detach().contiguous().cpu()
    return out, tied


def _share_packed(deploy: nn.Module, layers: Dict[str, Dict[str, Any]]) -> None:
    """Packed layers sharing one weight (``tied_to``) whose packed buffers are equal (dtype, shape and
    bytes) hold one tensor: tables sharing one weight pack to the same rows, and each kept its own
    copy, in memory, in ``weights.safetensors`` and in ``program.pt2`` (three tables sharing one: the
    artifact at 94% of FP32). Biases are each layer's own and stay so; layers of other weights that
    happen to pack to the same bytes are not shared, as FP32 stored them apart too."""
    first: Dict[Tuple[Any, ...], Tensor] = {}
    for name in (n for n, meta in layers.items() if meta.get("tied_to")):
        m = deploy.get_submodule(name)
        for leaf, buf in list(m._buffers.items()):
            if buf is None or not buf.numel() or leaf == "bias":
                continue
            group = frozenset([name, *layers[name]["tied_to"]])  # (unrelated weights that pack alike stay apart)
            key = (group, buf.dtype, tuple(buf.shape), buf.device, hashlib.blake2b(leaf_bytes(buf), digest_size=32).digest())
            other = first.setdefault(key, buf)
            if other is not buf and torch.equal(other, buf):
                m._buffers[leaf] = other


def _derive_tied_rows(deploy: nn.Module, layers: Dict[str, Dict[str, Any]]) -> Dict[str, Tensor]:
    """One weight tied between an 8-bit row-wise table and an :class:`Int8Linear` (a language model's
    token table and its output head) is packed once: the table's rows become the layer's symmetric
    per-row codes and scales in the row-wise layout (:func:`~hwaware.ops.packing.rowwise_from_int8`),
    and its entry says so (``rows_from``; the manifest's ``derived_rows``), so the artifact stores the
    layer's codes alone and load derives the rows. Packed in two formats, a 512x64 tied weight's
    model took 52% of its FP32 bytes, 26.7% stored once (tests/export/test_tied_rows.py). The table
    then serves symmetric rows rather than its own affine ones: the regression gate measures them,
    and export goes back to the table's own rows where they fail it (:func:`_keep_derived_rows`).
    Tables of 4-bit rows keep their own format (they cannot hold 8-bit codes). Returns each
    deriving table's own rows."""
    own: Dict[str, Tensor] = {}
    for name, meta in layers.items():
        table = deploy.get_submodule(name)
        if type(table) not in (RowwiseEmbeddingBag, RowwiseEmbedding) or table.bits != 8:
            continue
        heads = [o for o in meta.get("tied_to", ()) if type(deploy.get_submodule(o)) is Int8Linear]
        if heads:  # (one tensor: the head's [out, in] is the table's [rows, dim])
            head = deploy.get_submodule(heads[0])
            own[name] = table._buffers["weight"]
            table._buffers["weight"] = packing.rowwise_from_int8(head.qweight, head.w_scale)
            meta["rows_from"] = heads[0]
    return own


def _keep_derived_rows(deploy: nn.Module, layers: Dict[str, Dict[str, Any]], own: Dict[str, Tensor],
                       gate: Callable[[], float], ref_value: float, max_drop: float, metric: str) -> None:
    """Tables serving rows derived from a tied int8 layer (:func:`_derive_tied_rows`) keep them when
    the model passes the gate with them; else each gets its own rows back (stored in its own
    format, the manifest note says why) and the gate goes on as without derived rows. ``gate``:
    the metric of ``deploy`` as it is."""
    if not own:
        return
    value = gate()
    if ref_value - value <= max_drop:
        return
    for name, rows in own.items():
        src = layers[name].pop("rows_from")
        deploy.get_submodule(name)._buffers["weight"] = rows
        why = (f"its rows as the int8 codes of {src!r} (symmetric, stored once) scored {metric} {value:.5f}, a drop of "
               f"{ref_value - value:.5f} > max_drop: it keeps its own rows")
        layers[name]["note"] = f"{layers[name]['note']}; {why}" if layers[name].get("note") else why


def _int8_vs_fp32(layers: Dict[str, Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The int8 layers served one call each (not in an ``int8_mlp`` chain) that selection timed:
    their chosen kernels' time in all against the same layers' FP32 ``F.linear`` at the same rows
    (``fp32_us`` of each record), or None where there is none."""
    timed = [meta["selection"]["cpu"] for meta in layers.values() if "chain" not in meta
             and isinstance(meta.get("selection", {}).get("cpu"), dict) and "fp32_us" in meta["selection"]["cpu"]]
    timed = [r for r in timed if isinstance(r.get("measured", {}).get(r.get("chosen")), dict)
             and "us" in r["measured"][r["chosen"]]]
    if not timed:
        return None
    return {"layers": len(timed), "int8_us": round(sum(r["measured"][r["chosen"]]["us"] for r in timed), 2),
            "fp32_us": round(sum(r["fp32_us"] for r in timed), 2)}


def _note_tied(layers: Dict[str, Dict[str, Any]], tensors: Dict[str, Tensor], tied_tensors: Dict[str, str],
               derived_rows: Dict[str, str]) -> None:
    """The manifest note of each packed layer sharing its weight with others (``tied_to``): stored
    once where the layers pack to the same bytes (``stored_as``: the layer whose entries hold them,
    and ``stored_bytes``: what the layer still stores of its own, its bias) or where a table's rows
    are derived from an int8 layer's codes (``derived_rows``), else once per format.
    ``tensors``: the deploy model's state dict."""
    group = [n for n, meta in layers.items() if meta.get("tied_to")]
    derived = {k.rpartition(".")[0]: src for k, src in derived_rows.items()}
    for name in group:
        if name in derived:
            layers[name].update(stored_as=derived[name], stored_bytes=0)
            continue
        mine = [k for k in tensors if _under(k, [name]) and k.rpartition(".")[2] != "bias"]
        src = {tied_tensors[k].rpartition(".")[0] for k in mine if k in tied_tensors}
        if mine and len(src) == 1 and all(k in tied_tensors for k in mine):
            layers[name]["stored_as"] = src.pop()
            layers[name]["stored_bytes"] = sum(t.numel() * t.element_size() for k, t in tensors.items()
                                               if _under(k, [name]) and k not in tied_tensors)
    for name in group:
        meta = layers[name]
        others = ", ".join(repr(o) for o in meta["tied_to"])
        copies = sum(1 for n in [name, *meta["tied_to"]] if "stored_as" not in layers.get(n, {}))
        tables = [t for t, src in derived.items() if src == name]
        if name in derived:
            note = (f"its weight is tied to {others}; its rows are the int8 codes and per-row scales (symmetric) of "
                    f"{derived[name]!r}, not stored but derived at load (manifest derived_rows)")
        elif "stored_as" in meta:
            note = (f"its weight is tied to {others}; it packs to the same bytes as {meta['stored_as']!r}: stored once, "
                    f"under {meta['stored_as']!r} (manifest tied_tensors)")
        elif copies == 1:
            note = (f"its weight is tied to {others}, " + ("whose rows load derives from this layer's codes" if tables else
                                                           "which pack to the same bytes") + ": stored once, here")
        else:
            note = (f"its weight is tied to {others}: packed in {copies} formats, so the artifact stores that weight "
                    f"{copies} times (FP32 stored it once)"
                    + (f"; {', '.join(map(repr, tables))} derive their rows from this layer's codes" if tables else ""))
        meta["note"] = f"{meta['note']}; {note}" if meta.get("note") else note


def module_aliases(model: nn.Module) -> Dict[str, str]:
    """``{alias: name}`` for each module the model holds under a second attribute
    (``self.author_table = self.user_table``): ``named_modules`` lists a shared module once, under
    its first name, so export packs it there and points the alias at the same deploy module. Only
    the outermost alias is listed (an aliased ``Sequential``'s children follow it)."""
    first: Dict[int, str] = {}
    aliases: Dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        canonical = first.setdefault(id(m), name)
        if canonical != name and not any(name.startswith(a + ".") for a in aliases):
            aliases[name] = canonical
    return aliases


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _hooks_reason(module: nn.Module) -> Optional[str]:
    """Why a layer with forward hooks of its own stays dense (the packed layer replacing it would
    run none of them: the exported model would compute something else than the gate's reference),
    or None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return ("forward hooks are registered on it, which a packed layer would not run: stays FP32 and runs them "
                "(remove the hooks before export to pack it)")
    return None


def _deploy_module(name: str, module: nn.Module, st: QuantState, sparse24: bool) -> Tuple[Optional[nn.Module], Optional[str]]:
    """(deploy module, None) or (None, why the layer stays dense)."""
    if not st.enabled:
        return None, "kept in FP32 by KL fallback"
    spec = st.weight.spec
    why = no_deploy_op(st.kind, spec)
    if why is not None:
        return None, why
    if st.kind == "linear":
        try:
            if spec.bits == 8:
                if sparse24 and is_24(module.weight.detach()):
                    return Sparse24Linear.from_linear(module, st), None
                return Int8Linear.from_quantized(module, st), None
            return Int4Linear.from_quantized(module, st), None
        except ValueError as e:  # a NaN / inf weight: the layer cannot be packed, and FP32 would not serve it either
            raise ValueError(f"layer {name!r} cannot be packed: {e}") from None
    cls = RowwiseEmbeddingBag if st.kind == "embedding_bag" else RowwiseEmbedding
    try:
        return cls.from_quantized(module, st), None
    except ValueError as e:
        try:  # as a Linear's: a table holding NaN/inf is refused, not left FP32 serving NaN for the bags reading
            # it (looked for only here: packing read the whole table once already)
            packing._check_finite("weight", module.weight)
        except ValueError as bad:
            raise ValueError(f"layer {name!r} cannot be packed: {bad}") from None
        return None, str(e)


_FLOAT_INPUT = "none: the input stays float"
_AS_GIVEN = "the model as given (post-training)"  # a gate reference: the FP32 weights a post-training export packs


def _served_activation(m: nn.Module) -> Optional[str]:
    """How the deploy layer's CPU kernel treats its input: the manifest's ``activation``. It can
    differ from what QAT trained with (``qat_activation``): int4 layers are weight-only, and
    ``dequant`` multiplies float inputs by the dequantized int8 weight. The gate measures what is
    served."""
    if isinstance(m, Int4Linear):
        return f"{_FLOAT_INPUT} (int4 weight-only)"
    if isinstance(m, Sparse24Linear) and m.values.dtype != torch.int8:
        return f"{_FLOAT_INPUT} (FP32 2:4 values)"
    if not isinstance(m, (Int8Linear, Sparse24Linear)):
        return None
    kernel = m.kernels.get("cpu", "auto")
    if isinstance(m, Sparse24Linear):
        kernel = SPARSE24_INT8_IMPL.get(kernel, kernel)
    if kernel == "dequant":
        return f"{_FLOAT_INPUT} (int8 weight dequantized)"
    if kernel == "fbgemm":
        return "uint8/per_tensor/affine/dyn (fbgemm) of per-token pre-scaled rows"
    return "int8/per_row/sym/dyn"


def _qat_skipped(model: nn.Module, states: Dict[str, QuantState]) -> Dict[str, str]:
    """``{layer: why QAT left it unquantized}`` for a model that went through QAT: the reasons in the
    :class:`~hwaware.callbacks.ProgressiveQuantization` report (``report["skipped"]``: a ``skip=``
    pattern, ``in_features`` not a multiple of the group size, ...), found on the trainer the model
    was fitted with (Lightning keeps it on the module) when that callback quantized exactly these
    layers. Without it (no trainer kept), every quantizable layer with nothing attached is listed
    with a generic reason."""
    trainer = model.__dict__.get("_trainer")
    if trainer is not None:
        from hwaware.callbacks.progressive_quantization import ProgressiveQuantization  # Lightning: at call time

        for cb in getattr(trainer, "callbacks", None) or []:
            if isinstance(cb, ProgressiveQuantization):
                rep = cb.report
                if set(rep.get("layers") or {}) == set(states):
                    return {name: f"skipped by QAT: {why}" for name, why in rep.get("skipped", {}).items()}
    plan, skipped = find_quantizable(model, weight_spec=_PTQ_WEIGHT, embedding_spec=_PTQ_TABLE)
    out = {name: f"skipped by QAT: {why}" for name, why in skipped.items() if name not in states}
    out.update({name: ("not quantized by QAT (the ProgressiveQuantization report's 'skipped' says why; export found no "
                       "trainer with that callback on the model)") for name in plan if name not in states})
    return out


def _selected_label(op_name: str, m: nn.Module, rec: Dict[str, Any]) -> str:
    """The manifest's ``kernel`` label of a layer whose CPU kernel export timed: what runs. A 2:4 layer
    with int8 values runs ``int8_linear``'s implementation on its decompressed codes (its op kernel
    ``"dense"`` is ``int_mm``: the codes are decompressed, not dequantized)."""
    op_kernel = rec["op_kernel"]
    if isinstance(m, Sparse24Linear) and m.values.dtype == torch.int8:
        impl = SPARSE24_INT8_IMPL.get(op_kernel, op_kernel)
        return (f"hwaware::{op_name} [cpu: {op_kernel} = int8_linear {impl} on the int8 codes decompressed once; "
                f"chosen {rec['chosen']}]")
    return f"hwaware::{op_name} [cpu: {op_kernel}; chosen {rec['chosen']}]"


def _check_served_dtypes(model: nn.Module, states: Dict[str, QuantState]) -> None:
    """Refuse, before any pass over the data, a model whose linear layers to pack hold a dtype no
    deploy op takes (``hwaware::int8_linear`` / ``int4_linear`` / ``sparse24_linear``: float32,
    bfloat16, float16 inputs), e.g. a float64 model: it would fail inside the first forward."""
    modules = dict(model.named_modules())
    bad: Dict[str, torch.dtype] = {}
    for name, st in states.items():
        w = getattr(modules.get(name), "weight", None)
        if st.kind == "linear" and st.enabled and isinstance(w, Tensor) and w.dtype not in hwaware_ops._FLOAT_X:
            bad[name] = w.dtype
    if bad:
        dtypes = sorted({str(d).replace("torch.", "") for d in bad.values()})
        served = ", ".join(str(d).replace("torch.", "") for d in hwaware_ops._FLOAT_X)
        names = list(bad)
        raise TypeError(f"export: {type(model).__name__} has {' and '.join(dtypes)} linear layers ({names[:5]}"
                        f"{f' and {len(names) - 5} more' if len(names) > 5 else ''}), and no deploy op serves "
                        f"{' or '.join(dtypes)}: hwaware's int8 / int4 / 2:4 linear ops take {served} inputs. Convert "
                        f"the model (e.g. model.float()) and its inputs before export")


def weights_read_outside_call(model: nn.Module, names: Iterable[str], run: Callable[[], Any]) -> Dict[str, str]:
    """``{layer: why it stays dense}`` for the layers among ``names`` whose ``.weight`` the model reads
    outside the layer's own call while ``run()`` runs it once: a tied head (``F.linear(h,
    self.tok.weight)``), a scale from the table's width (``self.tok.weight.shape[-1]``). A packed
    layer has no float weight there: its ``weight`` is the packed codes, so such a model computed
    with the wrong shape or crashed. A routed attention module's ``in_proj`` is its
    ``in_proj_weight``, which packing drops (``None``): reads of it on the attention module outside
    the ``in_proj`` call count. (Not those of ``in_proj_bias``, dropped too: torch's fused-path
    checks read it to test ``is None``, and then take the unfused path the deploy layers run on.)
    Run :func:`side_effect_free`; each module's class is put back."""
    modules, names = dict(model.named_modules()), list(names)
    reads: Dict[str, str] = {}  # {layer: what was read}, in the order first read
    swapped: List[Tuple[nn.Module, type]] = []
    hooks = []

    def tracking(cls: type, watched: Dict[str, Tuple[str, nn.Module]]) -> type:
        # watched: {attribute: (layer, the module whose call a read may come from)}
        def __getattr__(self, attr):  # nn.Module's: parameters live in _parameters, not __dict__
            hit = watched.get(attr)
            if hit is not None and not hit[1].__dict__.get("_hwaware_in_call"):
                reads.setdefault(hit[0], attr)
            return cls.__getattr__(self, attr)
        return type(cls.__name__, (cls,), {"__getattr__": __getattr__, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__})

    def enter(m, args):
        m.__dict__["_hwaware_in_call"] = m.__dict__.get("_hwaware_in_call", 0) + 1

    def leave(m, args, out):
        m.__dict__["_hwaware_in_call"] -= 1

    watch: Dict[int, Tuple[nn.Module, Dict[str, Tuple[str, nn.Module]]]] = {}
    try:
        for name in names:
            m = modules[name]
            hooks += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave, always_call=True)]
            if isinstance(m, InProjection):  # (its weight is a property reading the attention module's)
                watch.setdefault(id(m._owner), (m._owner, {}))[1]["in_proj_weight"] = (name, m)
            else:
                watch.setdefault(id(m), (m, {}))[1]["weight"] = (name, m)
        for m, watched in watch.values():
            swapped.append((m, type(m)))
            m.__class__ = tracking(type(m), watched)
        with side_effect_free(model):
            run()
    finally:
        for h in hooks:
            h.remove()
        for m, cls in swapped:
            m.__class__ = cls
        for name in names:
            modules[name].__dict__.pop("_hwaware_in_call", None)
    out = {}
    for name, attr in reads.items():
        parent = name.rpartition(".")[0]
        read = child_name(parent, attr) if attr != "weight" else f"{name}.weight"
        out[name] = (f"the model reads {read} outside {name}'s own call (a tied head, a scale from its width), and a "
                     "packed layer has no float weight: left dense")
    return out


def _build_deploy(model: nn.Module, states: Dict[str, QuantState], sparse24: bool = True,
                  skipped: Optional[Dict[str, str]] = None, qat: bool = True,
                  read_outside: Optional[Dict[str, str]] = None,
                  ) -> Tuple[nn.Module, Dict[str, Dict[str, Any]], Dict[str, str]]:
    """The deploy model, its packed layers' manifest entries and ``{layer: why it stays dense}``.
    ``skipped``: layers the quantization planning left out, with reasons (listed as dense unless
    packed anyway, e.g. 2:4 with FP32 values); ``qat``: the states were trained by QAT (their
    activation specs are recorded as ``qat_activation``), not attached here post-training;
    ``read_outside``: layers whose weight the model reads itself (:func:`weights_read_outside_call`),
    left dense with the reason."""
    deploy = _copy_model(model)
    modules = dict(model.named_modules())
    layers, dense = {}, {}

    def add(name: str, new: nn.Module, st: Optional[QuantState], note: Optional[str] = None) -> None:
        _set_module(deploy, name, new)
        if (st is not None and st.kind == "linear" and st.activation is None
                and isinstance(new, (Int8Linear, Sparse24Linear)) and new.w_scale is not None):
            # weight-only (QAT never saw this layer's input quantized, or layer_specs asked it of
            # post-training export): no kernel that quantizes it
            new.serve_weight_only()
        elif isinstance(new, (Int8Linear, Sparse24Linear)) and new.w_scale is not None and new.in_features > FBGEMM_MAX_K:
            new.serve_weight_only()  # the integer implementations' int32 sums would overflow (the ops refuse them)
            note = f"{note}; {wide_k_why(new.in_features)}" if note else wide_k_why(new.in_features)
        meta = new.describe()
        meta["module"] = type(new).__name__
        meta["kernel"] = {"cpu": CPU_KERNELS[meta["scheme"]]}
        if qat and st is not None and st.kind == "linear" and st.activation is not None:
            meta["qat_activation"] = st.activation.spec.short()  # what QAT trained with; "activation": what is served
        if note:
            meta["note"] = note
        layers[name] = meta

    for name, st in states.items():
        # a deploy module would not serve it: its weight is read outside its call, or hooks change what it computes
        reason = weight_read_by_parent(modules, name) or (read_outside or {}).get(name) or _hooks_reason(modules[name])
        new, reason = (None, reason) if reason else _deploy_module(name, modules[name], st, sparse24)
        if new is None:
            dense[name] = reason
            continue
        add(name, new, st)
        if sparse24 and isinstance(new, Int4Linear) and is_24(modules[name].weight.detach()):
            # 2:4-pruned and int4-quantized: packed int4, the 2:4 compression is not applied
            layers[name].update(sparse24_unpacked=True, note=INT4_24_NOTE)
    for name, m in modules.items():  # FP32 because of how their parent uses them: say so in the manifest
        if isinstance(m, nn.Linear) and name not in layers and (reason := weight_read_by_parent(modules, name)):
            dense.setdefault(name, reason)
        dense.update({w: "a bare Parameter nn.MultiheadAttention multiplies itself: runs FP32" for w in bare_weights(name, m)})
    for name, why in (skipped or {}).items():  # left out of quantization: dense, with the planner's reason
        if name not in layers:
            dense.setdefault(name, why)
    # 2:4 Linear layers left in FP32 (not quantized, skipped, KL fallback) still pack compressed:
    # the FP32 values are exact, so this is lossless and halves their bytes
    if sparse24:
        for name, m in modules.items():
            if (name in layers or not isinstance(m, nn.Linear) or weight_read_by_parent(modules, name)
                    or not is_24(m.weight.detach())):
                continue
            if (why := _hooks_reason(m)) is not None:
                dense.setdefault(name, why)
                continue
            add(name, Sparse24Linear.from_linear(m), None, note=dense.pop(name, None))
        for name, m in modules.items():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and name not in layers and is_24(m.weight.detach().reshape(m.weight.shape[0], -1)):
                dense[name] = (dense[name] + "; " if name in dense else "") + "2:4 conv: no hwaware conv op, stored and run dense"
    tied: Dict[int, List[str]] = {}  # one weight shared by several packed layers (tied input/output embeddings)
    for name in layers:
        tied.setdefault(weight_key(modules[name]), []).append(name)
    for names in (n for n in tied.values() if len(n) > 1):  # (the manifest's note says how it is stored: _note_tied)
        for name in names:
            layers[name]["tied_to"] = [o for o in names if o != name]
    from hwaware.recsys.embedding import EmbeddingBagList  # recsys imports the ops and Lightning: at call time

    for name, meta in layers.items():  # tables an EmbeddingBagList looks up together (one op call per batch)
        if isinstance(modules.get(name.rpartition(".")[0]), EmbeddingBagList) and EmbeddingBagList.batched(_get_module(deploy, name)):
            meta["kernel"] = {"cpu": CPU_KERNELS["rowwise_batched"]}
    for alias, name in module_aliases(model).items():  # the alias runs what its module's name was replaced with
        _set_module(deploy, alias, deploy.get_submodule(name))
    detach_quantization(deploy)  # dense leftovers compute exactly as their FP32 originals
    drop_packed_in_projections(deploy)  # a packed in_proj: its FP32 Parameters are not stored
    keep_layers_called(deploy)
    deploy.eval()
    return deploy, layers, dense


# -- the regression gate ------------------------------------------------------------------------

_TARGET_KEYS = ("label", "labels", "target", "targets", "y")


def _target_key(batch: Mapping[str, Any]) -> Optional[str]:
    """The key of a dict batch's targets: the first of ``_TARGET_KEYS`` it has."""
    return next((k for k in _TARGET_KEYS if k in batch), None)


def _default_output(module: nn.Module, batch: Any) -> Tuple[Tensor, Tensor]:
    if isinstance(batch, dict):
        key = _target_key(batch)
        target = batch[key] if key else None
    elif isinstance(batch, (list, tuple)):
        if len(batch) < 2:
            raise ValueError(f"export: a validation batch is a {type(batch).__name__} of {len(batch)} element(s); the gate "
                             "needs (inputs..., target) to measure the metric. Pass batches with their targets, or "
                             "output_fn=lambda model, batch: (preds, target)")
        target = batch[-1]
    else:
        target = None
    if target is None:
        raise ValueError("export could not find the target in a validation batch (dict keys "
                         f"{_TARGET_KEYS} or the last element of a tuple); pass output_fn=lambda model, batch: (preds, target)")
    return model_predictions(module, batch, "export"), target


def _target_source(batch: Any, output_fn: Optional[Callable]) -> str:
    """Where the gate took the targets from, as the report records it (read off the first batch)."""
    if output_fn is not None:
        return "output_fn"
    if isinstance(batch, dict):
        return f"batch[{_target_key(batch)!r}]"
    if isinstance(batch, (list, tuple)):
        return f"batch[-1] (the last of {len(batch)} elements)"
    return "?"


def _metric_value(metric: str, preds: Tensor, target: Tensor) -> float:
    from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy

    if metric == "auroc":
        if preds.dim() > 2 or (preds.dim() == 2 and preds.shape[1] != 1):
            cols = preds.shape[1] if preds.dim() == 2 else tuple(preds.shape[1:])
            raise ValueError(f"metric='auroc' expects one logit or probability per sample; the model's output has {cols} columns "
                             f"per sample (shape {tuple(preds.shape)} over the loader's batches). For class scores use "
                             "metric='accuracy'; for a two-class softmax, pass output_fn= returning the positive class's "
                             "score and the target: lambda model, batch: (model(*batch[:-1]).softmax(-1)[:, 1], batch[-1]) "
                             "(for a multi-task head, the column of the task to gate on)")
        t = target.reshape(-1)
        if t.numel() != preds.numel():
            raise ValueError(f"metric='auroc' expects one binary target per sample; got targets of shape "
                             f"{tuple(target.shape)} for {preds.numel()} predictions")
        if not bool(((t == 0) | (t == 1)).all()):
            bad = t[(t != 0) & (t != 1)][:3].tolist()
            raise ValueError(f"metric='auroc' expects binary targets (0 or 1); the validation targets include {bad} "
                             "(soft labels or class ids would be cut to integers silently)")
        if t.numel() and bool((t == t[0]).all()):
            # torchmetrics returns 0 for both models: a drop of 0 that would pass any gate
            raise ValueError(f"metric='auroc' is undefined on these validation batches: all {t.numel()} targets are "
                             f"{int(t[0])} (AUROC ranks positives above negatives; it needs both). Gate on a validation "
                             "split holding both classes (a log sorted by label puts one class at its end)")
        return float(BinaryAUROC()(preds.reshape(-1).float(), t.long()))
    if preds.dim() != 2 or preds.shape[1] < 2:
        hint = ("use metric='auroc' for a single logit" if preds.dim() <= 2 else
                "per-position scores such as a sequence model's [B, T, V] logits: pass output_fn=lambda model, batch: "
                "(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)) to gate on every position")
        raise ValueError(f"metric='accuracy' expects class scores of shape [B, C>=2]; the model outputs shape "
                         f"{tuple(preds.shape)} over the loader's batches ({hint})")
    if target.numel() != preds.shape[0]:
        raise ValueError(f"metric='accuracy' expects one class id per sample (targets of shape [B]); got targets of shape "
                         f"{tuple(target.shape)} for {preds.shape[0]} samples" + (
                             " (one-hot targets? pass output_fn returning target.argmax(1))" if target.shape == preds.shape else ""))
    t = target.reshape(-1)
    if t.is_floating_point() and not bool((t == t.round()).all()) or not bool(((t >= 0) & (t < preds.shape[1])).all()):
        raise ValueError(f"metric='accuracy' expects class ids in [0, {preds.shape[1]}) for the model's "
                         f"{preds.shape[1]} classes; the validation targets include {t[:3].tolist()}")
    return float(MulticlassAccuracy(num_classes=preds.shape[1], average="micro")(preds.float(), t.long()))


def _gate_pair(module: nn.Module, batch: Any, output_fn: Optional[Callable]) -> Tuple[Tensor, Tensor]:
    """``(predictions, target)`` for one validation batch, both tensors, or a ``TypeError`` that says
    which of them is not and what picks the tensor."""
    out = (output_fn or _default_output)(module, batch)
    if output_fn is not None and not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(f"export: output_fn returned {_what(out)}; expected (predictions, target), two tensors")
    preds, target = out
    if not isinstance(preds, Tensor):
        pick = "the logits tensor" + (" (e.g. out['logits'])" if isinstance(preds, dict) else
                                      " (e.g. out[0])" if isinstance(preds, (tuple, list)) else "")
        if output_fn is not None:
            raise TypeError(f"export: output_fn returned predictions as {_what(preds)}; the regression gate needs "
                            f"one tensor of predictions: return {pick}")
        who = "its predict_step" if defines_predict_step(module) else "the model"
        raise TypeError(f"export: {who} returned {_what(preds)} on a validation batch; the regression gate needs one "
                        f"tensor of predictions. Pass output_fn=lambda model, batch: (preds, target) returning "
                        f"{pick}, or define predict_step(batch, batch_idx) returning it")
    if not isinstance(target, Tensor):
        raise TypeError(f"export: the validation target is {_what(target)}; expected a tensor (pass "
                        "output_fn=lambda model, batch: (preds, target) to pick it)")
    return preds, target


_DEPLOY = "the exported model (on the hwaware deploy ops)"


def _evaluate(module: nn.Module, loader: Iterable, metric: str, output_fn: Optional[Callable],
              target_source: Optional[List[str]] = None, who: str = _DEPLOY) -> float:
    """``metric`` of ``module`` (``who``, for an error) over ``loader``; ``target_source``, a list,
    gets where the targets came from (:func:`_target_source` of the first batch) appended. Export
    passes the loader as :class:`~hwaware.export.reads.ReplayedReads`, so every model it compares
    reads the same samples. A NaN prediction is refused: torchmetrics ranks it without a word (a
    table holding NaN passed a gate of max_drop=0 with an eighth of its outputs NaN)."""
    preds, targets = [], []
    modes = [(m, m.training) for m in module.modules()]  # each module's own: a reference may mix them
    module.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                if target_source is not None and not target_source:
                    target_source.append(_target_source(batch, output_fn))
                p, t = _gate_pair(module, batch, output_fn)
                # (a batch of one sample whose forward ends in .squeeze(): a 0-d prediction and target)
                preds.append(p.detach().cpu().reshape(1) if p.dim() == 0 else p.detach().cpu())
                targets.append(t.detach().cpu().reshape(1) if t.dim() == 0 else t.detach().cpu())
    finally:
        for m, training in modes:
            m.training = training
    if not preds:
        raise ValueError("export: val_dataloader yielded no batches")
    preds_all = torch.cat(preds)
    if preds_all.is_floating_point() and bool(preds_all.isnan().any()):
        rows = preds_all.reshape(preds_all.shape[0], -1).isnan().any(1)
        why = ("its weights or the validation batches hold NaN/inf" if who != _DEPLOY else
               "where the FP32 reference gives none: a layer's quantized output overflowed, or a value no deploy op "
               "serves reached one")
        raise ValueError(f"export: {who} gives NaN predictions for {int(rows.sum())} of {rows.numel()} validation "
                         f"samples ({why}); the regression gate cannot rank NaN, and nothing was written")
    return _metric_value(metric, preds_all, torch.cat(targets))


def _int8_layers(model: nn.Module) -> list:
    """The layers whose CPU kernel is chosen among ``int8_linear``'s implementations: :class:`Int8Linear`
    and int8-valued :class:`Sparse24Linear`, except those QAT trained weight-only (pinned to ``dequant``)."""
    return [m for m in model.modules()
            if (isinstance(m, Int8Linear) or (isinstance(m, Sparse24Linear) and m.values.dtype == torch.int8))
            and not m.weight_only]


def _set_impl(m: nn.Module, impl: str) -> None:
    m.kernels["cpu"] = impl if isinstance(m, Int8Linear) else SPARSE24_INT8_KERNEL[impl]


def _known_len(loader: Any) -> Optional[int]:
    """``len(loader)``, or None where it has none: a DataLoader is ``Sized`` whatever its dataset,
    and its ``len`` raises TypeError over an ``IterableDataset`` without ``__len__`` (a stream)."""
    try:
        return len(loader)
    except TypeError:
        return None


def _first_batch(loader: Iterable) -> Any:
    for batch in loader:
        return batch
    raise ValueError("export: val_dataloader yielded no batches")


def _kernel_config(model: nn.Module) -> Dict[str, Dict[str, str]]:
    """Every layer's chosen kernels: two runs with equal configurations compute the same bits."""
    return {name: dict(m.kernels) for name, m in model.named_modules() if isinstance(getattr(m, "kernels", None), dict)}


def _gated_value(deploy: nn.Module, loader: Iterable, metric: str, output_fn: Optional[Callable],
                 by_impl: Dict[str, Dict[str, Any]], configs: Dict[str, Dict[str, Dict[str, str]]]) -> float:
    """The metric of ``deploy`` as its kernels are set now: a configuration :func:`_gate_each_impl`
    already ran (the same bits) reuses its value, any other is evaluated."""
    now = _kernel_config(deploy)
    same = next((impl for impl, config in configs.items() if config == now), None)
    return by_impl[same]["exported"] if same is not None else _evaluate(deploy, loader, metric, output_fn)


def _gate_each_impl(deploy: nn.Module, loader: Iterable, metric: str, output_fn: Optional[Callable], ref_value: float,
                    max_drop: float, impls: Sequence[str]) -> Tuple[Dict[str, Dict[str, Any]], Dict[str, Dict[str, Dict[str, str]]]]:
    """The metric with every int8 layer on one ``int8_linear`` implementation, for each of them: which
    ones export may choose, and a deployment may switch to (another CPU, where another is fastest),
    and stay gated. Also returns each run's kernel configuration (:func:`_kernel_config`)."""
    layers = _int8_layers(deploy)
    saved = [dict(m.kernels) for m in layers]
    out: Dict[str, Dict[str, Any]] = {}
    configs: Dict[str, Dict[str, Dict[str, str]]] = {}
    try:
        for impl in impls:
            for m in layers:
                _set_impl(m, impl)
            value = _evaluate(deploy, loader, metric, output_fn)
            out[impl] = {"exported": value, "drop": ref_value - value, "passed": ref_value - value <= max_drop}
            configs[impl] = _kernel_config(deploy)
    finally:
        for m, k in zip(layers, saved):
            m.kernels.clear()
            m.kernels.update(k)
    return out, configs


def _reference_module(model: nn.Module, reference: Union[None, nn.Module, Dict[str, Tensor]]) -> nn.Module:
    if isinstance(reference, nn.Module):
        return reference
    ref = _fp32_copy(model)
    sd = reference if reference is not None else fp32_reference(model)
    if sd is not None:  # otherwise the model's own weights are FP32 (post-training quantization)
        try:
            ref.load_state_dict(sd)
        except RuntimeError as e:  # (torch's "Error(s) in loading state_dict for ...": keys, shapes)
            if reference is None:
                raise
            raise ValueError(f"export: reference= is a state_dict that does not fit {type(model).__name__}: "
                             f"{str(e).strip()}") from None
    return ref


# -- export / load ------------------------------------------------------------------------------


def _given(x: Any) -> str:
    return f"Tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, Tensor) else type(x).__name__


def _check_example_inputs(model: nn.Module, example_inputs: Any) -> Tuple[Any, ...]:
    """``example_inputs`` as a tuple, checked before any work: a tuple/list of tensors that binds to
    ``model.forward``'s parameters (as ``model(*example_inputs)`` would). TypeError naming
    ``example_inputs``, what forward expects and what was given, otherwise."""
    if isinstance(example_inputs, Tensor) or not isinstance(example_inputs, (tuple, list)):
        raise TypeError(f"example_inputs={_given(example_inputs)}; expected a tuple of the tensors "
                        f"{type(model).__name__}.forward takes, e.g. (x,) for one input")
    example_inputs = tuple(example_inputs)
    try:
        sig = _inspect.signature(model.forward)
    except (TypeError, ValueError):  # no introspectable signature: torch.export will say
        sig = None
    if sig is not None:
        try:
            sig.bind(*example_inputs)
        except TypeError as e:
            given = ", ".join(_given(x) for x in example_inputs) or "nothing"
            bare = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()],
                               return_annotation=sig.empty)  # the names forward takes, without type hints
            raise TypeError(f"example_inputs does not fit {type(model).__name__}.forward{bare}: {e}; "
                            f"given {len(example_inputs)} input(s): ({given})") from None
    leaves = input_leaves(example_inputs)  # TypeError naming a leaf that is not a tensor
    batched = [(i, x) for i, x in enumerate(leaves) if x.dim()]
    empty = [f"[{i}] {_given(x)}" for i, x in batched if x.shape[0] == 0]
    if batched and len(empty) == len(batched):  # (one input of 0 rows beside others may be no batch: flat ids)
        # (a trial: program.pt2 then served batch 0 only, "Guard failed: dense.size()[0] == 0" at any real
        # batch, and the kernels were chosen by timings on no rows)
        raise ValueError(f"example_inputs has a batch of 0 rows: {', '.join(empty)}. torch.export would fix program.pt2 "
                         "to that size, and the kernels would be timed on no rows; give a batch you serve (two rows or more)")
    return example_inputs


# how deep an input structure (dicts / lists / tuples of tensors) may nest: far more than a forward
# takes, and a bound on what an edited manifest's input_structure can make bench recurse into
_MAX_INPUT_DEPTH = 16


def input_leaves(inputs: Tuple[Any, ...]) -> List[Tensor]:
    """The tensors of ``inputs`` (forward's positional inputs: tensors, or dicts with str keys, lists
    and tuples of them, nested), in the order ``torch.export`` flattens them (a dict's in insertion
    order). TypeError naming the first leaf that is something else."""
    out: List[Tensor] = []

    def walk(x: Any, where: str, depth: int) -> None:
        if isinstance(x, Tensor):
            out.append(x)
        elif depth >= _MAX_INPUT_DEPTH:
            raise TypeError(f"example_inputs{where} nests deeper than {_MAX_INPUT_DEPTH} levels")
        elif type(x) is dict:
            for k, v in x.items():
                if not isinstance(k, str):
                    raise TypeError(f"example_inputs{where} has key {k!r}; a dict input needs str keys (the manifest "
                                    "records them for hwaware bench)")
                walk(v, f"{where}[{k!r}]", depth + 1)
        elif type(x) in (list, tuple):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]", depth + 1)
        else:
            raise TypeError(f"example_inputs{where} is {_given(x)}; expected tensors, or dicts (str keys), lists and "
                            "tuples of tensors, exactly those types (their shapes and dtypes are recorded for hwaware "
                            "bench, which rebuilds them as such; torch.export would fix a number or a string into "
                            "program.pt2 as a constant): pass an OrderedDict or a namedtuple as a dict or a tuple")

    for i, x in enumerate(inputs):
        walk(x, f"[{i}]", 0)
    return out


def _input_structure(inputs: Tuple[Any, ...]) -> Optional[List[Any]]:
    """The manifest's ``input_structure``: per input, the index of its tensor among
    :func:`input_leaves` or ``{"dict": [[key, node], ...]}`` / ``{"list": [...]}`` / ``{"tuple":
    [...]}`` around such nodes; None when every input is a tensor (the manifest then records none)."""
    if all(isinstance(x, Tensor) for x in inputs):
        return None
    count = iter(range(1 << 62))

    def node(x: Any) -> Any:
        if isinstance(x, Tensor):
            return next(count)
        if type(x) is dict:
            return {"dict": [[k, node(v)] for k, v in x.items()]}
        return {type(x).__name__: [node(v) for v in x]}

    return [node(x) for x in inputs]


def build_inputs(structure: Any, leaves: Sequence[Tensor], where: str) -> Tuple[Any, ...]:
    """Forward's inputs: ``leaves`` (the recorded inputs' tensors, in order) put into
    ``structure`` (the manifest's ``input_structure``; None: the leaves are the inputs).
    ``ArtifactError`` naming ``where`` unless it uses each leaf once, in order."""
    if structure is None:
        return tuple(leaves)
    nxt = [0]

    def bad(why: str) -> ArtifactError:
        return ArtifactError(f"{where}: 'input_structure' {why}; expected per input a tensor's index among 'inputs' (in "
                             "order) or {'dict': [[key, node], ...]} / {'list': [...]} / {'tuple': [...]}")

    def build(n: Any, depth: int) -> Any:
        if type(n) is int:
            if n != nxt[0] or n >= len(leaves):
                raise bad(f"names input {n} where input {nxt[0]} of {len(leaves)} comes next")
            nxt[0] += 1
            return leaves[n]
        if depth >= _MAX_INPUT_DEPTH or not (isinstance(n, dict) and len(n) == 1):
            raise bad(f"has {str(n)[:80]!r}")
        (kind, items), = n.items()
        if not isinstance(items, list):
            raise bad(f"has {kind!r} of {type(items).__name__}")
        if kind == "dict":
            if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) for e in items):
                raise bad("has a dict entry that is not [str key, node]")
            if len({e[0] for e in items}) != len(items):
                raise bad(f"repeats a key of a dict ({[e[0] for e in items][:8]})")
            return {k: build(v, depth + 1) for k, v in items}
        if kind in ("list", "tuple"):
            built = [build(v, depth + 1) for v in items]
            return built if kind == "list" else tuple(built)
        raise bad(f"has kind {kind!r}")

    if not isinstance(structure, list):
        raise bad(f"is {type(structure).__name__}")
    out = tuple(build(n, 0) for n in structure)
    if nxt[0] != len(leaves):
        raise bad(f"uses {nxt[0]} of the {len(leaves)} recorded inputs")
    return out


def input_paths(structure: Any, n: int, where: str) -> List[str]:
    """Where each of the ``n`` recorded input tensors goes in forward's inputs (``[0]['dense']``),
    in order: the names ``hwaware inspect`` prints, and the order ``hwaware bench --inputs`` takes."""
    if structure is None:
        return [f"[{i}]" for i in range(n)]
    inputs = build_inputs(structure, [torch.empty(0)] * n, where)
    return [torch.utils._pytree.keystr(path) for path, _ in torch.utils._pytree.tree_flatten_with_path(inputs)[0]]


def _map_leaves(inputs: Tuple[Any, ...], fn: Callable[[Tensor, int], Any]) -> Tuple[Any, ...]:
    """``inputs`` with each tensor ``x`` (the ``i``-th of :func:`input_leaves`) replaced by ``fn(x, i)``."""
    count = iter(range(1 << 62))  # (pytree visits the tensors in input_leaves' order)
    return torch.utils._pytree.tree_map_only(Tensor, lambda x: fn(x, next(count)), tuple(inputs))


def _describe_input(x: Any) -> Dict[str, Any]:
    """Shape/dtype of one example input (batch dim first) and, for index tensors, the largest id per
    column: enough for ``hwaware bench`` to generate valid batches without storing any data."""
    if not isinstance(x, Tensor):
        raise TypeError(f"example_inputs must be tensors, got {type(x).__name__}")
    d: Dict[str, Any] = {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")}
    if not x.is_floating_point() and x.numel():
        cols = x.reshape(x.shape[0], -1).long() if x.dim() > 1 else x.reshape(-1, 1).long()  # (bool: 0/1)
        d["max"] = cols.amax(0).tolist() if x.dim() > 1 else [int(cols.max())]
        lo = cols.amin(0).tolist() if x.dim() > 1 else [int(cols.min())]
        if min(lo) < 0:  # (bench draws from 0 up otherwise)
            d["min"] = lo
    return d


def _save_program(program: Any, fpath: str) -> None:
    """``torch.export.save`` into memory, then the bytes to ``fpath`` with Python's file I/O: torch's
    archive writer, writing to a file that fails (a full disk), throws again from its destructor and
    aborts the process (exit 134); an ``OSError`` here leaves the export's clean-up to run."""
    buf = io.BytesIO()
    torch.export.save(program, buf)
    with open(fpath, "wb") as f:
        f.write(buf.getbuffer())


def _batch_dynamic_shapes(deploy: nn.Module, example_inputs: Tuple[Any, ...]) -> Tuple[Any, ...]:
    """``dynamic_shapes`` for ``torch.export``: dim 0 of each tensor input ``Dim.AUTO``, laid out as
    forward's signature takes the inputs (the ones a ``*args`` parameter collects as one tuple:
    torch.export matches the structure to the parameters, not to the flat inputs)."""
    per_input = list(_map_leaves(example_inputs, lambda x, i: {0: torch.export.Dim.AUTO} if x.dim() else None))
    try:
        params = list(_inspect.signature(deploy.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: one entry per input
        return tuple(per_input)
    var = next((i for i, p in enumerate(params) if p.kind is _inspect.Parameter.VAR_POSITIONAL), None)
    if var is None or len(per_input) <= var:  # *args collects nothing: torch.export sees the named parameters only
        return tuple(per_input)
    return (*per_input[:var], tuple(per_input[var:]))


def _export_program(deploy: nn.Module, example_inputs: Tuple[Any, ...]):
    """``torch.export`` of the deploy model with the batch (dim 0 of every tensor input) left to
    export to make dynamic (``Dim.AUTO``): a program that serves any batch the model's code allows,
    not only the example's. Returns the program and its manifest entry: per input, the batch range
    the program accepts (``[n, n]``: the model's code fixed it to the example's size).

    An example of batch 1 (every tensor input one row) is traced as two copies of that row:
    torch.export specializes a size of 1, so the program would serve batch 1 only."""
    dynamic = _batch_dynamic_shapes(deploy, example_inputs)
    batched = [x for x in input_leaves(example_inputs) if x.dim()]
    program = None
    if batched and all(x.shape[0] == 1 for x in batched):
        doubled = _map_leaves(example_inputs, lambda x, i: torch.cat([x, x]) if x.dim() else x)
        try:
            program, example_inputs = torch.export.export(deploy, doubled, dynamic_shapes=dynamic), doubled
        except Exception:  # noqa: BLE001  a size-1 input that is no batch (a [1] scale): trace as given
            program = None
    if program is None:
        program = torch.export.export(deploy, example_inputs, dynamic_shapes=dynamic)
    user_inputs = [spec.arg.name for spec in program.graph_signature.input_specs
                   if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    ranges = []
    for name, x in zip(user_inputs, input_leaves(example_inputs)):
        if not x.dim():
            ranges.append(None)
            continue
        size = nodes[name].meta["val"].shape[0]
        expr = size if isinstance(size, int) else size.node.expr
        if isinstance(expr, int) or getattr(expr, "is_number", False):
            # fixed by the model's code (ids [tables, batch]: dim 0 the table count): a SymInt whose
            # expression is a number (a KeyError in range_constraints before)
            ranges.append([int(expr), int(expr)])
            continue
        r = program.range_constraints.get(expr)
        if r is None:  # a size derived from others (2 * s0): no range of its own to record
            ranges.append(None)
            continue
        hi = None if math.isinf(float(r.upper)) else int(r.upper)  # torch's int_oo says is_finite
        ranges.append([int(r.lower), hi])
    checked = _program_agreement(program, deploy, example_inputs)
    note = "batch sizes each input of program.pt2 accepts ([lo, hi]; hi null: unbounded)"
    if any(r is not None and r[0] == 2 for r in ranges):
        # torch.export's ranges start at 2 (it specializes sizes 0 and 1), but the program may serve a
        # batch of 1 all the same: run one through it, and say 1 only when it matches the deploy model
        if _serves_batch_of_one(program, deploy, example_inputs, [r is not None and r[0] == 2 for r in ranges]):
            ranges = [[1, r[1]] if r is not None and r[0] == 2 else r for r in ranges]
            note += "; torch.export's range starts at 2 (it specializes sizes 0 and 1): a batch of 1 was run through " \
                    "the program at export and matched the deploy model, so the range says 1"
        else:
            note += "; torch.export specializes sizes 0 and 1, and a batch of 1 failed or differed through the program"
    return program, {"batch_range": ranges, "note": note, "checked": checked}


def _program_agreement(program: Any, deploy: nn.Module, example_inputs: Tuple[Any, ...]) -> Dict[str, Any]:
    """The program run on ``example_inputs`` against the deploy model the gate measured, each from
    the same random state (a model that samples in eval draws the same numbers): the manifest's
    ``program.checked`` (``exact``: every output equal bit for bit, a NaN or inf in the same place
    included; ``max_abs_diff`` between float outputs and ``max_abs_output``, the largest finite
    output). A program whose outputs differ beyond rounding is refused, since the gate's verdict
    would not hold for it (torch.export baked in a branch, or Python-side state, the eager model
    takes otherwise). Rounding is judged per output at its own magnitude and dtype: a float output
    may differ by max(1e-4, 8 eps) of its largest value (the traced graph may decompose what eager
    runs fused); an integer, bool or non-tensor output has no rounding and must be equal."""
    def refuse(where: str, why: str) -> ValueError:
        return ValueError(f"export: program.pt2 differs from the deploy model the gate measured on example_inputs at "
                          f"output {where}: {why}. torch.export traced something else (a branch on a value, or a "
                          "Python-side state baked in); serve the model with hwaware.load, or export a model whose "
                          "forward traces as it runs")

    outputs = []
    for run in (program.module(), deploy):
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            outputs.append(run(*example_inputs))
    got_leaves, got_spec = torch.utils._pytree.tree_flatten_with_path(outputs[0])
    want_leaves, want_spec = torch.utils._pytree.tree_flatten_with_path(outputs[1])
    if got_spec != want_spec:
        raise refuse("(all)", f"it returns {got_spec}, the deploy model {want_spec}")
    diff, size, exact = 0.0, 0.0, True
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        where = torch.utils._pytree.keystr(path) or "(the output)"
        if not isinstance(w, Tensor):
            if not (type(g) is type(w) and g == w):
                raise refuse(where, f"{g!r} where the deploy model gives {w!r}")
            continue
        if not isinstance(g, Tensor) or g.shape != w.shape or g.dtype != w.dtype:
            raise refuse(where, f"{_given(g)} where the deploy model gives {_given(w)}")
        if not (w.is_floating_point() or w.is_complex()):
            if not torch.equal(g, w):
                raise refuse(where, f"{int((g != w).sum())} of its {w.numel()} {str(w.dtype).replace('torch.', '')} "
                                    "values differ (no rounding excuses an integer output)")
            continue
        eps = torch.finfo(w.dtype).eps
        if w.is_complex():
            g, w = torch.view_as_real(g), torch.view_as_real(w)
        same = (g == w) | (g.isnan() & w.isnan())  # (a NaN or inf both give is the same output)
        finite = w.isfinite()
        top = float(w[finite].double().abs().max()) if bool(finite.any()) else 0.0
        size = max(size, top)
        if bool(same.all()):
            continue
        exact = False
        off = ~same
        if not bool((g[off].isfinite() & w[off].isfinite()).all()):
            raise refuse(where, "a NaN or inf where the other model gives another value")
        d = float((g[off].double() - w[off].double()).abs().max())
        diff = max(diff, d)
        if not d <= max(1e-6, max(1e-4, 8 * eps) * top):
            raise refuse(where, f"by up to {d:.3g}, where its values reach {top:.3g}")
    return {"exact": exact, "max_abs_diff": diff, "max_abs_output": size}


def _serves_batch_of_one(program: Any, deploy: nn.Module, example_inputs: Tuple[Any, ...], dynamic: list) -> bool:
    """Whether ``program`` runs the example's first row (of every input whose batch is dynamic) and
    gives the deploy model's output for it."""
    one = _map_leaves(example_inputs, lambda x, i: x[:1] if dynamic[i] else x)
    try:
        with torch.no_grad():
            got = program.module()(*one)
            want = deploy(*one)
        got_leaves, got_spec = torch.utils._pytree.tree_flatten(got)
        want_leaves, want_spec = torch.utils._pytree.tree_flatten(want)
        if got_spec != want_spec:
            return False
        for g, w in zip(got_leaves, want_leaves):
            if isinstance(w, Tensor):
                # the traced graph may decompose what eager runs fused (attention): rounding-level
                # differences, measured against the output's own magnitude (not 1e-6 absolute)
                size = float(w.detach().abs().max()) if w.is_floating_point() and w.numel() else 0.0
                torch.testing.assert_close(g, w, rtol=1e-5, atol=max(1e-6, 1e-5 * size))
            elif g != w:
                return False
        return True
    except Exception:  # noqa: BLE001  any failure means: do not claim batch 1
        return False


_INPUT_DTYPES = {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"}


def check_input_descriptions(description: Any, where: str) -> None:
    """``ArtifactError`` naming ``where`` (the manifest) unless ``description`` is a list of
    :func:`_describe_input` records: a manifest is editable, and these size what bench allocates."""
    def bad(i: int, why: str) -> ArtifactError:
        return ArtifactError(f"{where}: 'inputs'[{i}] {why}; expected {{'shape': [ints >= 0], 'dtype': one of "
                             f"{sorted(_INPUT_DTYPES)}, 'max': [ints] for an integer dtype (>= 0 unless 'min' is given), and "
                             "'min': [ints <= max], as many, where a column goes negative}}")

    if not isinstance(description, list):
        raise ArtifactError(f"{where}: 'inputs' is {type(description).__name__}; expected a list of input records")
    for i, d in enumerate(description):
        if not isinstance(d, dict):
            raise bad(i, f"is {d!r}")
        shape, dtype = d.get("shape"), d.get("dtype")
        if not (isinstance(shape, list) and shape and all(type(n) is int and 0 <= n < 2**31 for n in shape)):
            raise bad(i, f"has shape {shape!r}")
        if dtype not in _INPUT_DTYPES:
            raise bad(i, f"has dtype {dtype!r}")
        cols = math.prod(shape[1:])  # (1-D: one column)
        if not getattr(torch, dtype).is_floating_point and cols:  # (no columns: empty at any batch, no max recorded)
            bottom, top = (0, 1) if dtype == "bool" else (torch.iinfo(getattr(torch, dtype)).min, torch.iinfo(getattr(torch, dtype)).max)
            hi, lo = d.get("max"), d.get("min", [0] * len(d.get("max") or []))
            if not (isinstance(hi, list) and len(hi) in (1, cols) and all(type(v) is int and v <= top for v in hi)):
                raise bad(i, f"has max {hi!r} (one for every column or one per column: {cols}; each at most {top}, the "
                             f"{dtype} maximum)")
            if not (isinstance(lo, list) and len(lo) == len(hi)
                    and all(type(v) is int and bottom <= v <= h for v, h in zip(lo, hi))):
                raise bad(i, f"has min {lo!r} for max {hi!r} (each at least {bottom}, the {dtype} minimum, and at most "
                             "its column's max)")


def given_inputs(leaves: Tuple[Tensor, ...], manifest: Mapping[str, Any], path: str) -> Tuple[Any, ...]:
    """A batch the caller saved (``hwaware bench --inputs``: its tensors in forward's order) as
    forward's inputs: put into the manifest's ``input_structure`` when export recorded one (a forward
    taking dicts / lists of tensors), the tensors then in the order of its recorded ``inputs``."""
    structure = manifest.get("input_structure")
    if structure is None:
        return leaves
    n = len(manifest.get("inputs") or [])
    if len(leaves) != n:
        order = ", ".join(f"'{i}': inputs{p}" for i, p in enumerate(input_paths(structure, n, f"{path}/manifest.json")))
        raise ValueError(f"the batch holds {len(leaves)} tensor(s), and the model's inputs hold {n} (dicts / lists of "
                         f"tensors, recorded in {path}/manifest.json 'input_structure'): save them as {order}")
    return build_inputs(structure, leaves, f"{path}/manifest.json")


def make_inputs(description: Iterable[Dict[str, Any]], batch_size: int, seed: int = 0,
                structure: Any = None) -> Tuple[Any, ...]:
    """Random inputs matching :func:`_describe_input` records, with ``batch_size`` rows, put into
    ``structure`` (the manifest's ``input_structure``: dicts / lists of them) where one is given."""
    check_input_descriptions(description, "the recorded example inputs")
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in description:
        shape = [batch_size, *d["shape"][1:]]
        dtype, cols = getattr(torch, d["dtype"]), math.prod(shape[1:])
        if dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        elif not cols:  # no columns: empty whatever the batch (and no max recorded)
            out.append(torch.zeros(shape, dtype=dtype))
        else:
            hi = torch.tensor(d["max"], dtype=torch.float64) + 1
            lo = torch.tensor(d.get("min", [0] * len(d["max"])), dtype=torch.float64)
            hi, lo = (hi.expand(cols), lo.expand(cols)) if hi.numel() == 1 else (hi, lo)
            ids = (torch.rand(batch_size, cols, generator=g, dtype=torch.float64) * (hi - lo) + lo).floor().to(dtype)
            out.append(ids.reshape(shape))
    return build_inputs(structure, out, "the recorded example inputs")


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return None


def _record_hparams(hparams: Any) -> Tuple[Optional[Dict[str, Any]], Dict[str, str]]:
    """``(hparams the manifest can hold, {name: type} of those it cannot})``: JSON without NaN/inf,
    one by one (a single ``pathlib.Path`` dropped them all, and load then built the class with its
    defaults)."""
    if hparams is None:
        return None, {}
    kept, unrecorded = {}, {}
    for k, v in dict(hparams).items():
        try:
            json.dumps(v, allow_nan=False)
            # a dict keyed by ints came back keyed by strings: load built another architecture
            ok = isinstance(k, str) and _str_keyed(v)
        except (TypeError, ValueError):
            ok = False
        if ok:
            kept[k] = v
        else:
            unrecorded[str(k)] = f"{type(v).__module__}.{type(v).__qualname__}" + (
                f" {v!r}" if isinstance(v, float) else " with non-str keys" if isinstance(v, dict) else "")
    return kept, unrecorded


def _str_keyed(v: Any) -> bool:
    """Every dict inside ``v`` has str keys (JSON writes any other key as a string)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _str_keyed(x) for k, x in v.items())
    return all(_str_keyed(x) for x in v) if isinstance(v, (list, tuple)) else True


def _tuple_paths(v: Any, at: Tuple[Any, ...] = ()) -> List[List[Any]]:
    """Where ``v`` (an hparam) holds tuples, as key / index paths: JSON writes them as lists, and a
    constructor doing ``(in_dim,) + hidden`` refused the list load passed it."""
    out = [list(at)] if isinstance(v, tuple) else []
    if isinstance(v, dict):
        for k, x in v.items():
            out += _tuple_paths(x, (*at, k))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            out += _tuple_paths(x, (*at, i))
    return out


def _restore_tuples(hparams: Dict[str, Any], paths: Any, mpath: str) -> Dict[str, Any]:
    """``hparams`` with the lists at ``paths`` (manifest ``model.hparams_tuples``) made tuples again."""
    if not isinstance(paths, list) or not all(isinstance(p, list) and p and isinstance(p[0], str) for p in paths):
        raise ArtifactError(f"{mpath}: 'model.hparams_tuples' is {paths!r}; expected a list of key paths ([name, ...])")
    seen: set = set()
    for p in paths:
        if json.dumps(p) in seen:
            raise ArtifactError(f"{mpath}: 'model.hparams_tuples' names {p!r} twice")
        seen.add(json.dumps(p))
    out = copy.deepcopy(hparams)
    for p in sorted(paths, key=len, reverse=True):  # the innermost first: a tuple of tuples
        parent, where = None, out
        for key in p:
            fits = (isinstance(where, dict) and isinstance(key, str) and key in where) or (
                isinstance(where, (list, tuple)) and type(key) is int and 0 <= key < len(where))
            if not fits:
                raise ArtifactError(f"{mpath}: 'model.hparams_tuples' names {p!r}, which 'model.hparams' does not hold")
            parent, where = (where, key), where[key]
        if not isinstance(where, list):
            raise ArtifactError(f"{mpath}: 'model.hparams_tuples' names {p!r}, which is {type(where).__name__} in "
                                "'model.hparams'; expected a list (a tuple as JSON writes it)")
        container, key = parent
        container[key] = tuple(where)  # (innermost first: its container is a list still)
    return out


def _named_parameters(cls: type) -> List[str]:
    """The named constructor arguments of ``cls`` (not ``*args`` / ``**kwargs``: ``nn.Module``'s own)."""
    try:
        params = _inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind not in (_inspect.Parameter.VAR_POSITIONAL, _inspect.Parameter.VAR_KEYWORD)]


# in-place random fills: on a meta tensor (no values) they change nothing, yet torch runs some of them
# (normal_, which nn.Embedding's init calls) through its Python references, whose first use imports
# torch._dynamo and sympy: ~140 MiB and a second of a server's load for a model with one table
# (nn.init's functions as well as Tensor's: a mode sees nn.init.normal_, then not the Tensor.normal_ it calls)
_RANDOM_FILLS = frozenset([getattr(Tensor, f) for f in ("normal_", "uniform_", "bernoulli_", "cauchy_", "exponential_",
                                                         "geometric_", "log_normal_", "random_", "erfinv_")]
                          + [getattr(nn.init, f) for f in ("normal_", "uniform_", "trunc_normal_", "xavier_uniform_",
                                                           "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
                                                           "orthogonal_", "sparse_", "eye_", "dirac_")])


class _MetaFillsSkipped(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RANDOM_FILLS:
            t = args[0] if args else kwargs.get("tensor")  # (nn.init passes its tensor by keyword)
            if isinstance(t, Tensor) and t.is_meta:
                return t
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for building a skeleton of the model (no weight allocated), with its
    random initialization skipped: there are no values to fill."""
    with torch.device("meta"), _MetaFillsSkipped():
        yield


def build_recorded(cls: type, manifest: Mapping[str, Any], path: str) -> nn.Module:
    """``cls(**hparams recorded at export)``: the exported architecture. ``ArtifactError`` naming the
    artifact and what to pass instead where the manifest could not record every hparam, or the class
    no longer takes them (changed since export)."""
    mpath = os.path.join(path, "manifest.json")
    if is_factory(cls):  # the caller's own function builds it as at export
        built = cls()
        if not isinstance(built, nn.Module):
            raise TypeError(f"the model function {cls.__qualname__}() returned {type(built).__name__}; expected an nn.Module")
        return built
    info = manifest.get("model") or {}
    unrecorded = info.get("hparams_unrecorded")
    if unrecorded is not None and not (isinstance(unrecorded, dict) and all(isinstance(v, str) for v in unrecorded.values())):
        raise ArtifactError(f"{mpath}: 'model.hparams_unrecorded' is {unrecorded!r}; expected an object {{name: type}}")
    if unrecorded:
        raise ArtifactError(f"{mpath}: the exported model's hparams {', '.join(f'{k} ({t})' for k, t in dict(unrecorded).items())} "
                            f"could not be recorded (not JSON), so {cls.__qualname__} cannot be rebuilt from the manifest; "
                            f"build it as at export and pass it: hwaware.load({path!r}, model={cls.__qualname__}(...))")
    recorded = info.get("hparams")
    hparams = recorded or {}
    if not isinstance(hparams, dict) or not all(isinstance(k, str) for k in hparams):
        raise ArtifactError(f"{mpath}: 'model.hparams' is {hparams!r}; expected an object of keyword arguments")
    if not hparams and _named_parameters(cls):
        # nothing says how the exported instance was built: building the defaults served a trial's
        # PlainNet(scale=3.0) at a third of its outputs without a word
        what = ("has no `hparams` (not a LightningModule)" if recorded is None else
                "recorded none of its arguments (save_hyperparameters() not called, or every argument ignored)")
        raise ArtifactError(f"{mpath}: the exported {cls.__qualname__} {what}, and its constructor takes arguments "
                            f"({', '.join(_named_parameters(cls)[:6])}), so hwaware cannot tell how it was built; pass an "
                            f"instance built as at export: hwaware.load({path!r}, model={cls.__qualname__}(...)) (hwaware "
                            "bench: --model module:function, a function of no arguments that builds it)")
    unnamed = [n for n in _named_parameters(cls) if n not in hparams and n not in (unrecorded or {})]
    if hparams and unnamed:  # save_hyperparameters(ignore=[...]): those arguments get their defaults
        warnings.warn(f"{mpath}: the exported {cls.__qualname__} did not record its arguments {', '.join(unnamed[:6])} "
                      "(save_hyperparameters(ignore=...)?), so they are built with their defaults; if it was built "
                      f"otherwise, pass an instance built as at export: model={cls.__qualname__}(...)",
                      UserWarning, stacklevel=3)
    if "hparams_tuples" in info:  # (artifacts before it was recorded give lists, as JSON holds them)
        hparams = _restore_tuples(hparams, info["hparams_tuples"], mpath)
    try:
        return cls(**hparams)
    except (TypeError, ValueError, RuntimeError) as e:  # the class's own refusal of these arguments
        why = ("the class takes other arguments than when the artifact was exported" if isinstance(e, TypeError) else
               "the recorded hparams do not build the class")
        raise ArtifactError(f"{mpath}: {cls.__qualname__}(**{hparams}) failed ({type(e).__name__}: {e}): {why}; pass an "
                            f"instance built as at export: hwaware.load({path!r}, model={cls.__qualname__}(...))") from e


def float_bytes(model: nn.Module) -> int:
    """The bytes of ``model``'s floating weights and buffers at 4 bytes each, each tensor once (a
    tied weight is one tensor): the manifest's ``fp32_bytes``, also for a model on the meta device."""
    seen = {id(t): t for t in model.state_dict(keep_vars=True).values() if isinstance(t, Tensor) and t.is_floating_point()}
    return sum(t.numel() * 4 for t in seen.values())


def _real_scalar(name: str, value: Any) -> float:
    """``float(value)`` for a finite real scalar >= 0: any ``numbers.Real`` (Python int/float, numpy
    integer/floating scalars), a 0-d numpy array or a 0-d torch tensor of a real dtype. ``bool``
    (Python, numpy or tensor), NaN, inf, negatives and non-scalars raise ``ValueError`` naming the
    value and its type."""
    if isinstance(value, Tensor):
        ok = value.dim() == 0 and value.dtype != torch.bool and not value.is_complex()
    elif isinstance(value, np.ndarray):
        ok = value.ndim == 0 and value.dtype.kind in "fiu"
    else:  # np.bool_ is not a numbers.Real; Python's bool is
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name}={value!r} of type {type(value).__module__}.{type(value).__qualname__}; expected a finite "
                         "real number >= 0 (a Python int/float, a numpy scalar or a 0-d tensor; not a bool)")
    return number


def export(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    val_dataloader: Optional[Iterable] = None,
    metric: str = "auroc",
    max_drop: float = 0.001,
    reference: Union[None, nn.Module, Dict[str, Tensor]] = None,
    example_inputs: Optional[Tuple[Any, ...]] = None,
    device: str = "cpu",
    output_fn: Optional[Callable[[nn.Module, Any], Tuple[Tensor, Tensor]]] = None,
    embedding_bits: Optional[int] = None,
    sparse24: bool = True,
    int8_impls: Optional[Sequence[str]] = None,
    overwrite: bool = True,
    batch_hooks: bool = True,
    skip: Union[str, Sequence[str]] = (),
    layer_specs: Optional[Mapping[str, Any]] = None,
) -> Artifact:
    """Pack every quantized layer, gate on ``metric`` through the deploy ops, write the artifact.

    Args:
        model: a model trained with hwaware callbacks, or a plain FP32 model (quantized here,
            post-training: int8 per-channel weights, dynamic per-token activations, row-wise
            ``embedding_bits`` tables).
        path: artifact directory, written atomically (an earlier artifact there is replaced only
            when the new one is complete).
        overwrite: replace an earlier artifact at ``path`` (False: refuse, before any work, e.g. for
            the path a server is loading from).
        val_dataloader: batches for the regression gate (skipped, and recorded as such, when None).
            It is read once per model compared, each read from the same random state, so random
            sampling or augmentation gives every model the same draw (:mod:`hwaware.export.reads`).
        metric: ``"auroc"`` (one logit per sample) or ``"accuracy"`` (class scores).
        max_drop: largest allowed ``reference - exported`` metric; above it :class:`RegressionError`
            is raised and nothing is written.
        reference: FP32 reference (module or state_dict); default: the weights the callbacks kept
            (at QAT start; the dense model at 2:4 pruning start when pruning came first), else the
            model itself with quantization off.
        example_inputs: when given, ``program.pt2`` (a ``torch.export`` program on ``hwaware::*``) is written,
            with the batch dimension dynamic where the model's code allows it (manifest ``program``).
            Forward's positional inputs: tensors, or dicts (str keys), lists and tuples of tensors (a
            recsys model's feature dict); the manifest records each tensor's shape and dtype
            (``inputs``) and how they nest (``input_structure``), from which ``hwaware bench`` builds
            its batches.
        device: ``"cpu"`` (GPU kernels come with the Triton issue).
        output_fn: ``fn(model, batch) -> (preds, target)``; default: ``predict_step`` (where the
            model's class defines one, else ``model(*batch[:-1])`` for a tuple batch) and the
            batch's ``label``/``target``/last element.
        batch_hooks: for a LightningModule that overrides ``on_before_batch_transfer``,
            ``transfer_batch_to_device`` or ``on_after_batch_transfer``: run them on every
            ``val_dataloader`` batch before the model (and ``output_fn``) sees it, as Lightning's
            validation loop does (in that order, ``dataloader_idx=0``, on ``device``; manifest
            ``regression.batch_hooks``), so the gate measures the inputs the model is validated on.
            False: the loader's batches are already as the model's step takes them.
            ``example_inputs`` are never passed through them.
        embedding_bits: 8 (default) or 4, for tables of a model quantized post-training (a model QAT
            trained has its tables' width: another one is refused).
        skip: post-training only: ``fnmatch`` patterns of layers to leave FP32 (as
            ``ProgressiveQuantization(skip=...)``; a model QAT trained has its callback's).
        layer_specs: post-training only: per-layer weight specs, as ``ProgressiveQuantization``'s
            (``{"head": QuantSpec(bits=4, granularity="per_group", group_size=32)}``), each one a deploy
            op packs; an ``"activation"`` override may be None (weight-only) or per-token dynamic:
            post-training export takes no calibration, so it serves activations per token or float.
        sparse24: pack every 2:4 Linear (e.g. pruned by :class:`SemiStructuredSparsity`) in the
            compressed form, with int8 values when it is int8-quantized; for each, the available
            kernels are timed on the layer's shape (rows from the first validation batch or
            ``example_inputs``) and the fastest that keeps its math is used; the manifest's
            ``selection`` records every measurement and the choice.
        int8_impls: the ``int8_linear`` CPU implementations export may choose from (default: all of
            ``"int_mm"``, ``"fbgemm"``, ``"dequant"``). They differ in what they do to the input, so
            two exports of the same weights choosing by timing can serve slightly different outputs;
            one implementation (``("int_mm",)``) makes the served numbers the same for every export.

    Every int8 Linear is timed the same way under each CPU implementation of
    ``hwaware::int8_linear`` (``int_mm``: the exact per-token math through ``torch._int_mm``,
    fast where the CPU has AMX/VNNI; ``fbgemm``: fbgemm's per-tensor GEMM on pre-scaled rows, fast
    on AVX2; ``dequant``: the codes dequantized once to fp32, for layers too small for int8 to pay
    off), at :data:`hwaware.export.selection.NOMINAL_ROWS` rows when no input sizes it; the
    fastest runs in the artifact. With ``val_dataloader``, each implementation is first gated on
    its own (every int8 layer on it; manifest ``regression.by_impl``) and only those that pass are
    timed: they differ in what they do to the input, and the verdict must not depend on timing. Pass
    ``example_inputs`` at the serving batch size: which implementation is fastest depends on the
    row count.

    Raises:
        ValueError: bad arguments, a model with nothing to quantize, a metric that does not match
            the model's output.
        RegressionError: the exported model's metric dropped more than ``max_drop`` (with int8
            layers: on every implementation, or on the chosen mix of them).
        TypeError: ``val_dataloader`` is a one-use iterator (export reads it several times); a layer
            to pack holds a dtype no deploy op serves (float64: they take float32, bfloat16, float16;
            checked before any pass over the data); the model (or ``output_fn``) gives the gate a
            dict or tuple where it needs the predictions tensor.
        ArtifactError: ``path`` cannot take an artifact (checked before any work).
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {METRICS}")
    max_drop = _real_scalar("max_drop", max_drop)
    if isinstance(device, torch.device) and device == torch.device("cpu"):
        device = "cpu"
    if device != "cpu":
        raise ValueError(f"device={device!r}; export measures and gates on 'cpu' only for now (the CUDA kernels are "
                         f"registered: hwaware.load(path, device='cuda') runs an artifact on them)")
    if embedding_bits is not None and (type(embedding_bits) is not int or embedding_bits not in (4, 8)):
        raise ValueError(f"embedding_bits={embedding_bits!r}; expected None (8 bits post-training) or the int 4 or 8")
    if int8_impls is not None:
        given = int8_impls
        int8_impls = (int8_impls,) if isinstance(int8_impls, str) else tuple(int8_impls) if isinstance(int8_impls, Iterable) else None
        if not int8_impls or not all(isinstance(i, str) and i in INT8_KERNELS["cpu"] for i in int8_impls):
            raise ValueError(f"int8_impls={given!r}; expected None or some of {INT8_KERNELS['cpu']}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects an nn.Module, got {type(model).__name__}")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        # torch.compile's wrapper: its layers are the model's under "_orig_mod.", and the class it records is
        # torch's, so load(model=TheClass) found no layer of the artifact (the compiled code is not exported)
        model = model._orig_mod
    if reference is not None and not isinstance(reference, (nn.Module, collections.abc.Mapping)):
        raise TypeError(f"export: reference={reference!r}; expected None, an nn.Module or a state_dict (a mapping of "
                        "tensors; load a saved one first, e.g. torch.load(file, weights_only=True))")
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"export: path={path!r}; expected a directory path (str or os.PathLike)")
    if example_inputs is not None:
        example_inputs = _check_example_inputs(model, example_inputs)
    if val_dataloader is not None and not isinstance(val_dataloader, collections.abc.Iterable):
        raise TypeError(f"val_dataloader={type(val_dataloader).__name__}; expected a DataLoader or a list of batches")
    loaders = (list(val_dataloader.values()) if isinstance(val_dataloader, collections.abc.Mapping)
               else val_dataloader if isinstance(val_dataloader, (list, tuple)) else [])
    if loaders and any(isinstance(x, torch.utils.data.DataLoader) for x in loaders):
        # (Lightning takes several validation loaders so; here each was read as a batch, and the
        # error said the batch had no target)
        raise TypeError(f"val_dataloader is a {type(val_dataloader).__name__} of {len(loaders)} loader(s); export gates on one "
                        "validation loader (its metric over one set): pass val_dataloader=loaders[0], or export once per "
                        "loader. (A list of batches is taken too: each element one batch)")
    if isinstance(val_dataloader, collections.abc.Sized) and _known_len(val_dataloader) == 0:
        raise ValueError("export: val_dataloader yielded no batches (it is empty)")
    if isinstance(val_dataloader, collections.abc.Iterator):
        raise TypeError(f"val_dataloader is a one-use iterator ({type(val_dataloader).__name__}): export reads it several "
                        "times (the reference, each int8 implementation, the exported model); pass a DataLoader or a list "
                        "of batches")
    path = os.fsdecode(path)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite={overwrite!r}; expected True or False")
    if not isinstance(batch_hooks, bool):
        raise TypeError(f"batch_hooks={batch_hooks!r}; expected True or False")
    skip = skip_patterns(skip)
    overrides = normalize_layer_specs(layer_specs)
    states = quant_states(model)
    for pattern, entry in overrides.items() if not states else ():  # (a QAT model: refused below)
        # no calibration: only what the deploy kernels quantize as it comes (per token) is served
        act = entry.get("activation", _PTQ_ACT)
        if act is not None and act != _PTQ_ACT:
            raise ValueError(f"layer_specs[{pattern!r}]['activation'] is {act.short()}; post-training export takes no "
                             "calibration and serves a Linear's input per token or float: use "
                             "QuantSpec(bits=8, granularity='per_row', dynamic=True) or None (weight-only), or train the "
                             "static spec with ProgressiveQuantization")
    if not isinstance(sparse24, bool):
        raise TypeError(f"sparse24={sparse24!r}; expected True or False")
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn={output_fn!r}; expected None or a function (module, batch) -> (predictions, targets)")
    # every run of the model on validation batches (the weight watch, both sides of the gate, the
    # rows kernels are timed on) reads them through the LightningModule's batch hooks, where it
    # overrides any: the same transformed batches for all; a plain module reads the loader as it is
    hooks = list(overridden_batch_hooks(model)) if batch_hooks and val_dataloader is not None else []
    val_batches = HookedBatches(val_dataloader, model, torch.device(device), "export") if hooks else val_dataloader
    if val_batches is not None:  # every read from the same random state, checked to give the same samples
        val_batches = ReplayedReads(val_batches, "export")
    check_target(path, overwrite)  # an unwritable path is refused now, not after the gate

    ptq = not states
    trained_bits = sorted({st.weight.spec.bits for st in states.values() if st.kind in ("embedding", "embedding_bag")})
    if not ptq and embedding_bits is not None and any(b != embedding_bits for b in trained_bits):
        raise ValueError(f"export: embedding_bits={embedding_bits} chooses the tables' width for post-training "
                         f"export; the tables of {type(model).__name__} were QAT trained at {trained_bits} bits, and "
                         "export packs them as trained (QAT at 4 bits: ProgressiveQuantization(embedding_spec="
                         "QuantSpec(bits=4, ...)))")
    if not ptq and (skip or overrides):
        raise ValueError(f"export: skip= and layer_specs= choose what post-training export quantizes; "
                         f"{type(model).__name__} was quantized by QAT ({len(states)} layers), whose callback's skip / "
                         "layer_specs decided its layers: export packs them as trained")
    if ptq:
        embedding_bits = 8 if embedding_bits is None else embedding_bits
        table = QuantSpec(bits=embedding_bits, granularity="per_row", symmetric=False, dynamic=True,
                          scale_dtype="float32" if embedding_bits == 8 else "float16")
        plan, skipped = find_quantizable(model, weight_spec=_PTQ_WEIGHT, activation_spec=_PTQ_ACT, embedding_spec=table,
                                         skip=skip, layer_specs=overrides)
        unpackable = unpackable_specs({n: (kind, w) for n, (kind, w, _) in plan.items()})
        if unpackable:
            raise ValueError("export: layer_specs asks post-training export for specs no deploy op packs (the layers would "
                             "stay FP32; skip= says that): " + "; ".join(f"{n}: {why}" for n, why in unpackable.items()))
        if not plan:
            raise ValueError(f"{type(model).__name__} has no quantized or quantizable layer to export (skipped: {skipped or 'none found'})")
        skipped = {name: f"skipped by post-training quantization: {why}" for name, why in skipped.items()}
        states = attach_quantization(model, plan)
    else:
        skipped = _qat_skipped(model, states)
    try:
        _check_served_dtypes(model, states)
        read_outside = {}
        if example_inputs is not None or val_dataloader is not None:  # one batch through the model, weights watched
            if example_inputs is None and hooks:
                # hooked before the watch, which would take a hook's read of a weight (its dtype) for
                # the model's; the global RNG left as the watch leaves it
                with torch.random.fork_rng(devices=[]):
                    first = _first_batch(val_batches)
                run = lambda: (output_fn or _default_output)(model, first)  # noqa: E731
            elif example_inputs is not None:
                def run() -> Any:
                    try:
                        return model(*example_inputs)
                    except Exception as e:  # noqa: BLE001  re-raised as it is, with a note saying which call
                        e.add_note("export: raised by the model's forward on example_inputs (tensors of shapes "
                                   f"{[list(t.shape) for t in input_leaves(example_inputs)]}), "
                                   "run once before packing: pass the inputs forward takes, at the serving batch")
                        raise
            else:
                run = lambda: (output_fn or _default_output)(model, _first_batch(val_dataloader))  # noqa: E731
            read_outside = weights_read_outside_call(model, [n for n, st in states.items() if st.enabled], run)
        else:
            warnings.warn("export got neither val_dataloader nor example_inputs: no regression gate runs, and a layer "
                          "whose weight forward reads outside the layer's call (a tied head, a parent using it) cannot be "
                          "found, so it is packed and fails when called; pass example_inputs (the serving batch) at "
                          "least", UserWarning, stacklevel=_user_stacklevel())
        deploy, layers, dense = _build_deploy(model, states, sparse24=sparse24, skipped=skipped, qat=not ptq,
                                              read_outside=read_outside)
    finally:
        if ptq:
            detach_quantization(model)  # (attention modules it routed too: the user's model as it was)
    if not layers:
        raise ValueError(f"nothing to pack: every quantized layer stays dense ({dense})")
    own_rows = _derive_tied_rows(deploy, layers)  # (the gate below measures the rows it serves)
    unpackable = unpackable_specs({n: (st.kind, st.weight.spec) for n, st in states.items() if st.enabled})
    if unpackable and not ptq:
        warnings.warn(f"export: {len(unpackable)} layer(s) QAT quantized have no deploy op and are exported dense (FP32): "
                      + "; ".join(f"{n}: {why}" for n, why in unpackable.items()), UserWarning, stacklevel=_user_stacklevel())
    unpacked24 = [name for name, meta in layers.items() if meta.get("sparse24_unpacked")]
    if unpacked24:
        warnings.warn(f"export: {len(unpacked24)} 2:4-pruned layer(s) quantized int4 are packed as dense int4, without "
                      f"the 2:4 compression (no int4 2:4 format): {', '.join(unpacked24)}. Their 2:4 pattern stays in the "
                      "values; the manifest notes it. Quantize them int8 per_channel to get sparse24_int8 packing",
                      UserWarning, stacklevel=_user_stacklevel())
    # a layer reached through a container under another name (self.proj also self.mlp[0]) is
    # recorded under its first name: the one its manifest entry and weights have
    first_name = {id(deploy.get_submodule(n)): n for n in layers}
    for name, relu_name in fuse_relu(deploy).items():
        layers[first_name.get(id(deploy.get_submodule(name)), name)].update(relu=True, fused_relu=relu_name)

    report, allowed, ref_value, references = None, None, None, None
    by_impl: Dict[str, Dict[str, Any]] = {}  # filled when int8 layers are gated (allowed then lists the passing ones)
    gated_configs: Dict[str, Dict[str, Dict[str, str]]] = {}
    if val_dataloader is not None:
        sources: List[str] = []
        ref_value = _evaluate(_reference_module(model, reference), val_batches, metric, output_fn, sources,
                              who="the FP32 reference")
        target_source = sources[0]
        if metric == "auroc" and ref_value < 0.5:
            warnings.warn(f"export: the reference scores AUROC {ref_value:.4f}, below chance: its predictions rank negatives "
                          "above positives, as a score for the negative class does (a two-class softmax's column 0, a "
                          "negated logit). An inverted score inverts the gate: a worse export scores higher and passes. "
                          "Gate on the positive class's score (output_fn=), or on a reference that has learned",
                          UserWarning, stacklevel=_user_stacklevel())
        others = {label: _evaluate(_reference_module(model, sd), val_batches, metric, output_fn,
                                   who=f"the FP32 reference ({label})")
                  for label, sd in (other_fp32_references(model) if reference is None else {}).items()}
        final_value = None
        if ptq and reference is None and fp32_reference(model) is not None:
            # post-training export of a model pruned 2:4 (no QAT): the FP32 model being quantized is the
            # model as given, and the dense one kept at pruning start may not have learned yet (a trial's
            # scored at chance, and a drop of 0.016 passed max_drop=0.01)
            final_value = others[_AS_GIVEN] = _evaluate(_fp32_copy(model), val_batches, metric, output_fn,
                                                        who="the FP32 model as given")
        if others:  # (2:4 pruning before QAT: the dense model then, and the model at QAT start)
            references = {"dense at 2:4 pruning start": ref_value, **others}
            ref_value = max(references.values())  # the better FP32 model: the gate is the stricter
        _keep_derived_rows(deploy, layers, own_rows, lambda: _evaluate(deploy, val_batches, metric, output_fn), ref_value,
                           float(max_drop), metric)
        if _int8_layers(deploy):
            # every int8 implementation gated on its own before any is timed: they differ in what they
            # do to the input (dequant keeps it float), so a choice by time alone made the gate's
            # verdict depend on a timing race; only those that pass may be chosen
            by_impl, gated_configs = _gate_each_impl(deploy, val_batches, metric, output_fn, ref_value, float(max_drop),
                                                     int8_impls or INT8_KERNELS["cpu"])
            allowed = [impl for impl, r in by_impl.items() if r["passed"]]
            if not allowed:
                best = max(by_impl, key=lambda i: by_impl[i]["exported"])
                report = {"metric": metric, "reference": ref_value, **({"references": references} if references else {}),
                          "exported": by_impl[best]["exported"],
                          "drop": by_impl[best]["drop"], "max_drop": float(max_drop), "passed": False,
                          "measured_on": "cpu, hwaware deploy ops", "target": target_source, "by_impl": by_impl,
                          **({"batch_hooks": hooks} if hooks else {})}
                raise RegressionError(
                    f"export refused: {metric} dropped {by_impl[best]['drop']:.5f} (reference {ref_value:.5f} -> exported "
                    f"{by_impl[best]['exported']:.5f} on {best}" + (
                        ", the best of the int8 implementations; " + ", ".join(
                            f"{i} {r['exported']:.5f}" for i, r in by_impl.items() if i != best) if len(by_impl) > 1 else "")
                    + f"), more than max_drop={max_drop}; nothing was written at {path!r}", report)
    if allowed is None and int8_impls is not None:  # no gate ran: the implementations the caller allowed
        allowed = list(int8_impls)
    if any(isinstance(m, (Sparse24Linear, Int8Linear)) for m in deploy.modules()):
        if example_inputs is not None:
            rows = capture_rows(deploy, lambda: deploy(*example_inputs))
        elif val_dataloader is not None:
            first = _first_batch(val_batches)
            rows = capture_rows(deploy, lambda: (output_fn or _default_output)(deploy, first))
        else:
            rows = {}
        records = select_sparse24_kernels(deploy, rows, device="cpu", allowed=allowed)
        records.update(select_int8_kernels(deploy, rows, device="cpu", allowed=allowed))
        # (after both: a run of int8 layers may hold 2:4 ones, timed as one int8_mlp24 call)
        for name, rec in select_int8_chains(deploy, records, allowed=allowed).items():
            m = deploy.get_submodule(name)
            layers[name]["kernels"] = dict(m.kernels)
            layers[name]["kernel"] = {"cpu": _selected_label(
                "sparse24_linear" if isinstance(m, Sparse24Linear) else "int8_linear", m, rec)}
            layers[name]["selection"] = {"cpu": rec}
    if val_dataloader is not None:
        exp_value = _gated_value(deploy, val_batches, metric, output_fn, by_impl, gated_configs)
        if allowed and by_impl and ref_value - exp_value > max_drop:  # (no by_impl: every int8 layer is pinned)
            # the per-layer fastest mix fails where every layer on one passing implementation passed:
            # serve the best of those everywhere (measured above), so the verdict never depends on timing
            best = max(allowed, key=lambda i: by_impl[i]["exported"])
            int8 = {id(m) for m in _int8_layers(deploy)}
            for name, m in deploy.named_modules():
                if id(m) in int8:
                    _set_impl(m, best)
                    rec = layers[name]["selection"]["cpu"]
                    rec["why"] = (f"{rec['why']}; the per-layer fastest mix dropped {ref_value - exp_value:.5f} > max_drop, "
                                  f"so every int8 layer runs {best}, the best implementation that passed alone")
                    rec["chosen"] = rec["op_kernel"] = m.kernels["cpu"]
                    layers[name]["kernels"] = dict(m.kernels)
                    layers[name]["kernel"] = {"cpu": _selected_label(
                        "sparse24_linear" if isinstance(m, Sparse24Linear) else "int8_linear", m, rec)}
            exp_value = _gated_value(deploy, val_batches, metric, output_fn, by_impl, gated_configs)
    for name, meta in layers.items():  # what the chosen kernel does to the layer's input
        served = _served_activation(deploy.get_submodule(name))
        if served is not None:
            meta["activation"] = served
    for runs in chain_int8(deploy).values():  # int_mm layers in a row: one int8_mlp call (deploy.Int8Chain)
        for run in runs:
            sparse = [n for n in run if isinstance(deploy.get_submodule(n), Sparse24Linear)]
            label = (f"hwaware::int8_mlp24 [cpu: int_mm, {run[0]} .. {run[-1]} in one call, each epilogue writing the "
                     f"next layer's int8 input; 2:4 layers {', '.join(sparse)} on their int8 codes decompressed once]"
                     if sparse else f"hwaware::int8_mlp [cpu: int_mm, {run[0]} .. {run[-1]} in one call, "
                                    "each epilogue writing the next layer's int8 input]")
            for name in run:
                name = first_name.get(id(deploy.get_submodule(name)), name)
                layers[name]["chain"] = run
                layers[name]["kernel"] = {"cpu": label}

    slow = _int8_vs_fp32(layers)
    if slow is not None:
        if slow["int8_us"] > 1.25 * slow["fp32_us"]:
            warnings.warn(
                f"export: at the rows they were timed on, the {slow['layers']} int8 layer(s) run outside an int8_mlp chain "
                f"take {slow['int8_us']:.1f} us in all on the kernels export chose, where the same layers in FP32 (F.linear) "
                f"took {slow['fp32_us']:.1f} us: small layers cost more as hwaware ops (each call's overhead) than their "
                "FP32 GEMM does. The artifact is smaller, but may serve slower than the FP32 model at this batch size: "
                "time it with hwaware bench PATH (manifest int8_vs_fp32)", UserWarning, stacklevel=_user_stacklevel())
    if val_dataloader is not None:
        drop = ref_value - exp_value
        report = {"metric": metric, "reference": ref_value, **({"references": references} if references else {}),
                  "exported": exp_value, "drop": drop,
                  "max_drop": float(max_drop), "passed": drop <= max_drop, "measured_on": "cpu, hwaware deploy ops",
                  "target": target_source}
        if hooks:  # the batches the gate ran on (and took the targets from) came through these
            report["batch_hooks"] = hooks
        if reference is None and fp32_reference(model) is not None:
            # The gate's reference is the FP32 model at QAT (or pruning) start, so training since moves the
            # drop too. Not gated, recorded: the final weights with quantization off, and how much of
            # the metric the export itself costs against them.
            report["final_weights_fp32"] = final_value if final_value is not None else _evaluate(
                _fp32_copy(model), val_batches, metric, output_fn, who="the model's final weights in FP32")
            report["quantization_drop"] = report["final_weights_fp32"] - exp_value
        if allowed is not None:  # what load(kernels="measure") may switch to on another CPU
            report["by_impl"] = by_impl
        if not report["passed"]:
            raise RegressionError(
                f"export refused: {metric} dropped {drop:.5f} (reference {ref_value:.5f} -> exported {exp_value:.5f}), "
                f"more than max_drop={max_drop}; nothing was written at {path!r}", report)

    aliases = module_aliases(model)  # stored once, under the module's first name; load re-points them
    _share_packed(deploy, layers)
    # tables whose rows are an int8 layer's codes (_derive_tied_rows): not stored, derived at load
    derived_rows = {f"{n}.weight": meta.pop("rows_from") for n, meta in layers.items() if "rows_from" in meta}
    state = {k: v for k, v in deploy.state_dict().items() if not _under(k, aliases)}
    tensors, tied_tensors = _stored_once({k: v for k, v in state.items() if k not in derived_rows})
    _note_tied(layers, state, tied_tensors, derived_rows)
    # non-persistent buffers (e.g. an index table built in __init__) travel too, so load can build
    # the model on the meta device and never allocate its FP32 weights
    for name, buf in deploy.named_buffers():
        if name not in tensors and name not in tied_tensors and name not in derived_rows and buf is not None:
            tensors[_BUFFER_PREFIX + name] = buf.detach().contiguous().cpu()
    fp32_bytes = float_bytes(model)  # each floating tensor once: a tied weight is two state_dict entries
    cls = type(model)
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        where = ("in __main__ (the running script)" if cls.__module__ == "__main__" else
                 f"inside a function ({cls.__module__}.{cls.__qualname__})")
        warnings.warn(f"export: the model's class {cls.__name__} is defined {where}, so the artifact records "
                      f"'{cls.__module__}.{cls.__qualname__}', which no other process can import: load it "
                      f"elsewhere with hwaware.load(path, model={cls.__name__}), and bench it with hwaware bench PATH "
                      f"--model module:{cls.__name__} once the class lives at the top of an importable module", UserWarning,
                      stacklevel=_user_stacklevel())
    hparams, unrecorded = _record_hparams(getattr(model, "hparams", None))
    if unrecorded:
        warnings.warn(f"export: the manifest cannot record the model's hparams "
                      f"{', '.join(f'{k} ({t})' for k, t in unrecorded.items())} (not JSON): load will need the model "
                      f"built by you, hwaware.load(path, model={cls.__qualname__}(...)); hwaware bench cannot rebuild it (time it with "
                      "hwaware.export.bench.compare_throughput)",
                      UserWarning, stacklevel=_user_stacklevel())
    manifest = {
        "model": {"class": f"{cls.__module__}.{cls.__qualname__}", "hparams": hparams,
                  **({"hparams_unrecorded": unrecorded} if unrecorded else {}),
                  **({"hparams_tuples": tuples} if (tuples := _tuple_paths(hparams or {})) else {})},
        "post_training": ptq,
        **({"post_training_options": {"skip": list(skip), "layer_specs": {
            p: {k: (v.to_dict() if v is not None else None) for k, v in e.items()} for p, e in overrides.items()}}}
           if ptq and (skip or overrides) else {}),
        "layers": layers,
        "dense_layers": dense,
        "regression": report,
        "fp32_bytes": fp32_bytes,
        "packed_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    if slow is not None:
        manifest["int8_vs_fp32"] = slow
    if aliases:
        manifest["module_aliases"] = aliases
    if tied_tensors:
        manifest["tied_tensors"] = tied_tensors
    if derived_rows:
        manifest["derived_rows"] = derived_rows
    if int8_impls is not None:
        manifest["int8_impls"] = list(int8_impls)  # what the caller let export choose from
    if any("selection" in meta for meta in layers.values()):
        manifest["selection_cpu"] = cpu_profile()  # what the kernels were timed on (load compares it)
    if example_inputs is not None:
        manifest["inputs"] = [_describe_input(x) for x in input_leaves(example_inputs)]
        if (structure := _input_structure(example_inputs)) is not None:  # (dicts / lists of tensors: how to rebuild them)
            manifest["input_structure"] = structure
    program_writer = None
    if example_inputs is not None:
        program, manifest["program"] = _export_program(deploy, tuple(example_inputs))
        program_writer = lambda p: _save_program(program, p)  # noqa: E731
    if isinstance(val_batches, ReplayedReads):
        val_batches.finish()  # the random state as one read of the loader leaves it
    write_artifact(path, manifest, tensors, program_writer=program_writer, overwrite=overwrite)
    return Artifact(path=path, manifest=verify_artifact(path), report=report, model=deploy)


def model_class(manifest: Dict[str, Any], path: str) -> type:
    """The model class recorded at export, where hwaware builds it without being asked: one of
    hwaware's own (``hwaware.recsys.dlrm.DLRM``), imported from this environment.

    Any other class is the caller's to name (``load(path, model=Class)``; the CLI's ``--model
    module:Class``). Building a class runs its constructor with the hparams the manifest holds, and
    whoever can write an artifact can edit its manifest (the sha256 fields are recomputable): a
    constructor that reads a path or a hub name from its arguments then runs code the artifact
    chooses. A trial made torchmetrics' ``CLIPScore`` import a module shipped inside the artifact's
    directory this way, through a class that was installed, defined at the top of its module and
    an ``nn.Module``: checks on the class cannot tell a safe constructor from such a one."""
    mpath = os.path.join(path, "manifest.json")
    name = manifest["model"]["class"]
    module_name, _, qualname = name.rpartition(".")
    parts = name.split(".")
    ours = (len(parts) >= 2 and parts[0] == "hwaware" and all(p.isidentifier() for p in parts)
            and not any(p.startswith("__") for p in parts))
    if not ours:
        if "<locals>" in name:  # defined inside a function: importable nowhere
            where = "was defined inside a function (no process can import it)"
        elif module_name == "__main__":
            where = "was defined in the script that exported it"
        else:
            where = "is not one of hwaware's"
        raise ArtifactError(
            f"{mpath}: model class {name!r} {where}. hwaware builds only its own classes from a manifest: building "
            "another would run its constructor with the manifest's hparams, which anyone who can write the artifact "
            f"can edit. Pass the class {name} (or an instance built as at export): hwaware.load({path!r}, model=...); from "
            f"the shell: hwaware bench {path} --model module:Class")
    obj: Any = None
    for i in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module; the rest are attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        break
    # the class itself must be hwaware's and named by its own path: through an hwaware module's
    # attributes a name reaches other libraries' classes (hwaware.recsys.dlrm.torch.nn.Transformer)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__.startswith("hwaware.")
            and f"{obj.__module__}.{obj.__qualname__}" == name):
        raise ArtifactError(f"{mpath}: model class {name!r} is not an nn.Module class of this hwaware; pass "
                            "model= with the class to build")
    return obj


def import_model_class(spec: str) -> Union[type, Callable[[], nn.Module]]:
    """The ``nn.Module`` class named ``"module:Class"`` (``Class`` may be dotted: ``module:Outer.Inner``),
    imported; or a function there that takes no arguments and returns the model built as at export
    (for a class whose constructor arguments the manifest does not record: a plain ``nn.Module``).
    ``ValueError`` naming ``spec`` when it is malformed or not importable, ``TypeError`` when it
    names something else."""
    module_name, sep, qualname = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not (sep and module_name and qualname):
        raise ValueError(f"model class {spec!r}; expected 'module:Class', e.g. 'mypkg.models:CTR'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model class {spec!r}: module {module_name!r} is not importable here ({e}); run from the "
                         "directory that holds it or put that directory on PYTHONPATH") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model class {spec!r}: module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, part)
    def no_argument_function(f: Any) -> bool:
        try:
            return (_inspect.isfunction(f) or isinstance(f, functools.partial)) and all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                                                  for p in _inspect.signature(f).parameters.values())
        except (TypeError, ValueError):
            return False

    if not ((isinstance(obj, type) and issubclass(obj, nn.Module)) or no_argument_function(obj)):
        raise TypeError(f"model class {spec!r} is {obj!r}; expected an nn.Module subclass, or a function of no "
                        "arguments that returns the model")
    return obj


def is_factory(cls: Any) -> bool:
    """A model factory (:func:`import_model_class`'s function form), not a class."""
    return not isinstance(cls, type) and callable(cls)


def _selection_record(meta: Dict[str, Any], name: str, path: str) -> Optional[Dict[str, Any]]:
    """A layer's recorded CPU selection, or None; ArtifactError when the manifest holds another type."""
    sel = meta.get("selection")
    if sel is None:
        return None
    rec = sel.get("cpu") if isinstance(sel, dict) else None
    if not isinstance(rec, dict):
        raise ArtifactError(f"{path}/manifest.json: layer {name!r} has selection {sel!r}; expected {{'cpu': {{...}}}}")
    return rec


# export times each layer at the rows of example_inputs (the serving batch): 2^28 float32 elements
# (1 GiB) is far above any batch export would time, and bounds what an edited manifest can allocate
_MAX_TIMING_ELEMENTS = 1 << 28


def _timing_rows(manifest: Dict[str, Any], path: str, module_of: Callable[[str], nn.Module]) -> Dict[str, int]:
    """``{layer: rows}`` export timed each measured layer at, refused where re-timing would allocate
    more than export ever times at (``module_of(name)`` gives the layer: its ``in_features``)."""
    rows: Dict[str, int] = {}
    for name, meta in manifest["layers"].items():
        rec = _selection_record(meta, name, path)
        shape = rec.get("input_shape") if rec is not None else None
        if isinstance(shape, list) and shape and type(shape[0]) is int and shape[0] > 0:
            rows[name] = shape[0]
            width = getattr(module_of(name), "in_features", 1)
            if shape[0] * width > _MAX_TIMING_ELEMENTS:  # the manifest sizes what is allocated here
                raise ArtifactError(
                    f"{path}/manifest.json: layer {name!r} records kernel timing input_shape {shape}: re-timing it "
                    f"would allocate a {shape[0]} x {width} float input ({shape[0] * width * 4 / 2**30:.1f} GiB), more "
                    f"than the {_MAX_TIMING_ELEMENTS * 4 // 2**30} GiB export ever times at; load with "
                    "kernels='recorded', or re-export with example_inputs of the serving batch")
    return rows


def _remeasure(model: nn.Module, manifest: Dict[str, Any], path: str) -> Dict[str, Dict[str, Any]]:
    """Re-time the measured layers' kernels on this CPU, at the input shapes export timed them at,
    among the ``int8_linear`` implementations that passed the regression gate on their own
    (``regression.by_impl``). Returns ``{name: selection record}``. The choice is per layer, so it
    can be a mix no gate ran as a whole (each implementation was gated on every layer at once)."""
    rows = _timing_rows(manifest, path, model.get_submodule)
    reg = manifest.get("regression")
    by_impl = reg.get("by_impl") if isinstance(reg, dict) else None
    if isinstance(by_impl, dict):  # names this hwaware does not know (a newer one wrote them) are left out
        allowed: Optional[list] = [i for i in INT8_KERNELS["cpu"] if isinstance(by_impl.get(i), dict) and by_impl[i].get("passed") is True]
        basis = f"implementations that passed the regression gate on every int8 layer: {allowed}"
    else:
        allowed = None
        basis = ("every implementation: the artifact has no per-implementation gate (exported without val_dataloader, "
                 "or by an hwaware before it)")
    pinned = manifest.get("int8_impls")
    if isinstance(pinned, list) and allowed is None:  # export(int8_impls=...) without a gate: those only
        allowed = [i for i in INT8_KERNELS["cpu"] if i in pinned]
        basis = f"the implementations export was given (int8_impls): {allowed}"
    if allowed == []:
        warnings.warn(f"{path}: load(kernels='measure'): no int8_linear implementation this hwaware runs passed the "
                      "regression gate on every layer by itself (only the recorded mix did); the int8 layers keep their "
                      "recorded kernels", KernelPortabilityWarning, stacklevel=3)
        int8 = {id(m) for m in _int8_layers(model)}
        rows = {n: r for n, r in rows.items() if id(model.get_submodule(n)) not in int8}
        allowed = None
    here = cpu_profile()
    records: Dict[str, Dict[str, Any]] = {}
    timed = {n: m for n, m in model.named_modules() if n in rows}
    before = {n: dict(m.kernels) for n, m in timed.items()}
    records.update(select_sparse24_kernels(model, rows, device="cpu", allowed=allowed, only=set(rows)))
    records.update(select_int8_kernels(model, rows, device="cpu", allowed=allowed, only=set(rows),
                                       fp32_reference=False))  # (nothing at load reads it)
    select_int8_chains(model, records, allowed=allowed)
    for name, rec in records.items():
        rec.update(recorded=before[name].get("cpu"), measured_on=here, allowed=basis)
    # timing built every candidate's derived weights (fp32 copies, prepacked ones): keep none of them,
    # the chosen kernel's are rebuilt on its first call
    hwaware_ops._CACHE.drop([t for m in timed.values() for t in m.buffers()])
    return records


def _runs_integer_kernel(meta: Any) -> bool:
    """Whether a layer's recorded CPU kernel runs int8 arithmetic: an int8 layer on int_mm or fbgemm,
    a 2:4 int8 layer on ``dense`` (int_mm's math on its codes) or fbgemm."""
    kernels = meta.get("kernels") if isinstance(meta, dict) else None
    kernel = kernels.get("cpu", "auto") if isinstance(kernels, dict) else "auto"
    scheme = meta.get("scheme") if isinstance(meta, dict) else None
    return (scheme == "int8" and kernel in ("auto", "int_mm", "fbgemm")
            or scheme == "sparse24_int8" and kernel in ("dense", "fbgemm"))


def _portability_warning(manifest: Dict[str, Any], path: str) -> None:
    """KernelPortabilityWarning when this CPU lacks what the kernels were timed on (and it matters)."""
    measured_on = manifest.get("selection_cpu")
    if measured_on is None:
        return
    if (not isinstance(measured_on, dict) or (measured_on.get("isa") is not None and isa_list(measured_on) is None)
            or measured_on.get("int8_engine") not in (*native.ENGINES, None)):
        raise ArtifactError(f"{path}/manifest.json: selection_cpu {measured_on!r}; expected "
                            "{'model': str, 'isa': [str, ...], 'amx_in_use': bool, 'int8_engine': "
                            f"{' | '.join(map(repr, native.ENGINES))} | None}}")
    recs = {n: _selection_record(meta, n, path) for n, meta in manifest["layers"].items()}
    # the integer kernels are what a missing instruction set or int8 pass slows down; a layer that
    # chose float math (dequant, dense, csr) runs the same fp32 matmul as the FP32 model
    timed = [n for n, rec in recs.items() if rec is not None and "measured" in rec and _runs_integer_kernel(manifest["layers"][n])]
    int_mm = any(rec is not None and rec.get("chosen") in ("int_mm", "int8") for rec in recs.values())  # int8: 2:4 on int_mm
    lost = lost_features(measured_on, cpu_profile(), amx_matters=int_mm)
    passes = [f for f in lost if f.startswith("hwaware ")]
    cause = _why_no_pass(passes[0].split()[1].lower()) if passes and len(passes) == len(lost) else None
    if cause and timed:  # the same instruction sets here: the pass is off in this process, not missing from the CPU
        warnings.warn(
            f"{path}: its CPU kernels were timed with {passes[0]} (on {measured_on.get('model', '?')!r}), which this process "
            f"does not run: {cause}. The integer kernel recorded for {len(timed)} layer(s) ({', '.join(timed[:4])}"
            f"{', ...' if len(timed) > 4 else ''}) may be many times slower here", KernelPortabilityWarning, stacklevel=3)
    elif lost and timed:
        warnings.warn(
            f"{path}: its CPU kernels were timed on {measured_on.get('model', '?')!r}, which has {', '.join(lost)}; this "
            f"CPU lacks {'it' if len(lost) == 1 else 'them'}: the integer kernel recorded for {len(timed)} layer(s) "
            f"({', '.join(timed[:4])}{', ...' if len(timed) > 4 else ''}) may be many times slower here; "
            "load(path, kernels='measure') re-times them on this CPU", KernelPortabilityWarning, stacklevel=3)


def _why_no_pass(engine: str) -> Optional[str]:
    """Why hwaware's int8 pass does not run on ``engine`` in this process when the CPU has what it
    needs: the C library is not loaded (``HWAWARE_NO_NATIVE``, no compiler, an unwritable cache), or
    the engine is turned off. None when neither (the CPU or OS lacks it after all)."""
    status = native.native_status()
    if not status.startswith("loaded"):
        return f"hwaware's C library is not in use ({status})"
    flag = f"HWAWARE_NO_{engine.upper()}"
    return f"{flag} is set" if os.environ.get(flag) else None


def _load_device(device: Any) -> str:
    """``"cpu"`` or ``"cuda[:N]"`` from a string or ``torch.device`` (``"cpu:0"`` is the CPU)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device={device!r}; expected 'cpu', 'cuda', 'cuda:N' or a torch.device")
    try:
        d = torch.device(device)
    except RuntimeError:
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device (torch {torch.__version__}); load with device='cpu'")
    return "cpu" if d.type == "cpu" else str(d)


def _check_own_class_size(hparams: Any, n_tensors: int, mpath: str) -> None:
    """hwaware's own model classes build at least one weight per entry of a list hparam (``DLRM``: a
    table per table size, a Linear per MLP width). More entries than the weights file holds tensors
    cannot be the exported model, and an edited manifest's 300k table sizes took minutes and
    1.6 GB to build before the weights check refused them."""
    if not isinstance(hparams, dict):
        return  # build_recorded names the malformed entry
    entries = sum(len(v) for v in hparams.values() if isinstance(v, list))
    if entries > n_tensors:
        raise ArtifactError(f"{mpath}: the recorded hparams list {entries} tables / layers, but weights.safetensors "
                            f"holds {n_tensors} tensors: not the model this artifact was exported from")


def _own_meta_tensors(m: nn.Module) -> List[str]:
    """The names of ``m``'s own tensors on the meta device that are neither parameters nor buffers:
    plain tensor attributes, a torchmetrics metric's states and their defaults (tensors or lists)."""
    found = []
    for attr, value in vars(m).items():
        values = value.items() if attr == "_defaults" and isinstance(value, dict) else [(attr, value)]
        for key, v in values:
            if any(isinstance(t, Tensor) and t.is_meta for t in (v if isinstance(v, (list, tuple)) else [v])):
                found.append(key)
    return sorted(set(found))


def _settle_meta_built(model: nn.Module) -> List[str]:
    """After a model built on the meta device got its tensors from the artifact: a module that records
    its device (a LightningModule, a torchmetrics metric: ``_device``) and holds no meta tensor of its
    own gets the CPU recorded (a metric's meta ``_device`` made ``.to()`` and a Trainer fail on a
    model whose every tensor was on the CPU). Returns the meta tensors no artifact restores, by name."""
    left = []
    for name, m in model.named_modules():
        own = _own_meta_tensors(m)
        left += [f"{name}.{k}" if name else k for k in own]
        device = m.__dict__.get("_device")
        if not own and isinstance(device, torch.device) and device.type == "meta":
            m._device = torch.device("cpu")
    return left


_REPLACES = {nn.Linear: (Int8Linear, Int4Linear, Sparse24Linear), nn.EmbeddingBag: (RowwiseEmbeddingBag,),
             nn.Embedding: (RowwiseEmbedding,)}


def _check_replaces(new: nn.Module, old: nn.Module, name: str, mpath: str, whose: str) -> None:
    """``ArtifactError`` when the deploy layer the manifest describes cannot stand in for the model's
    layer: another kind (an int8 Linear where the model has a table), another weight shape (a table
    of other rows or width), or another computation around the weight (a table's mode, padding_idx
    or include_last_offset; a Linear's bias). Each failed only at the first call, or served other
    outputs without a word."""
    entry = new.describe()
    kind = next((k for k in _REPLACES if isinstance(old, k)), None)
    if kind is None:  # an instance loaded before holds a deploy layer: it stands for the kind it replaced
        kind = next((k for k, types in _REPLACES.items() if type(old) in types), None)
        if kind is None or type(new) not in _REPLACES[kind]:
            raise ArtifactError(f"{mpath}: layer {name!r} is a {type(new).__name__} in the artifact, but {whose} has a "
                                f"{type(old).__name__} there: not the model this artifact was exported from")
        before = old.describe()
        here = {f: before.get(f) for f in ("shape", "bias", "mode", "include_last_offset", "padding_idx")}
        if kind is nn.Embedding and (before.get("padding_idx") is None or entry.get("padding_idx") is None):
            del here["padding_idx"]  # (an attribute only, which earlier artifacts did not record)
    elif type(new) not in _REPLACES[kind]:  # (export packs only Linear and Embedding(Bag) layers)
        raise ArtifactError(f"{mpath}: layer {name!r} is a {type(new).__name__} in the artifact, but {whose} has a "
                            f"{type(old).__name__} there: not the model this artifact was exported from")
    else:  # the model's own layer: what export recorded from it
        here = {} if nn.parameter.is_lazy(old.weight) else {"shape": list(old.weight.shape)}  # (a LazyLinear: no shape yet)
        if kind is nn.Linear:
            here["bias"] = old.bias is not None
        elif kind is nn.EmbeddingBag:
            here.update(mode=old.mode, include_last_offset=old.include_last_offset, padding_idx=old.padding_idx)
        else:  # an nn.Embedding is a bag of one row per index (its padding_idx only stops gradients;
            # artifacts written before it was kept as an attribute do not record it: the model's is taken)
            here.update(mode="sum", include_last_offset=False)
            if entry.get("padding_idx") is not None:
                here["padding_idx"] = old.padding_idx
    shape = list(entry["shape"])
    if "shape" in here and here.pop("shape") != shape:
        got = old.describe()["shape"] if type(old) in _REPLACES[kind] else old.weight.shape
        raise ArtifactError(f"{mpath}: layer {name!r} holds a {shape[0]} x {shape[1]} weight in the artifact, but "
                            f"{whose} has {type(old).__name__} weight {list(got)}: not the model this artifact was "
                            "exported from")
    for attr, value in here.items():
        got = entry.get(attr)
        if got != value:
            raise ArtifactError(f"{mpath}: layer {name!r} has {attr}={got!r} in the artifact, but {whose} has a "
                                f"{type(old).__name__} with {attr}={value!r} there: not the model this artifact was "
                                "exported from")


def load(path: Union[str, os.PathLike], device: str = "cpu", model: Union[None, nn.Module, type] = None,
         kernels: str = "recorded") -> nn.Module:
    """Rebuild the deployed model from an artifact: verified first, never unpickled.

    The architecture comes from ``model`` (an instance, modified in place, or a class built with
    the hparams recorded at export) or, by default, from the class recorded at export when it is
    one of hwaware's own (``hwaware.recsys.DLRM``; any other class the caller names, since building
    it runs its constructor on the manifest's hparams); the weights come from ``weights.safetensors``. ``program.pt2`` is only hash-checked here: ``torch.export.load`` is the
    way to run it (it unpickles, so hwaware never calls it).

    ``device="cuda"`` (or ``"cuda:N"``) moves the loaded model there; its packed layers then run the
    Triton kernels registered as the ops' CUDA implementations (2:4 layers: the kernel the
    manifest chose for ``cuda``, else ``"dense"``). Export measures kernels on CPU only for now.

    ``kernels``: ``"recorded"`` runs the CPU kernels export chose, timed on the export machine
    (manifest ``selection_cpu``); when this CPU lacks an instruction set that one had (AMX-INT8,
    VNNI, AVX-512, ...), a :class:`KernelPortabilityWarning` says which layers may be much slower
    here. ``"measure"`` re-times the candidates on this CPU at the shapes export timed them at and
    runs the fastest, choosing int8 layers' implementations only among those that passed the
    regression gate on their own (manifest ``regression.by_impl``); the new records are in the
    returned model's ``hwaware_selection``.
    """
    if kernels not in ("recorded", "measure"):
        raise ValueError(f"kernels={kernels!r}; expected 'recorded' (export's choice) or 'measure' (re-time on this CPU)")
    device = _load_device(device)
    if model is not None and not (isinstance(model, nn.Module) or (isinstance(model, type) and issubclass(model, nn.Module))):
        raise TypeError(f"load(model={model!r}): expected an nn.Module class or instance (import the class; the "
                        "CLI's --model MODULE:CLASS is a command-line form)")
    path = os.fsdecode(path)
    manifest, tensors = read_verified(path)  # every file hashed once; the weights are the bytes hashed
    mpath = os.path.join(path, "manifest.json")
    info, layers = manifest.get("model"), manifest.get("layers")
    if not isinstance(info, dict) or not isinstance(info.get("class"), str):
        raise ArtifactError(f"{mpath}: 'model' is {info!r}; expected {{'class': str, 'hparams': {{...}}}}")
    if not isinstance(layers, dict) or not all(isinstance(m, dict) for m in layers.values()):
        raise ArtifactError(f"{mpath}: 'layers' is not an object of layer entries")
    given = model is not None and not isinstance(model, type)
    recorded = info.get("hparams")
    if given and isinstance(recorded, dict) and getattr(model, "hparams", None) is not None:
        # as the manifest holds them (JSON: a tuple is a list), so that equal hparams compare equal
        here = json.loads(json.dumps(_record_hparams(model.hparams)[0]))
        diff = sorted(k for k in set(recorded) | set(here or {}) if (here or {}).get(k, "<unset>") != recorded.get(k, "<unset>"))
        if here is not None and diff:
            # the packed layers replace the instance's, but whatever forward reads from the instance
            # (a scale, a width not in a packed layer) is the instance's: say it differs
            warnings.warn(f"{path}: the model passed as model= was built with other hparams than the exported one ("
                          + ", ".join(f"{k}: given {here.get(k, '<unset>')!r}, exported {recorded.get(k, '<unset>')!r}"
                                      for k in diff[:8])
                          + "); the packed layers come from the artifact, anything else forward reads from this instance",
                          UserWarning, stacklevel=2)
    if not given:
        cls = model or model_class(manifest, path)
        if model is None:  # (after model_class: another class is refused with what to pass instead)
            tied = manifest.get("tied_tensors")  # (entries stored once count as the tensors they are; at most
            # as many as are stored: a manifest's count alone would let an edited one past this check)
            n_tied = sum(1 for src in tied.values() if src in tensors) if isinstance(tied, dict) else 0
            _check_own_class_size(info.get("hparams"), len(tensors) + min(n_tied, len(tensors)), mpath)
        with meta_device():  # a skeleton: its FP32 weights are never allocated
            model = build_recorded(cls, manifest, path)
    # every check first, the model changed only after: a refused artifact leaves a model passed in as it was
    if given:
        whose = "the model passed as model="
    elif isinstance(recorded, dict):
        whose = f"{type(model).__qualname__}(**hparams recorded at export)"
    else:  # a plain nn.Module: nothing recorded, so the class's defaults
        whose = (f"{type(model).__qualname__}() (the manifest records no hparams: the exported model had no "
                 f"`hparams`; pass an instance built as at export, model={type(model).__qualname__}(...))")
    # attention modules whose projections the artifact packs: routed (their forward calls them) once
    # every check passed; until then their in_proj is the view routing would add
    attention = {n: m for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    routes = {p: attention[p] for n in layers for p, _, leaf in [n.rpartition(".")]
              if leaf in ("in_proj", "out_proj") and p in attention and routable(attention[p])}

    def layer_module(name: str) -> Optional[nn.Module]:
        parent, _, leaf = name.rpartition(".")
        if leaf == "in_proj" and parent in routes:
            return in_projection_view(routes[parent])
        return _get_module(model, name)

    new_layers: Dict[str, nn.Module] = {}
    for name, meta in layers.items():
        if not isinstance(meta.get("module"), str) or meta["module"] not in DEPLOY_TYPES:
            raise ArtifactError(f"{mpath}: layer {name!r} has unknown module {meta.get('module')!r}")
        parent, _, leaf = name.rpartition(".")
        owner = attention.get(parent)
        if (leaf in ("in_proj", "out_proj") and owner is not None and parent not in routes
                and not isinstance(owner, RoutedMultiheadAttention)):
            why = (route_refusal(owner) if type(owner) is nn.MultiheadAttention else
                   f"it is a {type(owner).__qualname__}, a subclass that may compute attention its own way")
            raise ArtifactError(f"{mpath}: layer {name!r} is packed in the artifact, but {whose}'s attention module "
                                f"{parent or type(owner).__name__!r} cannot be routed into layers ({why}), so its "
                                "forward would never call the packed layer: not the model this artifact was exported from")
        if layer_module(name) is None:
            built = "the model passed as model=" if given else f"{type(model).__name__}({info.get('hparams') or {}})"
            raise ArtifactError(f"{mpath}: layer {name!r} is not a module of {built}: not the model this artifact "
                                "was exported from")
        try:
            with torch.device("meta"):
                new_layers[name] = DEPLOY_TYPES[meta["module"]].empty(meta)
        except (KeyError, TypeError, ValueError, RuntimeError, ArithmeticError) as e:  # RuntimeError: torch refusing a negative size; ArithmeticError: group_size 0
            raise ArtifactError(f"{mpath}: layer {name!r} ({meta['module']}): its entry is malformed ({type(e).__name__}: "
                                f"{e})") from None
        _check_replaces(new_layers[name], layer_module(name), name, mpath, whose)
        if type(new_layers[name]) is RowwiseEmbedding and new_layers[name].padding_idx is None:
            new_layers[name].padding_idx = getattr(layer_module(name), "padding_idx", None)
        if "fused_relu" in meta:  # the ReLU module after this layer runs in its epilogue (deploy.fuse_relu)
            relu_name = meta["fused_relu"]
            relu = _get_module(model, relu_name)
            if meta["module"] != "Int8Linear" or meta.get("relu") is not True or type(relu) is not nn.ReLU:
                raise ArtifactError(f"{path}/manifest.json: layer {name!r} says it fused the ReLU {relu_name!r}, but "
                                    f"the model has {type(relu).__name__ if relu is not None else 'no module'} there")
        elif meta.get("relu", False) is not False:
            raise ArtifactError(f"{path}/manifest.json: layer {name!r} has relu={meta['relu']!r} without fused_relu")
    aliases = manifest.get("module_aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(a, str) and isinstance(n, str) for a, n in aliases.items()):
        raise ArtifactError(f"{mpath}: 'module_aliases' is {aliases!r}; expected {{alias: module name}}")
    for alias, name in aliases.items():  # one module under two names: stored once, the alias re-pointed below
        a, m = _get_module(model, alias), _get_module(model, name)
        if a is None or m is None or a is not m:
            raise ArtifactError(f"{mpath}: the exported model held module {name!r} also as {alias!r}; "
                                f"{type(model).__name__} {'has no ' + repr(alias if a is None else name) if a is None or m is None else 'holds two different modules there'}"
                                ": not the model this artifact was exported from")
    tied = manifest.get("tied_tensors", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(src, str) for k, src in tied.items()):
        raise ArtifactError(f"{mpath}: 'tied_tensors' is {tied!r}; expected {{state_dict key: the key whose tensor it is}}")
    for k, src in tied.items():  # one tensor under two keys (a dense tied weight): stored once
        if k in tensors or src not in tensors or k.startswith(_BUFFER_PREFIX) or src.startswith(_BUFFER_PREFIX):
            raise ArtifactError(f"{mpath}: 'tied_tensors' says {k!r} is {src!r}'s tensor, but weights.safetensors "
                                + (f"holds {k!r} itself" if k in tensors else f"has no {src!r}"))
        tensors[k] = tensors[src]
    derived = manifest.get("derived_rows", {})
    if not isinstance(derived, dict) or not all(isinstance(k, str) and isinstance(src, str) for k, src in derived.items()):
        raise ArtifactError(f"{mpath}: 'derived_rows' is {derived!r}; expected {{table weight key: the int8 layer whose "
                            "codes are its rows}")
    rows_of: Dict[str, Tensor] = {}  # one tensor per source layer, as export shared it between its tables
    for k, src in derived.items():  # a table tied to an int8 layer: its rows are the layer's codes (_derive_tied_rows)
        table_name, _, leaf = k.rpartition(".")
        table, head = new_layers.get(table_name), new_layers.get(src)
        if leaf != "weight" or not isinstance(table, RowwiseEmbeddingBag) or table.bits != 8:
            raise ArtifactError(f"{mpath}: 'derived_rows' derives {k!r}, which is not the weight of an 8-bit row-wise "
                                "table of the artifact")
        if type(head) is not Int8Linear or [head.out_features, head.in_features] != [table.num_embeddings, table.dim]:
            raise ArtifactError(f"{mpath}: 'derived_rows' derives {k!r} from {src!r}, which is not an Int8Linear layer "
                                f"of the artifact of shape [{table.num_embeddings}, {table.dim}] (the table's rows)")
        if k in tensors:
            raise ArtifactError(f"{mpath}: 'derived_rows' derives {k!r}, but " + (
                f"'tied_tensors' names it the tensor of {tied[k]!r}" if k in tied else "weights.safetensors holds it itself"))
        q, scale = tensors.get(f"{src}.qweight"), tensors.get(f"{src}.w_scale")
        if q is None or scale is None:
            continue  # (the check against the model below names what is missing)
        for t, leaf, dtype, shape in ((q, "qweight", torch.int8, (table.num_embeddings, table.dim)),
                                      (scale, "w_scale", torch.float32, (table.num_embeddings,))):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ArtifactError(f"{path}/weights.safetensors: {src + '.' + leaf!r} is {t.dtype} {tuple(t.shape)}; "
                                    f"{mpath} (its layer entry) expects {dtype} {shape}")
        try:
            _check_positive_scale(scale)
        except ValueError as e:
            raise ArtifactError(f"{path}/weights.safetensors: layer {src!r}: w_scale: {e}") from None
        if src not in rows_of:
            rows_of[src] = packing.rowwise_from_int8(q, scale)
        tensors[k] = rows_of[src]
    extra = {k[len(_BUFFER_PREFIX):]: tensors.pop(k) for k in list(tensors) if k.startswith(_BUFFER_PREFIX)}
    # the state_dict the model will have once the deploy layers are in (an alias's entries: its module's)
    # (an attention module's FP32 in-projection Parameters, once its in_proj is packed, are dropped)
    dropped = {child_name(p, leaf) for p in attention if child_name(p, "in_proj") in new_layers
               for leaf in ("in_proj_weight", "in_proj_bias")}
    expected = {k: v for k, v in model.state_dict().items()
                if not _under(k, new_layers) and not _under(k, aliases) and k not in dropped}
    for name, new in new_layers.items():
        expected.update({f"{name}.{k}": v for k, v in new.state_dict().items()})
    if set(tensors) != set(expected):
        raise ArtifactError(f"{path}/weights.safetensors does not match the model: missing {sorted(set(expected) - set(tensors))[:5]}, "
                            f"unexpected {sorted(set(tensors) - set(expected))[:5]}")
    for k, t in tensors.items():  # load_state_dict(assign=True) would take any dtype, and fail in the op
        want = expected[k]
        packed = k.rpartition(".")[0] in layers  # a deploy layer's own tensor: its dtype is the format's
        if t.shape != want.shape or (t.dtype != want.dtype and (packed or not (t.is_floating_point() and want.is_floating_point()))):
            raise ArtifactError(f"{path}/weights.safetensors: {k!r} is {t.dtype} {tuple(t.shape)}; "
                                + (f"{mpath} (its layer entry) expects" if packed else f"{whose} has")
                                + f" {want.dtype} {tuple(want.shape)}")
    del expected
    for name, new in new_layers.items():
        for leaf in ("bias", "values"):  # float tensors of a packed layer: a NaN bias served NaN outputs, silently
            t = tensors.get(f"{name}.{leaf}")
            if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                i = int((~torch.isfinite(t)).reshape(-1).nonzero()[0])
                raise ArtifactError(f"{path}/weights.safetensors: layer {name!r}: {leaf} must be finite everywhere, got "
                                    f"{float(t.reshape(-1)[i])} at flat index {i}")
        if isinstance(new, Int4Linear):
            try:  # a NaN, zero or negative scale (or a zero point off 4 bits) failed only at the first call
                _check_int4_values(tensors[f"{name}.scales"], tensors.get(f"{name}.zeros"))
            except ValueError as e:
                raise ArtifactError(f"{path}/weights.safetensors: layer {name!r}: {e}") from None
            continue
        scale = tensors.get(f"{name}.w_scale")
        if isinstance(new, (Sparse24Linear, Int8Linear)) and scale is not None:
            try:  # a NaN or -inf scale served NaN outputs without a word (int4 scales are checked in the op)
                _check_positive_scale(scale)
            except ValueError as e:
                raise ArtifactError(f"{path}/weights.safetensors: layer {name!r}: w_scale: {e}") from None
        if isinstance(new, RowwiseEmbeddingBag):
            try:  # inside the packed rows: a NaN scale or offset served NaN for every bag reading the row
                packing.check_rowwise_qparams(tensors[f"{name}.weight"], new.bits)
            except ValueError as e:
                raise ArtifactError(f"{path}/weights.safetensors: table {name!r}: {e}") from None
            continue
        if isinstance(new, Sparse24Linear):
            try:
                new.verify(tensors[f"{name}.metadata"])
            except ValueError as e:
                raise ArtifactError(f"{path}/weights.safetensors: layer {name!r}: {e}") from None
            int8_values = tensors[f"{name}.values"].dtype == torch.int8
            allowed_kernels = tuple(SPARSE24_INT8_KERNEL.values()) if int8_values else ("dense", "csr")
            kernel, expect = new.kernels.get("cpu", "dense"), f"for {'int8' if int8_values else 'float'} values one of"
        elif isinstance(new, Int8Linear):
            kernel, allowed_kernels, expect = new.kernels.get("cpu", "auto"), ("auto", *INT8_KERNELS["cpu"]), "'auto' or one of"
        else:
            continue
        if kernel not in allowed_kernels:
            raise ArtifactError(f"{path}/manifest.json: layer {name!r} names CPU kernel {kernel!r}; "
                                f"expected {expect} {[k for k in allowed_kernels if k != 'auto']}")
    owners = {}
    for name in extra:  # non-persistent buffers: each one of a module the artifact does not replace
        owner_name, _, leaf = name.rpartition(".")
        owner = None if _under(name, new_layers) or _under(name, aliases) else (
            _get_module(model, owner_name) if owner_name else model)
        if owner is None or leaf not in owner._buffers or leaf not in owner._non_persistent_buffers_set:
            raise ArtifactError(f"{path}/weights.safetensors: {_BUFFER_PREFIX + name!r} is not a non-persistent buffer of "
                                "the model (export stores only those under that prefix)")
        # (its shape is the model's own business: a cache sized on first use is saved grown)
        owners[name] = (owner, leaf)
    restored = set(tensors) | set(extra)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t is not None and t.is_meta
               and n not in restored and n not in dropped and not _under(n, new_layers) and not _under(n, aliases)]
    if missing:
        raise ArtifactError(f"{path}: the model holds tensors the artifact does not restore: {missing[:5]}")
    if device == "cpu" and kernels == "measure":  # (its refusals, before the model changes)
        _timing_rows(manifest, path, lambda n: new_layers[n] if n in new_layers else model.get_submodule(n))
    elif device == "cpu":
        _portability_warning(manifest, path)
    # the model changes from here on; nothing below refuses the artifact
    for m in routes.values():
        route_attention(m)
    for name, new in new_layers.items():
        _set_module(model, name, new)
    drop_packed_in_projections(model)
    for alias, name in aliases.items():
        _set_module(model, alias, model.get_submodule(name))
        tensors.update({alias + k[len(name):]: t for k, t in list(tensors.items()) if k.startswith(name + ".")})
    model.load_state_dict(tensors, strict=True, assign=True)  # assign: the loaded tensors are the weights
    for k, src in tied.items():  # tied again: one tensor under both names, as exported (a Parameter
        # may also be another module's buffer)
        (owner, leaf), (src_owner, src_leaf) = (
            (model.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2]) for n in (k, src))
        shared = src_owner._parameters.get(src_leaf, src_owner._buffers.get(src_leaf))
        for table in (owner._parameters, owner._buffers):
            if leaf in table and shared is not None:
                table[leaf] = shared
    for name, buf in extra.items():
        owner, leaf = owners[name]
        owner._buffers[leaf] = buf
    detach_quantization(model)  # as at export: a QAT-trained instance's dense leftovers compute as FP32
    keep_layers_called(model)  # a fresh TransformerEncoderLayer would multiply its deploy layers' (absent) .weight
    if device == "cpu" and kernels == "measure":
        model.hwaware_selection = _remeasure(model, manifest, path)
    # as at export: each ReLU after an int8 layer in its epilogue (the ReLU module stays: a direct call
    # of either child computes what it did), CPU int_mm layers in a row as one int8_mlp call
    fuse_relu(model)
    chain_int8(model)
    unbuilt = _settle_meta_built(model)  # (an instance passed in may have been built on meta too: bench's probe)
    if unbuilt:
        # forward may well work (a metric's states are not read by it), but .to() / .cpu() / a Trainer fail on them
        warnings.warn(f"{path}: {type(model).__name__} was built on the meta device"
                      f"{' (its FP32 weights are never allocated)' if not given else ''}, "
                      f"and these tensors of it are neither parameters nor buffers, so the artifact holds no values for them: "
                      f"{', '.join(unbuilt[:6])}{', ...' if len(unbuilt) > 6 else ''}. A forward that reads them fails, and so "
                      f"do .to(), .cpu() and a Trainer; pass an instance built as at export "
                      f"(model={type(model).__qualname__}(...)), or make plain tensors buffers (register_buffer)",
                      UserWarning, stacklevel=2)
        return model.to(device).eval() if device != "cpu" else model.eval()
    return model.to(device).eval()  # (also on the CPU: a LightningModule built on meta says .device meta until moved)
