"""How hwaware runs a user's model on one of their batches (export's gate, the callback's output KL)."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Tuple

import torch
from torch import Tensor, nn

from hwaware.quant.attach import quantization_disabled


def defines_predict_step(module: nn.Module) -> bool:
    """Whether ``module``'s class defines its own ``predict_step`` (not Lightning's default, which
    calls ``module(batch)``)."""
    step = getattr(type(module), "predict_step", None)
    return step is not None and not getattr(step, "__qualname__", "").startswith("LightningModule.")


def _call(module: nn.Module, batch: Any) -> Tuple[Callable, Tuple[Any, ...], str]:
    """(what is called, its arguments, how to say so) for ``module`` on ``batch``."""
    if defines_predict_step(module):
        return module.predict_step, (batch, 0), "its predict_step(batch, 0)"
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return module, tuple(batch[:-1]), f"{type(module).__name__}(*batch[:-1])"
    return module, (batch,), f"{type(module).__name__}(batch)"


def _not_fed(fn: Callable, args: Tuple[Any, ...], error: Exception) -> bool:
    """Whether ``error`` (a ``TypeError`` / ``AttributeError`` from ``fn(*args)``) says the batch
    does not fit the call, rather than something failing inside a model that took it: the arguments
    do not bind to the signature, or (``fn`` the model) the error names the type of an argument that
    is not a tensor (a dict batch given to ``forward(x)``: ``... must be Tensor, not dict``)."""
    model = isinstance(fn, nn.Module)
    try:
        inspect.signature(fn.forward if model else fn).bind(*args)
    except (TypeError, ValueError):  # ValueError: no signature to read; the batch stays the suspect
        return True
    text = str(error)
    return model and any(not isinstance(a, Tensor) and type(a).__name__ in text for a in args)


def model_predictions(module: nn.Module, batch: Any, who: str) -> Any:
    """``module``'s predictions for ``batch``: its ``predict_step(batch, 0)`` where its class defines
    one (Lightning's own default calls ``module(batch)``, which a ``(x, y)`` batch does not fit); else
    ``module(*inputs)`` for an ``(inputs..., target)`` tuple or list; else ``module(batch)``.

    A batch that does not fit the call (the arguments do not bind, or the model refuses a non-tensor
    argument by its type; ``TypeError`` / ``AttributeError``) raises a ``ValueError`` saying so and
    what to pass instead, from the original error. Any other error raised inside the model (a dtype
    its ops do not serve, a bug, inputs shifted by a ``(label, inputs...)`` batch) propagates as it
    is, with a note naming the call and how the batch was split."""
    fn, args, how = _call(module, batch)
    note = f"{who}: raised inside the model, run on a batch ({type(batch).__name__}) as {how}"
    if fn is module and isinstance(batch, (list, tuple)) and len(batch) >= 2:
        # a (label, inputs...) batch reaches the model shifted: torch's error says nothing of why
        note += (f" (inputs: the batch's first {len(batch) - 1} elements; its last is read as the target). If the "
                 "batch is laid out otherwise, define predict_step(batch, batch_idx) or pass output_fn=")
    try:
        return fn(*args)
    except (TypeError, AttributeError) as e:
        if not _not_fed(fn, args, e):
            e.add_note(note)
            raise
        fix = ("Define predict_step(batch, batch_idx) returning the predictions" if isinstance(fn, nn.Module) else
               "Make predict_step take (batch, batch_idx) and return the predictions")
        raise ValueError(f"{who}: ran the model on a batch ({type(batch).__name__}) as {how}, which raised "
                         f"{type(e).__name__}: {e}. {fix}, or pass output_fn=") from e
    except Exception as e:  # noqa: BLE001  re-raised as it is, with the note
        e.add_note(note)
        raise


@contextmanager
def side_effect_free(model: nn.Module) -> Iterator[None]:
    """Run ``model`` once without leaving a trace: eval mode (BatchNorm statistics stay), no
    gradients, quantization off (no quantizer or KL collector sees the batch), the RNG state
    restored, and every submodule's train/eval flag put back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), quantization_disabled(model):
            yield
    finally:
        for m, training in modes:
            m.training = training

