"""How hwaware runs a user's model on one of their batches (export's gate, the callback's output KL)."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Tuple

import torch
from torch import Tensor, nn

from hwaware.quant.attach import quantization_disabled


def defines_predict_step(module: nn.Module) -> bool:
    """Whether ``module``'s class defines its own ``predict_step`` (not Lightning's default, which
    calls ``module(batch)``)."""
    step = getattr(type(module), "predict_step", None)
    return step is not None and not getattr(step, "__qualname__", "").startswith("LightningModule.")


def _binds(fn: Callable, *args: Any) -> bool:
    """``fn(*args)`` binds to ``fn``'s signature (True where it has none to read)."""
    try:
        inspect.signature(fn).bind(*args)
    except TypeError:
        return False
    except ValueError:
        return True
    return True


def _call(module: nn.Module, batch: Any) -> Tuple[Callable, Tuple[Any, ...], str]:
    """(what is called, its arguments, how to say so) for ``module`` on ``batch``."""
    if defines_predict_step(module):
        # predict_step(self, batch): Lightning passes batch_idx only to a step that takes it
        if not _binds(module.predict_step, batch, 0) and _binds(module.predict_step, batch):
            return module.predict_step, (batch,), "its predict_step(batch)"
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


def returned_what(x: Any) -> str:
    """A returned value as an error message names it: a dict by its keys, a tuple by its length."""
    if isinstance(x, dict):
        keys = list(x)
        return f"a dict (keys {keys[:8]}{' ...' if len(keys) > 8 else ''})"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} (len {len(x)})"
    return f"a {type(x).__name__}"


def model_predictions(module: nn.Module, batch: Any, who: str) -> Any:
    """``module``'s predictions for ``batch``: its ``predict_step(batch, 0)`` where its class defines
    one (``predict_step(batch)`` where it takes no ``batch_idx``, as Lightning calls it; Lightning's
    own default calls ``module(batch)``, which a ``(x, y)`` batch does not fit); else
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
    except StopIteration as e:
        if next(module.parameters(), None) is None:  # (a bare StopIteration said nothing of why)
            raise TypeError(f"{who}: the model's forward raised StopIteration, and the model holds no "
                            "nn.Parameter: an exported model's layers keep their packed weights as buffers, so "
                            "next(self.parameters()) (for a device or dtype) finds none. Read the device from an "
                            "input (x.device) or from next(self.buffers())") from e
        e.add_note(note)
        raise
    except Exception as e:  # noqa: BLE001  re-raised as it is, with the note
        e.add_note(note)
        raise


@contextmanager
def side_effect_free(model: nn.Module) -> Iterator[None]:
    """Run ``model`` once without leaving a trace: eval mode (BatchNorm statistics stay), no
    gradients, quantization off (no quantizer or KL collector sees the batch), the RNG state
    restored, every submodule's train/eval flag put back as it was, and the tables of embeddings
    with ``max_norm`` (which renormalize rows in place) restored."""
    modes = [(m, m.training) for m in model.modules()]
    # an embedding with max_norm renormalizes the rows it looks up in place, in eval and under no_grad
    # too: a trial's export rewrote the rows of the first batch's ids in the user's table. Its table is
    # kept just before its first lookup (a pre-hook), so a run that looks nothing up copies nothing
    renormed: dict = {}

    def keep(m: nn.Module, args: Any) -> None:
        if id(m.weight) not in renormed:  # by the table: a tied one is kept once, before either module renorms it
            renormed[id(m.weight)] = (m.weight, m.weight.detach().clone())

    hooks = [m.register_forward_pre_hook(keep) for m in model.modules()
             if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        model.eval()
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), quantization_disabled(model):
            yield
    finally:
        for m, training in modes:
            m.training = training
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for w, before in renormed.values():
                w.copy_(before)



# -- a LightningModule's batch hooks, applied outside a Trainer ---------------------------------

#: The hooks Lightning's loops run on every batch before the step, in their order.
BATCH_HOOKS = ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")


def _lightning_module_base(module: nn.Module) -> Optional[type]:
    """Lightning's ``LightningModule`` class among ``module``'s bases (``pytorch_lightning`` or
    ``lightning.pytorch``), or None: found by name, so that hwaware imports no Lightning here."""
    for cls in type(module).__mro__:
        if cls.__name__ == "LightningModule" and cls.__module__.partition(".")[0] in ("pytorch_lightning", "lightning"):
            return cls
    return None


def overridden_batch_hooks(module: nn.Module) -> Tuple[str, ...]:
    """The :data:`BATCH_HOOKS` that ``module`` (a LightningModule) overrides, its class or the
    instance; ``()`` for a plain ``nn.Module`` or a LightningModule that keeps Lightning's own."""
    base = _lightning_module_base(module)
    if base is None:
        return ()
    def own(name: str):  # the function behind the bound method (or an instance attribute as is)
        attr = getattr(module, name, None)
        return getattr(attr, "__func__", attr)

    return tuple(name for name in BATCH_HOOKS if own(name) is not getattr(base, name, None))


def apply_batch_hooks(module: nn.Module, batch: Any, device: torch.device, who: str, index: int = 0) -> Any:
    """``batch`` as Lightning's validation loop hands it to ``module``'s step: its
    ``on_before_batch_transfer(batch, 0)``, ``transfer_batch_to_device(batch, device, 0)`` and
    ``on_after_batch_transfer(batch, 0)``, in that order, each called on ``module`` itself (outside
    any Trainer's hook routing: a datamodule's hooks are not run). As in that loop, ``module`` is in
    eval mode and no gradient is recorded; its train/eval flags, its quantization and the global
    RNG are as they were afterwards. torch's CPU RNG is seeded with ``index`` for the hooks, so that
    a hook drawing random numbers from it gives the same batch every time the same batch comes.

    A hook that raises (one reading ``self.trainer``, which a module outside a Trainer does not
    have) or returns None raises a ``RuntimeError`` naming the hook, from the original error."""
    calls = {"on_before_batch_transfer": lambda b: (b, 0), "transfer_batch_to_device": lambda b: (b, device, 0),
             "on_after_batch_transfer": lambda b: (b, 0)}
    fix = (f"{who} runs {type(module).__name__}'s batch hooks ({', '.join(BATCH_HOOKS)}) on every validation batch, "
           f"as Lightning's validation loop does (dataloader_idx=0, device {device}), but outside any Trainer. Make "
           "the hook work without one, or pass a val_dataloader whose batches are already as the model's step takes "
           "them, with batch_hooks=False")
    with side_effect_free(module):
        torch.default_generator.manual_seed(index)
        for name in BATCH_HOOKS:
            args = calls[name](batch)
            shown = ", ".join(["batch", *(repr(a) for a in args[1:])])
            try:
                batch = getattr(module, name)(*args)
            except Exception as e:  # noqa: BLE001  re-raised, named
                trainer = " (the hook reads self.trainer)" if "not attached to a `Trainer`" in str(e) else ""
                raise RuntimeError(f"{who}: {type(module).__name__}.{name}({shown}) raised {type(e).__name__}: "
                                   f"{str(e).rstrip('.')}{trainer}. {fix}") from e
            if batch is None:
                raise RuntimeError(f"{who}: {type(module).__name__}.{name}({shown}) returned None, not the batch (a "
                                   f"batch hook returns the batch it was given, transformed). {fix}")
    return batch


class HookedBatches:
    """``loader``'s batches through :func:`apply_batch_hooks` (``module``'s hooks), read afresh on
    every iteration: an iterable to run the model on wherever ``loader`` was."""

    def __init__(self, loader: Iterable, module: nn.Module, device: torch.device, who: str) -> None:
        self.loader, self.module, self.device, self.who = loader, module, device, who

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.loader):
            yield apply_batch_hooks(self.module, batch, self.device, self.who, index)
