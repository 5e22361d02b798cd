"""Argument checks and metric reading shared by the callbacks."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import pytorch_lightning as pl
from torch import Tensor


def _check_int(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is invalid; expected {allowed}")


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is invalid; expected one of {tuple(allowed)}")


def _scalar_metrics(trainer: "pl.Trainer") -> Dict[str, float]:
    out = {}
    for k, v in trainer.callback_metrics.items():
        if isinstance(v, Tensor) and v.numel() == 1:
            out[k] = float(v)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out
