"""How hwaware runs a user's model on one of their batches (export's gate, the callback's output KL)."""
from __future__ import annotations

from typing import Any

from torch import nn


def model_predictions(module: nn.Module, batch: Any, who: str) -> Any:
    """``module``'s predictions for ``batch``: its ``predict_step(batch, 0)`` where its class defines
    one (Lightning's own default calls ``module(batch)``, which a ``(x, y)`` batch does not fit); else
    ``module(*inputs)`` for an ``(inputs..., target)`` tuple or list; else ``module(batch)``. A
    call that does not fit the model (``TypeError`` / ``AttributeError``) raises a ``ValueError``
    saying so and what to pass instead, from the original error."""
    step = getattr(type(module), "predict_step", None)
    custom = step is not None and not getattr(step, "__qualname__", "").startswith("LightningModule.")
    try:
        if custom:
            return module.predict_step(batch, 0)
        if isinstance(batch, (list, tuple)) and len(batch) >= 2:
            return module(*batch[:-1])
        return module(batch)
    except (TypeError, AttributeError) as e:
        how = ("its predict_step(batch, 0)" if custom else
               f"{type(module).__name__}(*batch[:-1])" if isinstance(batch, (list, tuple)) and len(batch) >= 2 else
               f"{type(module).__name__}(batch)")
        raise ValueError(f"{who}: ran the model on a batch ({type(batch).__name__}) as {how}, which raised "
                         f"{type(e).__name__}: {e}. Define predict_step(batch, batch_idx) returning the predictions, "
                         "or pass output_fn=") from e
