"""Argument checks, metric reading and the evaluation-restore hooks shared by the callbacks."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor


class _RestoresForEvaluation(Callback):
    """``trainer.validate / test / predict(ckpt_path=...)`` restore a callback's state with no
    ``on_fit_start`` to act on it: at the start of each, outside fit, :meth:`_restore_for_evaluation`
    puts on the model what the callback's state says it holds."""

    def _restore_for_evaluation(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        raise NotImplementedError

    def _without_state(self) -> str:
        """What evaluating a checkpoint that holds none of this callback's state means (a warning's end)."""
        raise NotImplementedError

    _state_loaded = False  # whether this trainer run's ckpt_path gave the callback its state (load_state_dict)

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._state_loaded = False  # (setup runs before Lightning restores ckpt_path)

    def _evaluation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            return
        if trainer.ckpt_path is not None and not self._state_loaded:
            # a checkpoint with no state of this callback (ModelCheckpoint(save_weights_only=True)):
            # Lightning restores the weights and says nothing, and a QAT checkpoint then exported as a
            # post-training one, its specs, skips and fallbacks lost (a user trial). (fit refuses a
            # weights-only checkpoint itself; one from a run without this callback starts it anew)
            name = type(self).__name__
            rank_zero_warn(
                f"{name}: the checkpoint {str(trainer.ckpt_path)!r} holds no {name} state (saved with "
                f"ModelCheckpoint(save_weights_only=True), or by a run without this callback): Lightning restored "
                f"the weights only. {self._without_state()}")
        self._restore_for_evaluation(trainer, pl_module)

    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._evaluation_start(trainer, pl_module)

    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._evaluation_start(trainer, pl_module)

    def on_predict_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._evaluation_start(trainer, pl_module)


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


# where a scheduler keeps absolute learning rates it computes ``lr`` from (LambdaLR, CyclicLR, ...: base
# and max; CosineAnnealing*: the floor eta_min; ReduceLROnPlateau: its floors, and the default one it
# gives a param group added later): scaled with the rates
SCHEDULER_LR_ATTRS = ("base_lrs", "max_lrs", "min_lrs", "default_min_lr", "eta_min")


def schedulers_in(scheduler: Any) -> List[Any]:
    """``scheduler`` and the schedulers it drives (``SequentialLR`` / ``ChainedScheduler`` keep
    theirs in ``_schedulers``), depth first."""
    out, todo = [], [scheduler]
    while todo:
        s = todo.pop(0)
        if any(s is seen for seen in out):
            continue
        out.append(s)
        todo[:0] = [c for c in (getattr(s, "_schedulers", None) or []) if c is not None]
    return out


def scheduler_lrs(scheduler: Any, nested: bool = True) -> List[Tuple[Any, str, Any]]:
    """``(scheduler, attribute, value)`` for the absolute rates (:data:`SCHEDULER_LR_ATTRS`) that
    ``scheduler`` holds, and with ``nested`` the schedulers inside it."""
    out = []
    for s in schedulers_in(scheduler) if nested else [scheduler]:
        for k in SCHEDULER_LR_ATTRS:
            v = getattr(s, k, None)
            if (isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v)) or (
                    isinstance(v, (int, float)) and not isinstance(v, bool)):
                out.append((s, k, list(v) if isinstance(v, list) else v))
    return out


def _scale_lr(trainer: "pl.Trainer", factor: float) -> None:
    """Multiply every learning rate by ``factor``, where schedulers read it from too: the param
    groups (``lr``, and ``initial_lr`` / ``max_lr`` / ``min_lr`` where a scheduler put them) and
    each scheduler's absolute rates (:data:`SCHEDULER_LR_ATTRS`; LambdaLR, CyclicLR, ... recompute
    ``lr`` from them every step, cosine annealing anneals towards ``eta_min``), those of the
    schedulers inside ``SequentialLR`` / ``ChainedScheduler`` too, so the rest of the schedule runs
    at ``factor`` times the rates it would have had."""
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if isinstance(group.get(key), (int, float)):
                    group[key] *= factor
    seen: List[Any] = []  # each scheduler once, however many configs reach it
    for config in trainer.lr_scheduler_configs:
        seen += [s for s in schedulers_in(config.scheduler) if not any(s is t for t in seen)]
    for s in seen:
        for _, k, v in scheduler_lrs(s, nested=False):
            setattr(s, k, [x * factor for x in v] if isinstance(v, list) else v * factor)
        last = getattr(s, "_last_lr", None)  # what get_last_lr() reports: scaled as the rates are
        if isinstance(last, list) and all(isinstance(x, (int, float)) for x in last):
            s._last_lr = [x * factor for x in last]


class LightningStepWatch:
    """Refuses an optimizer step Lightning did not make: a manual-optimization module stepping the
    torch optimizer itself (``self.optimizers(use_pl_optimizer=False)``) passes by the hooks the
    callbacks act in (gradients dropped during calibration, masks applied, steps counted in
    ``global_step``): calibration trained the weights, ``qat_epochs`` never counted an epoch, and
    pruning blamed the optimizer at the end. A step post-hook on each torch optimizer checks that
    ``on_before_optimizer_step`` (which Lightning runs inside every step it makes, automatic or
    manual) came first; a step may be made anywhere (an epoch-end hook, across epochs)."""

    def __init__(self, who: str) -> None:
        self.who = who
        self._handles: List[Any] = []
        self._lightning = False

    def attach(self, optimizers: Sequence[Any]) -> None:
        self.detach()
        self._handles = [opt.register_step_post_hook(self._after_step) for opt in optimizers]

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def lightning_step(self) -> None:
        """Call from ``on_before_optimizer_step``."""
        self._lightning = True

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._lightning:
            raise RuntimeError(f"{self.who}: {type(optimizer).__name__}.step() ran outside Lightning's optimizer step (no "
                               "on_before_optimizer_step before it): step the optimizers self.optimizers() returns "
                               "(LightningOptimizer), not the torch optimizers (use_pl_optimizer=False); hwaware's "
                               "callbacks act in the hooks around that step")
        self._lightning = False


def _refuse_multiprocessing_launch(trainer: "pl.Trainer", who: str) -> None:
    """A callback's state (phases, quantizers, the FP32 reference) lives in the process that trains.
    Under a multiprocessing launcher (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``) that is a child:
    the model the user holds afterwards has the trained weights but none of that state, so an
    export would silently quantize it post-training. ``strategy="ddp"`` runs the script itself as
    rank 0 and keeps it."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if type(launcher).__name__ == "_MultiProcessingLauncher":
        method = getattr(trainer.strategy, "_start_method", "spawn")
        raise ValueError(f"{who} does not support Trainer(strategy=...) launched by multiprocessing (start method "
                         f"{method!r}): its state would stay in the child processes and the model you export afterwards "
                         "would have none of it. Use strategy='ddp', which runs this script as rank 0")


def settings_of(callback: Any, names: Sequence[str]) -> Dict[str, Any]:
    """The callback's arguments ``names`` as a checkpoint records them (to tell a resume under others)."""
    return {n: getattr(callback, n) for n in names}


def warn_changed_settings(owner: str, saved: Optional[Mapping[str, Any]], here: Mapping[str, Any], phase: str) -> None:
    """Warn when a run resumes under other settings than its checkpoint was written with. They are
    legitimate to change (a higher ``kl_threshold`` after a look at the report), but the resumed run
    is then not the one the checkpoint's would have been, and before this nothing said so.
    ``saved`` None: a checkpoint from before the settings were recorded."""
    if not isinstance(saved, Mapping):
        return
    diff = [k for k in here if k in saved and saved[k] != here[k]]
    if diff:
        rank_zero_warn(f"{owner}: resuming a checkpoint written in phase {phase!r} with other settings than it was "
                       "written with: " + ", ".join(f"{k}={here[k]!r} (checkpoint: {saved[k]!r})" for k in diff)
                       + "; the values given here apply from this point on")
