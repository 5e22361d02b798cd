"""KL validation of quantization error: per layer, and of the model's output distribution.

Per layer, :class:`LayerErrorCollector` hooks every quantized layer; on each call it re-runs the
layer in FP32 on the *same* input and keeps a fixed random subsample of both outputs. The layer's
error is then isolated from upstream layers. Its KL is ``KL(P || Q)`` between the histograms of the
FP32 (P) and quantized (Q) output values over shared bins (the entropy measure TensorRT calibrates
with); its SQNR (dB) is reported beside it as the element-wise view.

The model output is compared as a distribution per sample: Bernoulli(sigmoid(logit)) for a single
logit (CTR models), softmax over the last dimension otherwise, averaged over samples.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from torch import Tensor

from hwaware.quant.attach import QuantState

__all__ = ["histogram_kl", "output_kl", "LayerErrorCollector", "collect_layer_errors", "KLViolationError"]

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


def output_kl(reference: Tensor, approx: Tensor) -> float:
    """Mean per-sample KL of the model's predictive distribution: FP32 (reference) vs quantized."""
    r = reference.detach().double()
    a = approx.detach().double()
    if r.shape != a.shape:
        raise ValueError(f"output_kl: shapes differ, {tuple(r.shape)} vs {tuple(a.shape)}")
    if r.dim() <= 1 or r.shape[-1] == 1:
        p = torch.sigmoid(r.flatten()).clamp(_EPS, 1 - _EPS)
        q = torch.sigmoid(a.flatten()).clamp(_EPS, 1 - _EPS)
        kl = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        return float(kl.mean())
    logp = F.log_softmax(r, dim=-1)
    logq = F.log_softmax(a, dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


class LayerErrorCollector:
    """Collect FP32-vs-quantized output samples of every quantized layer while the model runs.

    Use around forward passes of the model *with quantization enabled*::

        with LayerErrorCollector(states).attach_to(model) as c:
            for batch in batches:
                model(batch)
        c.results()  # {layer: {"kl": ..., "sqnr_db": ...}}

    Args:
        states: ``{name: QuantState}`` of the layers to measure.
        samples_per_call: values kept per layer per forward call (same positions for both outputs).
        bins: histogram bins for the KL.
        seed: subsampling seed, so that repeated validations are comparable.
    """

    def __init__(self, states: Dict[str, QuantState], samples_per_call: int = 4096, bins: int = 128, seed: int = 0) -> None:
        self.states = states
        self.samples_per_call = samples_per_call
        self.bins = bins
        self._gen = torch.Generator().manual_seed(seed)
        self._ref: Dict[str, List[Tensor]] = {n: [] for n in states}
        self._q: Dict[str, List[Tensor]] = {n: [] for n in states}
        self._sq_err: Dict[str, float] = {n: 0.0 for n in states}
        self._sq_ref: Dict[str, float] = {n: 0.0 for n in states}
        self._handles = []
        self._busy = False

    def _hook(self, name: str):
        st = self.states[name]

        def hook(module, args, kwargs, output):
            if self._busy or not st.enabled:
                return None
            self._busy = True
            try:
                st.enabled = False
                with torch.no_grad():
                    ref = module(*args, **kwargs)
            finally:
                st.enabled = True
                self._busy = False
            ref = ref.detach().float().flatten()
            out = output.detach().float().flatten()
            self._sq_err[name] += float((ref - out).double().pow(2).sum())
            self._sq_ref[name] += float(ref.double().pow(2).sum())
            n = ref.numel()
            if n > self.samples_per_call:
                idx = torch.randint(0, n, (self.samples_per_call,), generator=self._gen).to(ref.device)
                ref, out = ref[idx], out[idx]
            self._ref[name].append(ref.cpu())
            self._q[name].append(out.cpu())
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
            if not self._ref[name]:
                continue
            ref = torch.cat(self._ref[name])
            q = torch.cat(self._q[name])
            err = self._sq_err[name]
            sqnr = math.inf if err == 0 else 10.0 * math.log10(max(self._sq_ref[name], 1e-30) / err)
            out[name] = {"kl": histogram_kl(ref, q, self.bins), "sqnr_db": sqnr}
        return out


@contextmanager
def collect_layer_errors(model: torch.nn.Module, states: Dict[str, QuantState], **kwargs) -> Iterator[LayerErrorCollector]:
    """``with collect_layer_errors(model, states) as c: ...`` — hooks attached for the block."""
    c = LayerErrorCollector(states, **kwargs)
    with c.attach_to(model):
        yield c
