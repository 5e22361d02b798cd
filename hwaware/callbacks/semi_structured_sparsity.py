"""`SemiStructuredSparsity`: 2:4 pruning of Linear/Conv weights as a callback, composable with QAT.

The callback only schedules; masks come from :mod:`hwaware.sparsity.masks`. Phases:

``dense``    plain training until ``start_epoch``.
``pruning``  (``method="magnitude"`` with ``ramp_epochs > 0``) after every optimizer step a few
             more groups of 4 are pruned to 2:4, on a cubic schedule, until all are.
``sparse``   every layer is 2:4. ``"magnitude"``: masks fixed, gradients of pruned weights zeroed
             and the weights re-masked after every optimizer step. ``"sr_ste"``: the model holds
             the masked weights, the callback the dense ones; before each optimizer step the dense
             weights are swapped in and get the gradient computed through the masked ones (the
             straight-through estimator) plus the SR-STE decay on the pruned entries; after it the
             mask is recomputed from the new dense weights and the masked weights swapped back.

Invariant between optimizer steps (so in every forward, validation, checkpoint and export): each
pruned layer's weight is exactly 2:4. Quantization composes for free: symmetric fake quantization
maps 0 to 0, so QAT never refills a pruned position, and both callbacks keep their hooks independent
of the order they are listed in.
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Any, Dict, List, Optional, Sequence, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from hwaware.callbacks._common import (
    LightningStepWatch, _RestoresForEvaluation, _check_choice, _check_int, _refuse_multiprocessing_launch, _scalar_metrics,
    _scale_lr, settings_of, warn_changed_settings,
)
from hwaware.quant.attach import lazy_reason, set_fp32_reference, skip_patterns
from hwaware.sparsity.masks import (
    cubic_fraction, find_prunable, gradual_mask_24, is_mask_24, magnitude_mask_24, mask_sparsity, sr_ste_decay_,
    weight_2d,
)

__all__ = ["SemiStructuredSparsity", "METHODS", "PHASES"]

METHODS = ("magnitude", "sr_ste")
PHASES = ("dense", "pruning", "sparse")
_STATE_VERSION = 1


# the arguments a checkpoint records so that a resume under other values says so (method is refused:
# the saved masks and dense weights are its own; skip too, once layers are pruned)
_SETTINGS = ("start_epoch", "ramp_epochs", "sr_ste_lambda", "monitor", "lr_scale")


class SemiStructuredSparsity(_RestoresForEvaluation):
    r"""Prune Linear/Conv weights to 2:4 (2 non-zeros in every 4 along the input dimension).

    Works on an unmodified LightningModule and composes with :class:`ProgressiveQuantization` in one
    run, in either order in the callback list::

        trainer = pl.Trainer(max_epochs=6, callbacks=[
            SemiStructuredSparsity(start_epoch=2, method="sr_ste"),
            ProgressiveQuantization(start_epoch=4),   # int8 QAT on the 2:4 weights
        ])
        trainer.fit(model, datamodule)
        trainer.callbacks[0].report   # sparsity per layer (verified 2:4), metric before/after

    Args:
        method: ``"magnitude"`` (keep the 2 largest ``|w|`` per group of 4: one shot at
            ``start_epoch``, or gradually over ``ramp_epochs``) or ``"sr_ste"`` (sparse-refined
            straight-through estimator, Zhou et al. 2021: masks recomputed from the dense weights
            every step, with ``sr_ste_lambda`` decay on the pruned ones).
        start_epoch: first epoch trained sparse (after dense training).
        ramp_epochs: ``"magnitude"`` only: epochs over which the fraction of pruned groups rises
            from 0 to 1 (cubic schedule, updated every optimizer step); 0 prunes in one shot.
        sr_ste_lambda: ``"sr_ste"`` only: the decay ``λ_W`` on pruned weights (paper: 2e-4).
        skip: ``fnmatch`` patterns (a str: one) of layer names to leave dense, matched as ProgressiveQuantization
            matches its ``skip`` (a parent's name skips every layer under it); a pattern that matches
            nothing in the model raises ``ValueError`` at fit start. Embedding tables are never
            pruned; layers whose input dimension is not a multiple of 4 are skipped with the reason
            in ``report["skipped"]``.
        monitor: logged metric reported before pruning and at the end (e.g. ``"val_auroc"``);
            every logged scalar is recorded either way.
        lr_scale: multiply every optimizer learning rate by this when pruning starts (sparse
            fine-tuning at a lower rate; 1.0 leaves it), the schedulers' base rates and floors with
            it (as ``ProgressiveQuantization``'s). Stored in the optimizer and scheduler state, so a
            resume keeps it.

    When pruning starts, the dense model (its ``state_dict``, on CPU) is kept as
    ``dense_reference`` and set as the model's FP32 reference: ``hwaware.export``'s regression gate
    compares the exported model against the dense model, so the accuracy pruning cost is gated
    with the quantization's (a :class:`ProgressiveQuantization` that starts QAT later keeps its own
    ``fp32_reference``, the sparse model at QAT start, and the gate measures both and compares
    against the better: a dense model kept before it had learned gates nothing; one that started
    QAT before pruning already holds a dense one, and this callback keeps none). The copy is a
    whole ``state_dict``: it is in memory and in every checkpoint from pruning start on.

    Raises:
        ValueError: an unknown ``method``, a negative ``start_epoch`` / ``ramp_epochs``, a ramp with
            ``"sr_ste"``, a bad ``sr_ste_lambda``, ``skip`` or ``lr_scale`` (at construction); ``start_epoch`` (+
            ``ramp_epochs``) beyond the Trainer's ``max_epochs`` (at ``setup``, the first moment the
            Trainer is known); a model with no prunable layer or a ``skip`` pattern that matches
            nothing in it (at fit start, after the module's ``setup`` / ``configure_model`` built its
            layers; with a lazy layer, at pruning start), a lazy layer still unmaterialized when
            pruning starts; a checkpoint written by a different method (at resume).
    """

    def __init__(
        self,
        method: str = "magnitude",
        start_epoch: int = 1,
        ramp_epochs: int = 0,
        sr_ste_lambda: float = 2e-4,
        skip: Union[str, Sequence[str]] = (),
        monitor: Optional[str] = None,
        lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        _check_choice("method", method, METHODS)
        _check_int("start_epoch", start_epoch, 0)
        _check_int("ramp_epochs", ramp_epochs, 0)
        if method == "sr_ste" and ramp_epochs:
            raise ValueError(f"ramp_epochs={ramp_epochs} is invalid with method='sr_ste' (its masks are recomputed "
                             f"every step from the start); expected ramp_epochs=0, or method='magnitude'")
        if (not isinstance(sr_ste_lambda, (int, float)) or isinstance(sr_ste_lambda, bool)
                or not math.isfinite(sr_ste_lambda) or sr_ste_lambda < 0):
            raise ValueError(f"sr_ste_lambda={sr_ste_lambda!r} is invalid; expected a finite float >= 0")
        # one pattern, as ProgressiveQuantization takes it
        skip = skip_patterns(skip)
        if (not isinstance(lr_scale, (int, float)) or isinstance(lr_scale, bool) or not math.isfinite(lr_scale)
                or lr_scale <= 0):
            raise ValueError(f"lr_scale={lr_scale!r} is invalid; expected a finite float > 0")
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"monitor={monitor!r} is invalid; expected a logged metric name or None")
        self.method = method
        self.start_epoch = start_epoch
        self.ramp_epochs = ramp_epochs
        self.sr_ste_lambda = float(sr_ste_lambda)
        self.skip = tuple(skip)
        self.monitor = monitor
        self.lr_scale = float(lr_scale)

        self.phase = "dense"
        self._layers: Dict[str, nn.Module] = {}
        self._names: List[str] = []  # pruned layers, fixed at fit start (and restored on resume)
        self._skipped: Dict[str, str] = {}
        self._masks: Dict[str, Tensor] = {}
        self._dense: Dict[str, Tensor] = {}  # sr_ste: the dense weights the optimizer updates
        self._step = 0  # optimizer steps since pruning started
        self._ramp_steps = 0
        self._handles: List[Any] = []  # optimizer step post-hooks
        self._owned: Dict[int, List[str]] = {}  # id(optimizer) -> pruned layers whose weights it updates
        self._swapped: set = set()  # sr_ste layers holding dense weights between pre-step and post-step
        self._mask_changes = 0  # sr_ste: mask entries that flipped since the last validation
        self._history: List[Dict[str, Any]] = []
        self._metrics_before: Dict[str, float] = {}
        self._metrics_after: Dict[str, float] = {}
        self._pending: Optional[Dict[str, Any]] = None
        self._batch_stepped = False
        self.dense_reference: Optional[Dict[str, Tensor]] = None  # the model when pruning started (CPU)
        self._model_ref: Optional[weakref.ref] = None
        self._training = False  # on_train_start ran for the fit under way (its setup too)
        self._layers_pending = False  # lazy layers at fit start: the layers are found at pruning start
        self._step_watch = LightningStepWatch("SemiStructuredSparsity")

    def _reset(self) -> None:
        """Back to dense, for a fit on another model."""
        self.phase = "dense"
        self._masks, self._dense, self._swapped = {}, {}, set()
        self._step = self._ramp_steps = self._mask_changes = 0
        self._history, self._metrics_before, self._metrics_after = [], {}, {}
        self.dense_reference = None

    # ================================================================================ hooks ===
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        _refuse_multiprocessing_launch(trainer, "SemiStructuredSparsity")
        if self._model_ref is not None and self._model_ref() is not pl_module:
            self._reset()  # a new model: this callback's masks and dense weights belong to the old one
        self._model_ref = weakref.ref(pl_module)
        max_epochs = trainer.max_epochs
        if (self.phase == "dense" and max_epochs is not None and max_epochs >= 0
                and self.start_epoch + max(self.ramp_epochs, 1) > max_epochs):
            need = f"start_epoch + ramp_epochs = {self.start_epoch + self.ramp_epochs} <= max_epochs" if self.ramp_epochs \
                else "start_epoch < max_epochs"
            raise ValueError(f"start_epoch={self.start_epoch}, ramp_epochs={self.ramp_epochs} are invalid for "
                             f"Trainer(max_epochs={max_epochs}); expected {need} so that the model ends 2:4")

    def _check_max_steps(self, trainer: "pl.Trainer") -> None:
        """As ``setup``'s max_epochs check, for ``Trainer(max_steps=...)`` (known once the loader's length
        is): a run that stops before pruning (or its ramp) ends trained whole and dense."""
        batches = trainer.num_training_batches
        if (self.phase != "dense" or trainer.max_steps is None or trainer.max_steps < 0
                or not isinstance(batches, int) or batches <= 0):  # (an iterable of unknown length)
            return
        per_epoch = math.ceil(batches / max(1, int(trainer.accumulate_grad_batches)))
        need = (self.start_epoch + max(self.ramp_epochs, 1)) * per_epoch
        if need > trainer.max_steps:
            raise ValueError(
                f"SemiStructuredSparsity(start_epoch={self.start_epoch}, ramp_epochs={self.ramp_epochs}) needs {need} "
                f"optimizer steps ({per_epoch} per epoch) to end 2:4, but Trainer(max_steps={trainer.max_steps}) stops "
                "before: lower start_epoch or ramp_epochs, or raise max_steps")

    def _find_layers(self, pl_module: "pl.LightningModule") -> None:
        """The layers to prune, fixed for the run: at fit start, after the module's ``setup`` and
        ``configure_model`` built what they build (Lightning runs callbacks' ``setup`` first: layers
        made there were never pruned nor listed); while a lazy layer is unmaterialized, at pruning
        start (its first forward gives it its shape)."""
        layers, skipped = find_prunable(pl_module, self.skip)
        if not layers:
            raise ValueError(f"{type(pl_module).__name__} has no layer to prune 2:4 (nn.Linear, nn.Conv1d, nn.Conv2d "
                             f"with input dimension a multiple of 4, outside skip={list(self.skip)}); skipped: "
                             f"{skipped or 'none found'}")
        self._layers = layers
        self._names = list(layers)
        self._skipped = skipped

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._layers_pending = self.phase == "dense" and any(lazy_reason(m) is not None for m in pl_module.modules())
        if not self._layers_pending:
            self._find_layers(pl_module)
        if self._pending is not None:  # resuming: the model's (masked) weights are restored already
            saved = self._pending
            self._pending = None
            if saved["names"] != self._names and self.phase != "dense":  # dense: nothing pruned yet, skip may change
                raise ValueError(
                    f"the checkpoint prunes layers {saved['names']} but this callback (skip={list(self.skip)}) would "
                    f"prune {self._names}; resume with the skip= the checkpoint was written with")
            self._restore(saved, pl_module)

    @override
    def _without_state(self) -> str:
        if self.dense_reference is not None:  # (kept from a fit in this process)
            return ("The callback keeps the dense reference (dense_reference) of its own fit, which hwaware.export's gate "
                    "also measures against; it is this checkpoint's only if the fit that saved it is the one this callback ran")
        return ("Its pruned weights are restored as saved, but not the dense model from before pruning "
                "(dense_reference), which hwaware.export's gate also measures against: save pruned checkpoints with "
                "save_weights_only=False")

    @override
    def _restore_for_evaluation(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # validate / test / predict(ckpt_path=...): the model gets the dense reference back, for export's gate
        if self._pending is not None:
            saved, self._pending = self._pending, None
            if self.phase != "dense" and self.dense_reference is not None:
                set_fp32_reference(pl_module, self.dense_reference, keep_others=True)
            # the report reads the pruned layers (fit start, which finds them, runs for fit only): it was empty
            modules = dict(pl_module.named_modules())
            self._names = [n for n in saved["names"] if n in modules]
            self._layers = {n: modules[n] for n in self._names}
            self._skipped = saved["skipped"]

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # the re-masking must happen right after optimizer.step(), before any other callback's hook
        # sees the weights (e.g. ProgressiveQuantization taking its FP32 reference at a batch end),
        # so it is an optimizer step post-hook; Lightning has no callback hook at that point. Which
        # pruned layers an optimizer updates is read at every step (layers may be unfrozen later).
        self._check_max_steps(trainer)
        self._remove_hooks()
        self._training = True
        self._step_watch.attach(trainer.optimizers)
        for opt in trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(self._after_step))
        with torch.no_grad():  # the model may have moved since the masks were made
            for name in self._names:
                w = self._layers[name].weight
                if name in self._masks:
                    self._masks[name] = self._masks[name].to(w.device)
                if name in self._dense:
                    self._dense[name] = self._dense[name].to(device=w.device, dtype=w.dtype)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._remove_hooks()
        self._training = False

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # pruning starts at the first batch of start_epoch rather than at epoch start, so that every
        # other callback's on_train_epoch_start (in whatever order) has run on the dense model
        self._batch_stepped = False
        if not self._training:
            # added to trainer.callbacks after fit started: on_fit_start (which finds the layers) and
            # on_train_start (the optimizer hook that re-masks after each step) never ran
            raise RuntimeError("SemiStructuredSparsity joined a fit already under way (its on_fit_start and on_train_start "
                               "never ran, so it found no layer to prune and could not hook the optimizer); pass it "
                               "in Trainer(callbacks=[...]) before fit")
        if self.phase == "dense" and trainer.current_epoch >= self.start_epoch:
            self._start(trainer)

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # after backward, before the update (Lightning calls this inside the optimizer closure; a
        # step pre-hook would run before the closure, i.e. before the forward)
        self._step_watch.lightning_step()
        if self.phase == "dense":
            return
        optimizer = getattr(optimizer, "_optimizer", optimizer)
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        owned = self._owned[id(optimizer)] = [n for n in self._names if id(self._layers[n].weight) in ids]
        with torch.no_grad():
            for name in owned:
                w = self._layers[name].weight
                mask = self._masks[name]
                if self.method == "sr_ste":
                    dense = self._dense[name]
                    if w.grad is not None:  # None: another callback dropped it (calibration): no update
                        sr_ste_decay_(w.grad, dense, mask, self.sr_ste_lambda)
                    w.copy_(dense)  # the optimizer updates the dense weights
                    self._swapped.add(name)
                elif w.grad is not None:
                    w.grad.mul_(mask)  # pruned weights get no gradient (momentum decays, AdamW leaves 0 at 0)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.phase == "dense":
            return
        names = self._owned.get(id(optimizer), [])
        self._swapped.difference_update(names)
        if not self._batch_stepped:  # the ramp advances once per training batch, however many optimizers step
            self._batch_stepped = True
            self._step += 1
        with torch.no_grad():
            if self.method == "sr_ste":
                for name in names:
                    w, dense = self._layers[name].weight, self._dense[name]
                    dense.copy_(w)
                    new = magnitude_mask_24(weight_2d(self._layers[name])).view_as(w)
                    self._mask_changes += int((new != self._masks[name]).sum())
                    self._masks[name] = new
                    w.mul_(new)
                return
            if self.phase == "pruning":
                names = self._names  # every layer follows the schedule, frozen ones included
                fraction = cubic_fraction(self._step, self._ramp_steps)
                for name in names:
                    w = self._layers[name].weight
                    self._masks[name] = gradual_mask_24(weight_2d(self._layers[name]),
                                                        self._masks[name].reshape(w.shape[0], -1), fraction).view_as(w)
                if self._step >= self._ramp_steps:
                    self.phase = "sparse"
                    # (no trainer here: the entry, with the global step as the other entries have it, is
                    # written at this batch's end)
                    self._history.append({"phase": "sparse", "ramp_steps": self._step})
            for name in names:
                self._layers[name].weight.mul_(self._masks[name])

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._owned = [], {}
        self._step_watch.detach()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # dense weights swapped in for a step that never happened (e.g. AMP's GradScaler skipped it
        # on inf gradients, so no post-step hook ran): swap the masked weights back
        self._unswap()
        last = self._history[-1] if self._history else None
        if last is not None and last.get("phase") == "sparse" and "step" not in last:  # the ramp ended in this batch
            # where the sparse phase starts, as the other entries say it: the next batch's epoch and step
            ends_epoch = isinstance(trainer.num_training_batches, int) and batch_idx + 1 >= trainer.num_training_batches
            last.update(epoch=trainer.current_epoch + int(ends_epoch), step=trainer.global_step)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._unswap()  # the model the user keeps holds masked weights
        self._remove_hooks()
        self._training = False

    def _unswap(self) -> None:
        if self._swapped:
            with torch.no_grad():
                for name in self._swapped:
                    self._layers[name].weight.copy_(self._dense[name] * self._masks[name])
            self._swapped.clear()

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking:
            return
        metrics = _scalar_metrics(trainer)
        if self.phase == "dense":
            self._metrics_before = metrics
        else:
            self._metrics_after = metrics
            if self.method == "sr_ste":
                self._history.append({"event": "validation", "epoch": trainer.current_epoch,
                                      "mask_changes": self._mask_changes})
                self._mask_changes = 0

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.phase == "dense":
            rank_zero_warn(f"SemiStructuredSparsity: fit ended dense; pruning never started "
                           f"(start_epoch={self.start_epoch}, max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps})")
            return
        if self.phase == "pruning":
            rank_zero_warn(f"SemiStructuredSparsity: fit ended mid-ramp ({self._step}/{self._ramp_steps} steps); "
                           f"some groups are still dense")
        bad = [] if self.phase != "sparse" else [n for n in self._names if not is_mask_24(weight_2d(self._layers[n]) != 0)]
        if bad:
            raise RuntimeError(f"SemiStructuredSparsity: layers {bad} are not 2:4 at the end of fit; was a weight "
                               f"modified outside the optimizer step?")
        if self.monitor is not None and self.monitor in self._metrics_after:
            rank_zero_info(f"SemiStructuredSparsity: {self.monitor} {self._metrics_before.get(self.monitor)} (dense) -> "
                           f"{self._metrics_after[self.monitor]} (2:4)")
        elif (self.monitor is not None and self.monitor not in self._metrics_before
              and (self._metrics_before or self._metrics_after)):
            # validation ran but never logged it (a typo): the report's before / after would read None silently
            logged = sorted(set(self._metrics_before) | set(self._metrics_after))
            rank_zero_warn(f"SemiStructuredSparsity(monitor={self.monitor!r}): metric never logged, so the report has no "
                           f"before / after for it; logged metrics are {logged}")

    # ===================================================================== state / resume ===
    @override
    def state_dict(self) -> Dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "method": self.method,
            "phase": self.phase,
            "names": list(self._names),
            "skipped": dict(self._skipped),
            "step": self._step,
            "ramp_steps": self._ramp_steps,
            "masks": {n: m.detach().cpu().clone() for n, m in self._masks.items()},
            "dense": {n: d.detach().cpu().clone() for n, d in self._dense.items()},
            "mask_changes": self._mask_changes,
            "history": copy.deepcopy(self._history),
            "metrics_before": dict(self._metrics_before),
            "metrics_after": dict(self._metrics_after),
            "dense_reference": self.dense_reference,
            "settings": settings_of(self, _SETTINGS),
        }

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._state_loaded = True
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(f"SemiStructuredSparsity checkpoint state version {state_dict.get('version')!r}; "
                             f"expected {_STATE_VERSION}")
        if state_dict["method"] != self.method:
            raise ValueError(f"checkpoint was written by SemiStructuredSparsity(method={state_dict['method']!r}); "
                             f"this callback has method={self.method!r}")
        _check_choice("checkpoint phase", state_dict["phase"], PHASES)
        warn_changed_settings("SemiStructuredSparsity", state_dict.get("settings"), settings_of(self, _SETTINGS),
                              state_dict["phase"])
        self.phase = state_dict["phase"]
        self._step = state_dict["step"]
        self._ramp_steps = state_dict["ramp_steps"]
        self._mask_changes = state_dict["mask_changes"]
        self._history = copy.deepcopy(state_dict["history"])
        self._metrics_before = dict(state_dict["metrics_before"])
        self._metrics_after = dict(state_dict["metrics_after"])
        self._pending = {"names": list(state_dict["names"]), "masks": state_dict["masks"], "dense": state_dict["dense"],
                         "skipped": dict(state_dict.get("skipped", {}))}
        self.dense_reference = state_dict.get("dense_reference")

    def _restore(self, saved: Dict[str, Any], pl_module: nn.Module) -> None:
        if self.phase == "dense":
            return
        if self.dense_reference is not None:
            set_fp32_reference(pl_module, self.dense_reference, keep_others=True)
        with torch.no_grad():
            for name in self._names:
                w = self._layers[name].weight
                if name not in saved["masks"]:
                    raise ValueError(f"checkpoint has no 2:4 mask for layer {name!r}")
                mask = saved["masks"][name].to(device=w.device, dtype=torch.bool)
                if mask.shape != w.shape:
                    raise ValueError(f"checkpoint mask for {name!r} has shape {tuple(mask.shape)}; weight is {tuple(w.shape)}")
                self._masks[name] = mask
                if self.method == "sr_ste":
                    self._dense[name] = saved["dense"][name].to(device=w.device, dtype=w.dtype).clone()
                w.mul_(mask)

    # ================================================================== phase transitions ===
    def _keep_dense_reference(self, trainer: "pl.Trainer") -> None:
        """The dense model as the export gate's reference, unless a quantization callback already keeps
        one from before pruning (QAT started first: its reference is dense)."""
        pl_module = trainer.lightning_module
        if any(getattr(cb, "fp32_reference", None) is not None for cb in trainer.callbacks if cb is not self):
            return
        self.dense_reference = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        set_fp32_reference(pl_module, self.dense_reference, keep_others=True)

    def _start(self, trainer: "pl.Trainer") -> None:
        if self._layers_pending:  # (lazy layers at fit start: their first forward has run by now, or this refuses them)
            self._layers_pending = False
            self._find_layers(trainer.lightning_module)
        self._metrics_before = self._metrics_before or _scalar_metrics(trainer)
        self._keep_dense_reference(trainer)
        self._step = 0
        if self.lr_scale != 1.0:
            _scale_lr(trainer, self.lr_scale)
        with torch.no_grad():
            if self.method == "magnitude" and self.ramp_epochs:
                if not math.isfinite(trainer.num_training_batches):
                    raise ValueError(f"ramp_epochs={self.ramp_epochs} needs a known number of batches per epoch; the "
                                     f"train dataloader has no length (an IterableDataset?): set "
                                     f"Trainer(limit_train_batches=N) or use ramp_epochs=0")
                per_epoch = math.ceil(trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
                self._ramp_steps = max(1, self.ramp_epochs * per_epoch)
                self._masks = {n: torch.ones(self._layers[n].weight.shape, dtype=torch.bool, device=self._layers[n].weight.device)
                               for n in self._names}  # (not ones_like: a channels_last weight's mask would not view as [N, K])
                self._mark("pruning", trainer)
                return
            masks = {n: magnitude_mask_24(weight_2d(self._layers[n])).cpu() for n in self._names}
            # ranks hold identical weights under DDP, but the masks are the contract: take rank 0's
            masks = trainer.strategy.broadcast(masks, src=0)
            for n in self._names:
                w = self._layers[n].weight
                self._masks[n] = masks[n].to(w.device).view_as(w)
                if self.method == "sr_ste":
                    self._dense[n] = w.detach().clone()
                w.mul_(self._masks[n])
        self._mark("sparse", trainer)

    def _mark(self, phase: str, trainer: "pl.Trainer") -> None:
        self.phase = phase
        self._history.append({"phase": phase, "epoch": trainer.current_epoch, "step": trainer.global_step})

    # ============================================================================== report ===
    @property
    def masks(self) -> Dict[str, Tensor]:
        """``{layer: bool mask shaped like its weight}`` (``True`` = kept); empty while dense."""
        return dict(self._masks)

    @property
    def report(self) -> Dict[str, Any]:
        """Per-layer sparsity (zeros in the weight; ``verified_24`` checks the weight itself), skipped
        layers with reasons, logged metrics before pruning and at the last validation."""
        layers = {}
        for name in self._names:
            m = self._layers.get(name)
            if m is None:
                continue
            w2d = weight_2d(m).detach()
            layers[name] = {"shape": list(w2d.shape), "sparsity": mask_sparsity(w2d), "verified_24": is_mask_24(w2d != 0)}
        out: Dict[str, Any] = {
            "method": self.method, "phase": self.phase, "start_epoch": self.start_epoch, "ramp_epochs": self.ramp_epochs,
            "layers": layers, "skipped": dict(self._skipped), "history": copy.deepcopy(self._history),
            "metrics_before": dict(self._metrics_before), "metrics_after": dict(self._metrics_after),
        }
        if self.monitor is not None:
            out["monitor"] = self.monitor
            out["before"] = self._metrics_before.get(self.monitor)
            out["after"] = self._metrics_after.get(self.monitor)
        return out
