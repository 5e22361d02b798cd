"""`QuantSpec`: one validated description of how a tensor is quantized.

Everything downstream (observers, fake quantization, KL validation, export) reads the numerics
from a spec, so a spec is checked once, at construction, and is immutable afterwards.

Granularities (the tensor is viewed as 2-D ``[channels, values]`` by
:func:`hwaware.quant.primitives.as_channels`):

- ``per_tensor``: one scale for the whole tensor.
- ``per_channel``: one scale per output channel (dim 0: ``Linear`` ``[N, K]``, ``Conv`` ``[O, I, kh, kw]``),
  integer zero point when affine.
- ``per_group``: contiguous groups of ``group_size`` values along the last (input, K) dimension.
- ``per_row``: one scale per row of the last dimension. Symmetric per-row is dynamic per-token
  activation quantization; affine per-row is the FBGEMM row-wise layout of embedding tables, with a
  *float* offset (the row minimum) instead of an integer zero point.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

__all__ = ["QuantSpec", "GRANULARITIES", "OBSERVERS", "SCALE_DTYPES"]

GRANULARITIES = ("per_tensor", "per_channel", "per_group", "per_row")
OBSERVERS = ("minmax", "moving_average", "histogram")
SCALE_DTYPES = ("float32", "float16")
GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: integer width, 2 to 8.
        granularity: one of ``per_tensor``, ``per_channel``, ``per_group``, ``per_row``.
        group_size: required for ``per_group`` (one of 32, 64, 128); must be unset otherwise.
        symmetric: symmetric (zero point 0) or affine.
        narrow_range: symmetric only; drop the most negative level so the range is ``[-(2^(b-1)-1),
            2^(b-1)-1]`` (int8 ``[-127, 127]``, negation exact). Defaults to True at 8 bits and
            False below (int4 uses the full ``[-8, 7]``), as DESIGN.md fixes.
        dynamic: compute the scale from each tensor as it arrives (no observer state); only
            ``per_row`` (per-token) or ``per_tensor``.
        observer: ``minmax``, ``moving_average`` or ``histogram`` (entropy calibration; per-tensor only).
        averaging_constant: weight of the newest batch for the ``moving_average`` observer, in (0, 1].
        learnable: learn the scale during QAT (LSQ, Esser et al. 2020); not with ``dynamic`` or
            ``per_row`` affine. The optimizer learns the scale's log relative to its calibrated
            value, so the scale stays > 0 and a step (Adam: about lr) changes it relatively.
        scale_dtype: ``float32`` or ``float16``; scales (and row offsets) are rounded to this dtype
            during fake quantization so QAT sees exactly what the deployed format stores. An
            embedding table's spec takes its row format's (int8 rows: float32, int4: float16)
            whatever is given here: FBGEMM's layout fixes it.

    Raises:
        ValueError: any field outside its allowed set, or an inconsistent combination.
        TypeError: a field of the wrong type.
    """

    bits: int = 8
    granularity: str = "per_channel"
    group_size: Optional[int] = None
    symmetric: bool = True
    narrow_range: Optional[bool] = None
    dynamic: bool = False
    observer: str = "minmax"
    averaging_constant: float = 0.01
    learnable: bool = False
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise TypeError(f"QuantSpec.bits must be an int, got {type(self.bits).__name__} {self.bits!r}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"QuantSpec.bits={self.bits!r} is not supported; expected an int in [2, 8]")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity={self.granularity!r}; expected one of {GRANULARITIES}")
        if self.granularity == "per_group":
            if self.group_size not in GROUP_SIZES:
                raise ValueError(
                    f"QuantSpec.group_size={self.group_size!r} with granularity='per_group'; expected one of {GROUP_SIZES}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size!r} is only meaningful with granularity='per_group', "
                f"got granularity={self.granularity!r}"
            )
        for name in ("symmetric", "dynamic", "learnable"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"QuantSpec.{name} must be a bool, got {getattr(self, name)!r}")
        if self.narrow_range is None:
            object.__setattr__(self, "narrow_range", self.symmetric and self.bits == 8)
        if not isinstance(self.narrow_range, bool):
            raise TypeError(f"QuantSpec.narrow_range must be a bool or None, got {self.narrow_range!r}")
        if self.narrow_range and not self.symmetric:
            raise ValueError("QuantSpec.narrow_range=True requires symmetric=True (affine ranges are [0, 2^bits-1])")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantSpec.observer={self.observer!r}; expected one of {OBSERVERS}")
        if self.observer == "histogram" and self.granularity != "per_tensor":
            raise ValueError(
                f"QuantSpec.observer='histogram' supports granularity='per_tensor' only, got {self.granularity!r}"
            )
        if (not isinstance(self.averaging_constant, (int, float)) or isinstance(self.averaging_constant, bool)
                or not 0.0 < float(self.averaging_constant) <= 1.0):
            raise ValueError(f"QuantSpec.averaging_constant={self.averaging_constant!r}; expected a float in (0, 1]")
        if self.dynamic and self.granularity not in ("per_row", "per_tensor"):
            raise ValueError(
                f"QuantSpec.dynamic=True needs granularity 'per_row' (per-token) or 'per_tensor', got {self.granularity!r}"
            )
        if self.learnable and self.dynamic:
            raise ValueError("QuantSpec.learnable=True cannot be combined with dynamic=True (a dynamic scale is not a parameter)")
        if self.learnable and self.granularity == "per_row" and not self.symmetric:
            raise ValueError("QuantSpec.learnable=True is not supported for affine per_row (FBGEMM row-wise) tensors")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype={self.scale_dtype!r}; expected one of {SCALE_DTYPES}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.symmetric else 2 ** (self.bits - 1) - 1

    @property
    def float_offset(self) -> bool:
        """True for the FBGEMM row-wise layout: ``x = q * scale + offset`` with a float offset."""
        return self.granularity == "per_row" and not self.symmetric

    def replace(self, **changes) -> "QuantSpec":
        """A copy with ``changes`` applied (validated again)."""
        if ("bits" in changes or "symmetric" in changes) and "narrow_range" not in changes:
            changes["narrow_range"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        if not isinstance(d, dict):
            raise TypeError(f"QuantSpec.from_dict expects a dict, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"QuantSpec.from_dict: unknown fields {sorted(unknown)}")
        return cls(**d)

    def short(self) -> str:
        """Compact human label, e.g. ``int8/per_channel/sym`` or ``int4/g128/asym``."""
        gran = f"g{self.group_size}" if self.granularity == "per_group" else self.granularity
        kind = "sym" if self.symmetric else "asym"
        extra = "/dyn" if self.dynamic else ""
        return f"int{self.bits}/{gran}/{kind}{extra}"
