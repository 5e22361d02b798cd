"""KL validation of quantization error: per layer, and of the model's output distribution.

Per layer, :class:`LayerErrorCollector` hooks every quantized layer; on each call it re-runs the
layer in FP32 on the *same* input, so the layer's error is isolated from upstream layers. Its KL is
the mean per-sample :func:`channel_kl`: the layer's output read as a distribution over its channels,
FP32 (P) against quantized (Q). SQNR (dB) is reported beside it. (A histogram of output values, as
:func:`histogram_kl` computes, was tried first and rejected for this: it reads discrete-valued
outputs such as a 3-row embedding table's as badly broken at int8, where the SQNR is high.)

The model output is compared as a distribution per sample (:func:`output_kl`): by default
Bernoulli(sigmoid(logit)) for a single logit (CTR models), softmax over the last dimension
otherwise; probabilities and multi-label / multi-task outputs are read as the caller says.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from hwaware.quant.attach import QuantState

__all__ = ["OUTPUT_KINDS", "channel_kl", "histogram_kl", "output_kl", "LayerErrorCollector", "collect_layer_errors", "KLViolationError"]

_EPS = 1e-8


class KLViolationError(RuntimeError):
    """Raised by ``on_kl_violation="raise"`` when a layer's quantization error is over the threshold."""


def histogram_kl(reference: Tensor, approx: Tensor, bins: int = 128, min_per_bin: int = 256) -> float:
    """``KL(P || Q)`` of the value histograms of ``reference`` (P) and ``approx`` (Q), in nats.

    Both use the same equal-width bins spanning the union of their ranges; empty bins are smoothed
    with a small epsilon so that Q never has zero mass where P has some. The bin count is ``bins``
    capped at ``numel / min_per_bin`` (at least 8): with few values per bin, moving a handful of
    samples across a bin edge reads as a large KL, and a layer with one output per sample (a CTR
    head) would look broken at int8 purely from sampling noise.
    """
    if bins < 2:
        raise ValueError(f"histogram_kl bins={bins!r}; expected an int >= 2")
    r = reference.detach().float().flatten()
    a = approx.detach().float().flatten()
    if r.numel() == 0:
        raise ValueError("histogram_kl got empty tensors")
    bins = int(min(bins, max(8, r.numel() // min_per_bin)))
    lo = float(torch.minimum(r.min(), a.min()))
    hi = float(torch.maximum(r.max(), a.max()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return math.inf
    if hi <= lo:
        return 0.0
    p = torch.histc(r, bins=bins, min=lo, max=hi).double()
    q = torch.histc(a, bins=bins, min=lo, max=hi).double()
    p = (p + _EPS) / (p + _EPS).sum()
    q = (q + _EPS) / (q + _EPS).sum()
    return float((p * (p / q).log()).sum().clamp_min(0.0))


OUTPUT_KINDS = ("logits", "probabilities", "multilabel_logits", "multilabel_probabilities")


def output_kl(reference: Tensor, approx: Tensor, kind: str = "logits") -> float:
    """Mean per-sample KL of the model's predictive distribution: FP32 (reference) vs quantized.

    ``kind`` says what the output's last dimension holds:
    - ``"logits"``: one column (or a 1-D output) is a binary logit, Bernoulli(sigmoid(x)); more
      columns are class logits, softmax over the last dimension;
    - ``"probabilities"``: the same distributions, already applied (sigmoid / softmax in forward);
    - ``"multilabel_logits"`` / ``"multilabel_probabilities"``: every column is its own binary
      outcome (multi-task heads, multi-label), and a sample's KL is the sum over them (the KL of
      the independent joint distribution).
    Read with the wrong kind the number is wrong, not an error: probabilities read as logits
    understate it (a trial read 2e-5 for a true 3.5e-4), two binary heads read as softmax logits
    cancel a shift they share.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"output_kl kind={kind!r}; expected one of {OUTPUT_KINDS}")
    r = reference.detach().double()
    a = approx.detach().double()
    if r.shape != a.shape:
        raise ValueError(f"output_kl: shapes differ, {tuple(r.shape)} vs {tuple(a.shape)}")
    if r.dim() == 0:
        r, a = r.reshape(1), a.reshape(1)
    binary = kind.startswith("multilabel") or r.dim() == 1 or r.shape[-1] == 1
    if binary:
        if r.dim() == 1 or not kind.startswith("multilabel"):
            r, a = r.reshape(-1, 1), a.reshape(-1, 1)
        if kind.endswith("logits"):
            r, a = torch.sigmoid(r), torch.sigmoid(a)
        p, q = r.clamp(_EPS, 1 - _EPS), a.clamp(_EPS, 1 - _EPS)
        kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        return float(kl.reshape(-1, kl.shape[-1]).sum(-1).mean())
    if kind == "logits":
        logp, logq = F.log_softmax(r, dim=-1), F.log_softmax(a, dim=-1)
    else:
        logp, logq = r.clamp_min(_EPS).log(), a.clamp_min(_EPS).log()
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


def channel_kl(reference: Tensor, approx: Tensor, channel_dim: int = -1) -> Tensor:
    """Per-sample ``KL(P || Q)`` of a layer's output distribution over its channels, in nats.

    ``P = softmax(reference / s)`` and ``Q = softmax(approx / s)`` along ``channel_dim``, with ``s``
    the standard deviation of ``reference`` (so the measure does not depend on the layer's scale).
    A single channel is a logit: ``P, Q`` are ``Bernoulli(sigmoid(.))``. Returns ``[samples]``.

    For small errors this is about ``0.5 * 10^(-SQNR/10)``: by that formula 45 dB gives ~1.6e-5,
    22 dB ~3e-3 and 8 dB ~0.08 (arithmetic, not measurements). Unlike a histogram of output
    values it has no sampling-noise floor and works for discrete-valued outputs (a small embedding
    table's bags).
    """
    r = reference.detach().double().movedim(channel_dim, -1)
    a = approx.detach().double().movedim(channel_dim, -1)
    r = r.reshape(-1, r.shape[-1])
    a = a.reshape(-1, a.shape[-1])
    if r.shape[-1] == 1:
        p = torch.sigmoid(r[:, 0]).clamp(_EPS, 1 - _EPS)
        q = torch.sigmoid(a[:, 0]).clamp(_EPS, 1 - _EPS)
        return (p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()).clamp_min(0.0)
    s = r.std().clamp_min(1e-12)
    logp = F.log_softmax(r / s, dim=-1)
    logq = F.log_softmax(a / s, dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


class LayerErrorCollector:
    """Measure each quantized layer's own error while the model runs with quantization enabled.

    On every call of a hooked layer, the layer is run again in FP32 on the *same* input; the
    collector accumulates the per-sample :func:`channel_kl` and the squared errors for SQNR::

        with LayerErrorCollector(states).attach_to(model) as c:
            for batch in batches:
                model(batch)
        c.results()  # {layer: {"kl": mean per-sample KL, "sqnr_db": ...}}

    Args:
        states: ``{name: QuantState}`` of the layers to measure.
    """

    def __init__(self, states: Dict[str, QuantState]) -> None:
        self.states = states
        self._kl_sum: Dict[str, float] = {n: 0.0 for n in states}
        self._rows: Dict[str, int] = {n: 0 for n in states}
        self._sq_err: Dict[str, float] = {n: 0.0 for n in states}
        self._sq_ref: Dict[str, float] = {n: 0.0 for n in states}
        self._handles = []
        self._busy = False
        self.paused = False  # True: forwards pass unmeasured (e.g. another validation loader's batches)

    def _hook(self, name: str):
        st = self.states[name]
        channel_dim = 1 if st.kind == "conv" else -1

        def hook(module, args, kwargs, output):
            if self._busy or self.paused or not st.enabled:
                return None
            self._busy = True
            try:
                st.enabled = False
                with torch.no_grad():
                    ref = module(*args, **kwargs)
            finally:
                st.enabled = True
                self._busy = False
            out = output.detach()
            kl = channel_kl(ref, out, channel_dim)
            self._kl_sum[name] += float(kl.sum())
            self._rows[name] += kl.numel()
            self._sq_err[name] += float((ref.double() - out.double()).pow(2).sum())
            self._sq_ref[name] += float(ref.double().pow(2).sum())
            return None

        return hook

    def __enter__(self) -> "LayerErrorCollector":
        return self

    def attach_to(self, model: torch.nn.Module) -> "LayerErrorCollector":
        for name, m in model.named_modules():
            if name in self.states:
                self._handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def results(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for name in self.states:
            if self._rows[name] == 0:
                continue
            err = self._sq_err[name]
            sqnr = math.inf if err == 0 else 10.0 * math.log10(max(self._sq_ref[name], 1e-30) / err)
            out[name] = {"kl": self._kl_sum[name] / self._rows[name], "sqnr_db": sqnr}
        return out


@contextmanager
def collect_layer_errors(model: torch.nn.Module, states: Dict[str, QuantState]) -> Iterator[LayerErrorCollector]:
    """``with collect_layer_errors(model, states) as c: ...`` — hooks attached for the block."""
    c = LayerErrorCollector(states)
    with c.attach_to(model):
        yield c
