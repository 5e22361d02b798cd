"""`FakeQuantizer`: observer + fake quantization (+ optional LSQ scale) for one tensor of one layer.

Three kinds, chosen by the spec and the role of the tensor:

- *static* (activations with an observer): the observer collects ranges during calibration and
  early QAT; after :meth:`FakeQuantizer.freeze` the stored scale is fixed.
- *dynamic* (``spec.dynamic``, per-token activations, and gathered embedding rows): the scale is
  computed from each tensor as it arrives, exactly as the deployed kernel does.
- *weights*: until frozen the scale tracks the current weight (min-max of the weight as it is now,
  not a running range over stale weights); frozen or learnable (LSQ) scales are fixed/learned.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from hwaware.quant import primitives as P
from hwaware.quant.observers import make_observer
from hwaware.quant.spec import QuantSpec

__all__ = ["FakeQuantizer"]


class FakeQuantizer(nn.Module):
    """Observe and fake-quantize one tensor role (``"weight"`` or ``"activation"``) of a layer.

    Args:
        spec: the quantization of this tensor.
        name: layer-qualified name used in error messages (e.g. ``"top_mlp.0.weight"``).
        role: ``"weight"`` or ``"activation"``.
    """

    def __init__(self, spec: QuantSpec, name: str, role: str) -> None:
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"FakeQuantizer role={role!r}; expected 'weight' or 'activation'")
        self.spec = spec
        self.name = name
        self.role = role
        # weights with a min-max spec track the live weight directly; everything static uses an observer
        self._tracks_weight = role == "weight" and spec.observer == "minmax" and not spec.dynamic
        self.observer = None if (spec.dynamic or self._tracks_weight) else make_observer(spec, name)
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0, dtype=torch.float32 if spec.float_offset else torch.int32))
        self.register_buffer("frozen", torch.tensor(False))
        # LSQ: the scale used is lsq_base * exp(learned_log_scale) (see make_learnable)
        self.register_buffer("lsq_base", None)
        self.learned_log_scale: Optional[nn.Parameter] = None
        self.observe = True
        self.quantize = False
        self._last_range = None  # range statistics of the last tensor ranged without an observer
        self._is_frozen = False  # mirrors the `frozen` buffer without a tensor read per call

    # -- state ------------------------------------------------------------------------------
    @property
    def has_qparams(self) -> bool:
        return self.scale.numel() > 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # buffers start empty (shape unknown until the first tensor): take the saved shapes
        for key in ("scale", "zero_point"):
            if prefix + key in state_dict:
                setattr(self, key, torch.empty_like(state_dict[prefix + key], device=self.scale.device))
        if prefix + "learned_scale" in state_dict:
            raise ValueError(
                f"{self.name!r}: this quantizer state holds a learned scale as hwaware 0.1.0 before LSQ "
                "learned its logarithm wrote it (key 'learned_scale'); it cannot be resumed by this version. "
                "Resume from a checkpoint written before QAT started, or from the FP32 weights")
        lk = prefix + "learned_log_scale"
        if lk in state_dict and self.learned_log_scale is None:
            self.learned_log_scale = nn.Parameter(torch.empty_like(state_dict[lk]))
            self.lsq_base = torch.empty_like(state_dict[lk])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_frozen = bool(self.frozen)

    def _check_finite(self, t: Tensor) -> None:
        if not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"layer {self.name!r} ({self.role}) saw NaN/inf values during quantization; "
                "the FP32 model is diverging or its inputs hold NaN/inf"
            )

    def check_finite(self) -> None:
        """Raise (naming the layer) if the last tensor this quantizer ranged held NaN/inf.

        Dynamic and weight-tracking quantizers do not sync on every call to look (that is a large
        share of a small model's step); the callback calls this when a step's loss is not finite.
        """
        if self._last_range is not None:
            for t in self._last_range:
                self._check_finite(t)

    def update_qparams(self, tensor: Optional[Tensor] = None) -> None:
        """Refresh the stored scale from the observer (or, for weights, from ``tensor``)."""
        if self.spec.dynamic:
            return
        if self._tracks_weight:
            if tensor is None:
                raise ValueError(f"{self.name!r}: a weight quantizer needs the weight to compute qparams")
            mn, mx = P.channel_range(P.as_channels(tensor, self.spec), self.spec)
            self._last_range = (mn, mx)
            scale, zp = P.compute_qparams(mn, mx, self.spec)
        else:
            scale, zp = self.observer.calculate_qparams()
        self.scale = scale.to(self.scale.device)
        self.zero_point = zp.to(self.scale.device)

    def freeze(self) -> None:
        """Stop observing; the current scale is used from now on (and by export)."""
        self.observe = False
        self.frozen.fill_(True)
        self._is_frozen = True

    def make_learnable(self) -> nn.Parameter:
        """Learn the scale from now on (LSQ); returns the parameter to put in an optimizer.

        The parameter is the scale's natural log relative to the current scale (zeros at first, so
        nothing changes until a step): the scale used is ``lsq_base * exp(learned_log_scale)``. So
        it stays > 0, and a step changes it by a relative amount (Adam: about ``lr``). Learned
        directly, an Adam step moves a scale by about ``lr`` in absolute terms, often the size of
        the scale itself (1e-3..1e-2 for weights): a trial with AdamW at lr 3e-3 drove half of each
        layer's weight scales below zero, which fake quant of a symmetric range does not notice and
        export cannot pack."""
        if not self.has_qparams:
            raise ValueError(f"{self.name!r}: cannot make the scale learnable before it is calibrated")
        if self.learned_log_scale is None:
            self.lsq_base = self.scale.detach().float().clone()
            self.learned_log_scale = nn.Parameter(torch.zeros_like(self.lsq_base))
        self.observe = False
        return self.learned_log_scale

    def _learned_scale(self) -> Tensor:
        return self.lsq_base * torch.exp(self.learned_log_scale)

    def current_scale(self) -> Tensor:
        """The scale fake quantization uses now (and export packs with): a learned one rounded to
        ``scale_dtype`` as the forward rounds it."""
        if self.learned_log_scale is None:
            return self.scale
        with torch.no_grad():
            return P.round_scale(self._learned_scale(), self.spec)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, observe: bool = True) -> Tensor:
        """Fake-quantize ``x``. ``observe=False`` (the layer is in eval mode: validation, the
        sanity check, KL validation) leaves an observer's statistics alone, an activation's or a
        weight's (``observer="moving_average"`` / ``"histogram"``): ranges come from training
        batches only, so validation data never calibrates, ``limit_val_batches`` does not change
        training, and a run resumed from a checkpoint (whose sanity check runs validation batches
        again) ends where the uninterrupted one did. A min-max weight quantizer that tracks the
        live weight keeps no statistics (its scale is a function of the weight as it is now) and
        tracks it either way."""
        if self.spec.dynamic:
            if not self.quantize:
                return x
            y, _, _, stat = P.fake_quantize_dynamic(x, self.spec)
            self.__dict__["_last_range"] = (stat,)  # hot path: skip nn.Module.__setattr__ (slow)
            return y
        if self.learned_log_scale is not None:  # LSQ: the scale is learned, nothing is observed
            if not self.quantize:
                return x
            return P.fake_quantize_learnable(x, self._learned_scale(), self.zero_point, self.spec)
        if self.observe and (observe or self._tracks_weight) and not self._is_frozen:
            if self._tracks_weight:
                if self.quantize:  # calibration does not need weight scales yet
                    y, scale, zp, stat = P.fake_quantize_dynamic(x, self.spec)
                    # hot path: write the buffers directly, not through nn.Module.__setattr__
                    self.__dict__["_last_range"] = (stat,)
                    self._buffers["scale"] = scale  # export packs with exactly these
                    if zp is not None:
                        self._buffers["zero_point"] = zp
                    elif self.zero_point.shape != scale.shape:
                        self._buffers["zero_point"] = torch.zeros_like(scale, dtype=torch.int32)
                    return y
            else:
                self.observer(x)
                if self.quantize:
                    self.update_qparams()
        if not self.quantize:
            return x
        if not self.has_qparams:
            self.update_qparams(x if self.role == "weight" else None)
        return P.fake_quantize(x, self.scale, self.zero_point, self.spec)

    def extra_repr(self) -> str:
        return f"{self.name}, {self.spec.short()}, role={self.role}, observe={self.observe}, quantize={self.quantize}"
