"""`ProgressiveQuantization`: FP32 -> calibrate -> channel-wise QAT -> KL validation, as a callback.

The callback only schedules: numerics live in :mod:`hwaware.quant` (specs, observers, fake quant,
attachment, KL). Phases:

``fp32``      plain training until ``start_epoch`` (or until ``monitor`` plateaus, ``start="plateau"``).
``calibrate`` quantizers attached, observers record ranges over ``calibration_batches`` training
              batches; the math is FP32 and the weights do not move (gradients are dropped).
``qat``       fake quantization on; activation observers freeze after ``freeze_observers_after``
              batches; weight scales track the live weights; ``kl/<layer>`` logged every validation.
``validate``  at the end of fit: per-layer KL (FP32 vs quantized output of each layer on the same
              input) and the KL of the model's output distribution over validation batches; layers
              over ``kl_threshold`` fall back to higher precision (int8, then FP32) and are re-validated.
``done``      weight scales frozen to the final weights: what export packs.
"""
from __future__ import annotations

import copy
import math
import warnings
import weakref
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from hwaware._predict import defines_predict_step, model_predictions, returned_what, side_effect_free
from hwaware.callbacks._common import (
    LightningStepWatch, _RestoresForEvaluation, _check_choice, _check_int, _refuse_multiprocessing_launch, _scalar_metrics,
    _scale_lr, scheduler_lrs, settings_of, warn_changed_settings,
)
from hwaware.ops.packing import int8_weight_spec
from hwaware.quant.attach import (
    QuantState, attach_quantization, check_activation_spec, detach_quantization, find_quantizable, layer_specs_to_state,
    normalize_layer_specs, quantization_disabled, set_fp32_reference, set_other_fp32_references, skip_patterns, table_spec,
)
from hwaware.quant.attach import quant_states as _attached_states
from hwaware.quant.kl import OUTPUT_KINDS, KLViolationError, LayerErrorCollector, collect_layer_errors, output_kl
from hwaware.quant.observers import _dist_ready
from hwaware.quant.spec import QuantSpec

__all__ = ["ProgressiveQuantization", "PHASES"]

PHASES = ("fp32", "calibrate", "qat", "validate", "done")
_STARTS = ("epoch", "plateau")
_MODES = ("min", "max")
_VIOLATIONS = ("fallback", "warn", "raise")
_DEFAULT = object()
# the arguments a checkpoint records so that a resume under other values says so (specs, skip and
# layer_specs are refused instead once layers are quantized: the layers' plan comes from the checkpoint)
_SETTINGS = ("start_epoch", "start", "monitor", "mode", "patience", "min_delta", "calibration_batches",
             "freeze_observers_after", "freeze_bn", "lr_scale", "qat_epochs", "kl_threshold", "on_kl_violation",
             "validation_batches", "output_kind")

DEFAULT_WEIGHT_SPEC = QuantSpec(bits=8, granularity="per_channel", symmetric=True)
DEFAULT_ACTIVATION_SPEC = QuantSpec(bits=8, granularity="per_row", symmetric=True, dynamic=True)
DEFAULT_EMBEDDING_SPEC = QuantSpec(bits=8, granularity="per_row", symmetric=False, dynamic=True)


def _short(spec: Optional[Dict[str, Any]]) -> str:
    """A saved spec dict as QuantSpec's short label (None: 'None')."""
    return "None" if spec is None else QuantSpec.from_dict(spec).short()


def _describe_specs(state: List[List[Any]]) -> str:
    """``{pattern: {key: short label}}`` of saved layer_specs, for messages."""
    return "{" + ", ".join(
        f"{p!r}: {{" + ", ".join(f"{k!r}: {_short(v)}" for k, v in e.items()) + "}"
        for p, e in state) + "}"


def _stopped_by(trainer: "pl.Trainer", monitor: Optional[str]) -> str:
    """Why a fit stopped before ``max_epochs``, for the "QAT never ran" warning: an EarlyStopping
    callback (on ``monitor``: at the very plateau ProgressiveQuantization waits for), or another
    ``trainer.should_stop``; empty when it ran its epochs."""
    stoppers = [cb for cb in trainer.callbacks if isinstance(cb, EarlyStopping) and trainer.should_stop
                and cb.wait_count >= cb.patience]
    if stoppers:
        cb = stoppers[0]
        same = monitor is not None and cb.monitor == monitor
        return (f": EarlyStopping(monitor={cb.monitor!r}, patience={cb.patience}) stopped the fit at epoch "
                f"{cb.stopped_epoch}" + (", at the plateau ProgressiveQuantization waits for to start QAT: give "
                                         "EarlyStopping a larger patience than ProgressiveQuantization's, or let it "
                                         "monitor a metric of the QAT phase" if same else ""))
    if trainer.should_stop and trainer.current_epoch < (trainer.max_epochs or 0):  # (epochs done, at fit end)
        return f": the fit was stopped early (trainer.should_stop) after {trainer.current_epoch} epochs"
    return ""


def _epoch_training_values(trainer: "pl.Trainer", monitor: Optional[str] = None) -> Dict[str, float]:
    """The epoch-level training metrics logged so far this epoch, under their ``callback_metrics``
    names: what Lightning aggregates into ``callback_metrics`` at the epoch's end, and does not
    checkpoint (a run resumed from a checkpoint written at validation end ends the epoch without
    them). A torchmetrics metric's value is computed only for ``monitor`` (computing every one
    mid-epoch would run their compute(), and their syncs across ranks, at every validation)."""
    out: Dict[str, float] = {}
    try:
        results = trainer.fit_loop.epoch_loop._results  # (Lightning's training ResultCollection)
        items = list(results.valid_items())
    except Exception:  # (a private API: without it, a resume reads nothing, as before)
        return {}
    for _, metric in items:
        try:
            if metric.meta.on_epoch:
                names = results._forked_name(metric, False)  # (forked name, name): callback_metrics has both
                names = names if isinstance(names, tuple) else (names,)
                if not metric.is_tensor and monitor not in names:
                    continue
                value = results._get_cache(metric, False)
                if isinstance(value, Tensor) and value.numel() == 1:
                    value = float(value)
                if isinstance(value, (int, float)):
                    out.update({n: float(value) for n in names})
        except Exception:  # this metric's value is not read (another's still is)
            continue
    return out


class ProgressiveQuantization(_RestoresForEvaluation):
    r"""Train FP32, then fine-tune with channel-wise fake quantization, then validate it with KL.

    Works on an unmodified LightningModule: supported layers (``nn.Linear``, ``nn.Conv1d/2d``,
    ``nn.Embedding``, ``nn.EmbeddingBag``) keep their types and ``state_dict`` keys. Fake
    quantization runs in a layer's ``forward``: a layer the model never calls from calibration to
    the end of the first QAT epoch (its forward reads the weight itself, ``F.linear(x, l.weight)``)
    is left FP32, with a warning and the reason in ``report["skipped"]``.

    Example::

        trainer = pl.Trainer(max_epochs=6, callbacks=[ProgressiveQuantization(start_epoch=3)])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].report)

    Args:
        start_epoch: first epoch of quantization (``start="epoch"``); a minimum with ``"plateau"``.
        start: ``"epoch"`` or ``"plateau"`` (start once ``monitor`` has not improved by
            ``min_delta`` for ``patience`` validations: FP32 trained to convergence).
        monitor: logged metric for ``"plateau"`` (e.g. ``"val_auroc"``); also reported before/after.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        patience: validations without improvement before QAT starts (``"plateau"``).
        min_delta: smallest change of ``monitor`` that counts as an improvement.
        calibration_batches: training batches with observers on, FP32 math and no weight updates
            before QAT.
        freeze_observers_after: QAT batches after which activation observers freeze (None: never).
        freeze_bn: put BatchNorm layers in eval mode (running statistics frozen) during QAT.
        lr_scale: multiply every optimizer learning rate by this when QAT starts (fine-tuning at a
            lower rate; 1.0 leaves it), the schedulers' base rates and floors with it (those inside
            ``SequentialLR`` / ``ChainedScheduler`` too). Stored in the optimizer and scheduler state, so a
            resume keeps it.
        qat_epochs: end the fit after this many epochs of QAT training (the epoch QAT starts in
            counts when QAT trains in it, not when calibration used it up), then validate as at any
            fit end (a resume after the last one trains no more); ``None``: train to ``max_epochs``. With ``start="plateau"``
            the FP32 phase's length is not known ahead, and training past a plateau at the QAT rate
            moves the metric too: QAT is fine-tuning, the recipe's is one epoch.
        weight_spec: quantization of Linear/Conv weights (default int8 symmetric per output channel).
        activation_spec: quantization of Linear/Conv inputs (default dynamic per-token int8;
            ``None`` for weight-only). ``granularity="per_tensor"`` (static: ranges calibrated by
            the observer; or ``dynamic=True``) or ``"per_row"`` with ``dynamic=True``; others (the
            ``per_channel`` of a bare ``QuantSpec(bits=8)``, ``per_group``, static ``per_row``)
            would keep one scale per batch position and are refused (``layer_specs`` alike).
        embedding_spec: row-wise quantization of embedding tables (default int8 affine per row,
            the FBGEMM layout; ``None`` leaves tables in FP32). Must be ``per_row``.
        skip: ``fnmatch`` patterns of layer names to leave in FP32 (``"top_mlp.4"``, ``"*.head"``);
            a pattern matching a parent's name (``"top_mlp"``) skips every layer under it. A pattern
            that matches nothing in the model raises ``ValueError`` at fit start (a typo there would
            quantize the layer it meant to keep).
        layer_specs: per-layer overrides of the specs above, ``{fnmatch pattern: override}`` with the
            patterns matched like ``skip``. An override is a :class:`QuantSpec` (the weight spec of
            a Linear/Conv, the table spec of an embedding) or a dict with keys among ``"weight"``
            and ``"activation"`` (a QuantSpec, or ``None`` for weight-only); keys left out keep the
            global spec. The first matching pattern (in the mapping's order) wins, and ``skip`` wins
            over ``layer_specs``. Example: ``{"top_mlp.0": QuantSpec(bits=4, granularity="per_group",
            group_size=128), "top_mlp.*": {"activation": None}}``. Checked when the model is first
            seen (fit start, after the module's ``setup`` / ``configure_model``): a pattern that
            matches no quantizable layer (or only layers an earlier pattern claims) or an override
            invalid for a layer's kind raises ``ValueError``; an
            override the layer cannot take (``per_group`` on a conv, a ``group_size`` that does not
            divide ``in_features``) skips the layer with the reason, as the global ``weight_spec``
            does. Saved in checkpoints: a run resumed after calibration started must pass the same
            ``layer_specs`` (the layers' specs are restored from the checkpoint).
        kl_threshold: per-layer KL (nats, mean per sample, see :func:`hwaware.quant.kl.channel_kl`) above
            which a layer violates; by channel_kl's ``0.5 * 10^(-SQNR/10)``, 0.01 is about 17 dB SQNR.
        on_kl_violation: ``"fallback"`` (raise the layer's precision to int8, then FP32, and
            re-validate), ``"warn"`` or ``"raise"`` (:class:`hwaware.quant.kl.KLViolationError`).
        validation_batches: validation batches used for KL (logged each epoch and at the end).
        output_fn: ``fn(pl_module, batch) -> Tensor`` giving the model output for the output KL;
            default ``pl_module.predict_step(batch, 0)`` where its class defines one, else
            ``pl_module(*batch[:-1])`` for a tuple batch.
        output_kind: what that output holds, for the output KL (:func:`hwaware.quant.kl.output_kl`):
            ``"logits"`` (one column: a binary logit; more: class logits), ``"probabilities"``
            (sigmoid / softmax already applied), ``"multilabel_logits"`` or
            ``"multilabel_probabilities"`` (each column its own binary outcome: multi-task heads).
            Outputs read as logits that all lie in [0, 1] get a warning (probabilities?).

    Raises:
        ValueError: any argument outside its allowed set (raised here, at construction); a model
            with no quantizable layer (raised at fit start); NaN/inf seen while quantizing (names
            the layer); ``monitor`` never logged with ``start="plateau"``; a model that cannot be
            run on its batches the way the output KL runs it (checked once, at the first validation
            batch, or at the first calibration batch if none came before: not after training).
            A ``skip`` pattern that matches nothing in the model, a ``layer_specs`` pattern that
            matches no quantizable layer or an override invalid for its layer's kind (at
            ``setup``); a checkpoint written with other ``layer_specs``, specs or ``skip`` once
            quantization started (at resume); ``calibration_batches=0`` with
            ``freeze_observers_after=0`` and a static activation spec (its ranges would never be
            observed).
        TypeError: a spec that is not a :class:`QuantSpec`; ``layer_specs`` values that are not a
            QuantSpec or a dict of them (``"activation"`` may be None).
        RuntimeError: a fit that would train on after this callback finished (phase ``"done"``: a
            second ``fit`` of the same model with the same callback, or a resume from a checkpoint
            written after it finished), at the first epoch it would train: the weights would move
            away from the scales QAT froze and validated, and export would clip them; a RuntimeError
            too for an optimizer step Lightning did not make (a manual-optimization module stepping
            the torch optimizer itself, ``use_pl_optimizer=False``), at that step. A fit on another
            model starts this callback afresh.
    """

    def __init__(
        self,
        start_epoch: int = 1,
        *,
        start: str = "epoch",
        monitor: Optional[str] = None,
        mode: str = "max",
        patience: int = 2,
        min_delta: float = 0.0,
        calibration_batches: int = 16,
        freeze_observers_after: Optional[int] = 200,
        freeze_bn: bool = False,
        lr_scale: float = 1.0,
        qat_epochs: Optional[int] = None,
        weight_spec: QuantSpec = DEFAULT_WEIGHT_SPEC,
        activation_spec: Optional[QuantSpec] = _DEFAULT,  # type: ignore[assignment]
        embedding_spec: Optional[QuantSpec] = _DEFAULT,  # type: ignore[assignment]
        skip: Union[str, Sequence[str]] = (),
        layer_specs: Optional[Mapping[str, Union[QuantSpec, Mapping[str, Optional[QuantSpec]]]]] = None,
        kl_threshold: float = 0.01,
        on_kl_violation: str = "fallback",
        validation_batches: int = 8,
        output_fn: Optional[Callable[["pl.LightningModule", Any], Tensor]] = None,
        output_kind: str = "logits",
    ) -> None:
        _check_int("start_epoch", start_epoch, 0)
        _check_choice("start", start, _STARTS)
        _check_choice("mode", mode, _MODES)
        _check_int("patience", patience, 1)
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(f"min_delta={min_delta!r} is invalid; expected a float >= 0")
        if start == "plateau" and not (isinstance(monitor, str) and monitor):
            raise ValueError(f"start='plateau' needs monitor=<logged metric name>, got monitor={monitor!r}")
        if monitor is not None and not isinstance(monitor, str):
            raise ValueError(f"monitor={monitor!r} is invalid; expected a metric name (str) or None")
        _check_int("calibration_batches", calibration_batches, 0)
        _check_int("qat_epochs", qat_epochs, 1, allow_none=True)
        _check_int("freeze_observers_after", freeze_observers_after, 0, allow_none=True)
        if not isinstance(freeze_bn, bool):
            raise ValueError(f"freeze_bn={freeze_bn!r} is invalid; expected True or False")
        if not isinstance(lr_scale, (int, float)) or isinstance(lr_scale, bool) or not 0 < lr_scale <= 1 or not math.isfinite(lr_scale):
            raise ValueError(f"lr_scale={lr_scale!r} is invalid; expected a float in (0, 1]")
        activation_spec = DEFAULT_ACTIVATION_SPEC if activation_spec is _DEFAULT else activation_spec
        embedding_spec = DEFAULT_EMBEDDING_SPEC if embedding_spec is _DEFAULT else embedding_spec
        for name, spec, optional in (("weight_spec", weight_spec, False), ("activation_spec", activation_spec, True),
                                     ("embedding_spec", embedding_spec, True)):
            if spec is None and optional:
                continue
            if not isinstance(spec, QuantSpec):
                raise TypeError(f"{name} must be a hwaware.QuantSpec{' or None' if optional else ''}, got {type(spec).__name__}")
        check_activation_spec(activation_spec, "activation_spec")  # (a per-batch-position scale: refused)
        if weight_spec.dynamic:
            raise ValueError("weight_spec.dynamic=True is invalid; weights are quantized with fixed per-channel scales")
        if weight_spec.granularity == "per_row":
            raise ValueError("weight_spec.granularity='per_row' is invalid; expected 'per_channel', 'per_group' or 'per_tensor'")
        if embedding_spec is not None and embedding_spec.granularity != "per_row":
            raise ValueError(f"embedding_spec.granularity={embedding_spec.granularity!r} is invalid; expected 'per_row'")
        if embedding_spec is not None and embedding_spec.learnable:
            raise ValueError("embedding_spec.learnable=True is invalid; row-wise table scales are computed from each row")
        if embedding_spec is not None and not embedding_spec.dynamic:
            embedding_spec = embedding_spec.replace(dynamic=True)  # row scales always follow the row
        skip = skip_patterns(skip)
        layer_specs = normalize_layer_specs(layer_specs)
        if not isinstance(kl_threshold, (int, float)) or not kl_threshold > 0 or not math.isfinite(kl_threshold):
            raise ValueError(f"kl_threshold={kl_threshold!r} is invalid; expected a finite float > 0")
        _check_choice("on_kl_violation", on_kl_violation, _VIOLATIONS)
        _check_choice("output_kind", output_kind, OUTPUT_KINDS)
        _check_int("validation_batches", validation_batches, 1)
        if calibration_batches == 0 and freeze_observers_after == 0:
            static = [f"layer_specs[{p!r}]" for p, o in layer_specs.items()
                      if o.get("activation") is not None and not o["activation"].dynamic]
            if activation_spec is not None and not activation_spec.dynamic:
                static.insert(0, "activation_spec")
            if static:
                raise ValueError(
                    f"calibration_batches=0 with freeze_observers_after=0 leaves the static activation ranges of "
                    f"{', '.join(static)} unobserved (they are set from the batches observed before freezing); "
                    "expected calibration_batches >= 1, freeze_observers_after >= 1 or None, or a dynamic activation spec")

        self.start_epoch = start_epoch
        self.start = start
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.calibration_batches = calibration_batches
        self.freeze_observers_after = freeze_observers_after
        self.freeze_bn = freeze_bn
        self.lr_scale = float(lr_scale)
        self.qat_epochs = qat_epochs
        self.weight_spec = weight_spec
        self.activation_spec = activation_spec
        self.embedding_spec = embedding_spec
        self.skip = tuple(skip)
        self.layer_specs = layer_specs  # {pattern: {"weight"?: QuantSpec, "activation"?: QuantSpec | None}}, in order
        self.kl_threshold = float(kl_threshold)
        self.on_kl_violation = on_kl_violation
        self.validation_batches = validation_batches
        self.output_fn = output_fn
        self.output_kind = output_kind

        self._model_ref: Optional[weakref.ref] = None  # the model this callback's state belongs to
        self._step_watch = LightningStepWatch("ProgressiveQuantization")
        self._reset_state()

    def _reset_state(self) -> None:
        """The state of a callback that has seen no fit (and, for a fit on another model, what it is
        reset to: the plateau's best value, the phases and the quantizers belong to the old one).
        Everything here but the per-process flags is saved by ``state_dict``."""
        # -- state (saved by state_dict) ------------------------------------
        self.phase = "fp32"
        self._history: List[Dict[str, Any]] = [{"phase": "fp32", "epoch": 0, "step": 0}]
        self._calib_seen = 0
        self._qat_seen = 0
        self._observers_frozen = False
        self._best: Optional[float] = None
        self._wait = 0
        self._plateau_reached = False
        self._layers: Dict[str, Dict[str, Any]] = {}  # name -> {"kind", "weight_spec", "activation_spec", "enabled"}
        self._skipped: Dict[str, str] = {}
        self._fallbacks: Dict[str, str] = {}
        self._fallback_kl: Dict[str, List[float]] = {}  # the KL of each step down, in order
        self._kl: Dict[str, float] = {}
        self._sqnr: Dict[str, float] = {}
        self._output_kl: Optional[float] = None
        self._warned_output = False  # (an output that is not one tensor: said once)
        self._warned_probabilities = False  # not state: a warning per process
        self._warned_unmeasured = False  # not state: a warning per process
        self._epoch_started: Optional[int] = None  # the epoch on_train_epoch_start last ran for
        self._resumed_epoch: Optional[int] = None  # the epoch a resumed checkpoint was written in
        self._kl_history: Dict[str, Dict[str, float]] = {}
        self._metrics_before: Dict[str, float] = {}
        self._metrics_after: Dict[str, float] = {}
        self.fp32_reference: Optional[Dict[str, Tensor]] = None
        self._fp32_buffers: Optional[Dict[str, Tensor]] = None  # buffers at calibration start, for the reference
        self._schedules_at_calibration: Optional[List[Any]] = None  # per-step LR schedules then (put back at QAT)
        self._pending_quantizers: Optional[Dict[str, Dict[str, Any]]] = None
        self._states: Dict[str, QuantState] = {}
        self._bn: List[nn.Module] = []
        self._collector: Optional[LayerErrorCollector] = None
        self._collecting = False
        self._val_batches_seen = 0
        self._call_checked = False  # not saved: a resumed fit checks again, once
        # start="plateau": the last validation did not log the monitor (an epoch-level training
        # metric, which Lightning aggregates after validation): read it at the end of the epoch
        self._plateau_pending = False
        self._plateau_pending_value: Optional[float] = None  # the monitor's epoch value so far then (saved)
        self._qat_epochs_done = 0  # epochs in which QAT trained (saved: qat_epochs counts them)
        self._epoch_start_step = 0
        self._validation_runs = True  # whether this fit has a validation loop (on_train_start)
        self._monitor_at_val_start: Any = None  # the monitor's value object when validation started
        # layers whose forward ran since calibration started, until the end of the first epoch with
        # QAT (None: not tracking); a layer never called is left FP32 (:meth:`_drop_uncalled`)
        self._called: Optional[set] = None
        self._call_hooks: List[Any] = []
        self._resume_called: Optional[set] = None

    # ================================================================================ hooks ===
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        _refuse_multiprocessing_launch(trainer, "ProgressiveQuantization")
        if self._model_ref is not None and self._model_ref() is not pl_module:
            # a new model: a plateau it never had (best, wait), phases and quantizers of the old one
            # would start its QAT early. (A resume's checkpoint state is loaded after setup.)
            self._reset_state()
        self._model_ref = weakref.ref(pl_module)
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and self.start_epoch >= trainer.max_epochs:
            raise ValueError(
                f"start_epoch={self.start_epoch} is invalid for Trainer(max_epochs={trainer.max_epochs}); "
                f"expected start_epoch < max_epochs so that QAT runs"
            )
        carried = _attached_states(pl_module)
        if carried and not self._states:
            # fake quant an earlier run attached (a finished ProgressiveQuantization's frozen scales):
            # left on, this run's FP32 phase would train, and measure metrics_before, quantized. (A
            # resume from a checkpoint re-attaches the checkpoint's own at fit start: no warning.)
            detach_quantization(pl_module)
            if trainer.ckpt_path is None:
                rank_zero_warn(
                    f"ProgressiveQuantization: the model carries fake quantization from an earlier run on {len(carried)} "
                    f"layer(s) ({', '.join(sorted(carried)[:4])}{', ...' if len(carried) > 4 else ''}); removed, so this run's "
                    "FP32 phase trains the float model from its current weights and its calibration attaches new quantizers")

    def _check_plan(self, pl_module: "pl.LightningModule") -> None:
        """Refuse a model with nothing to quantize, and warn of spec choices export cannot serve as
        trained: at fit start, after the module's ``setup`` / ``configure_model`` built its layers
        (Lightning runs callbacks' ``setup`` first: a model building them there was refused as
        having no quantizable layer). Calibration plans again, on the model as it is then."""
        plan, skipped = self._plan(pl_module)
        if not plan:
            raise ValueError(
                f"{type(pl_module).__name__} has no quantizable layer (nn.Linear, nn.Conv1d, nn.Conv2d, "
                f"nn.Embedding, nn.EmbeddingBag) outside skip={list(self.skip)}; skipped: {skipped or 'none found'}"
            )
        from hwaware.export.deploy import unpackable_specs  # (export imports this module's package at call time)

        unpackable = unpackable_specs({n: (kind, w) for n, (kind, w, _) in plan.items()})
        if unpackable:  # a spec choice: training them quantized buys nothing at export
            rank_zero_warn(f"ProgressiveQuantization: {len(unpackable)} layer(s) will train with specs no hwaware deploy op "
                           "packs, and hwaware.export will leave them dense (FP32): "
                           + "; ".join(f"{n}: {why}" for n, why in unpackable.items()))
        served = DEFAULT_ACTIVATION_SPEC.short()
        other_act = sorted({a.short() for n, (kind, w, a) in plan.items()
                            if kind == "linear" and n not in unpackable and a is not None and a.short() != served})
        if other_act:  # no deploy kernel keeps these scales: export serves the input another way (the gate measures it)
            rank_zero_warn(f"ProgressiveQuantization: activation spec(s) {', '.join(other_act)}: hwaware's deploy kernels "
                           f"quantize a Linear's input {served} (or keep it float: dequant, int4), so export serves these "
                           "layers' inputs other than QAT trains them (the manifest's 'activation' against 'qat_activation'; "
                           "the regression gate measures what is served)")

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_plan(pl_module)
        # resuming: the model's weights are restored already; re-attach quantizers with their state
        # (before the optimizer state is restored, so LSQ parameter groups line up)
        if self._pending_quantizers is not None:
            self._restore_quantizers(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._step_watch.attach(trainer.optimizers)
        if self.qat_epochs is not None and self.phase == "qat" and self._qat_epochs_done >= self.qat_epochs:
            # resumed from a checkpoint written after the last QAT epoch (Lightning does not save
            # should_stop): no more training, the end of fit validates
            trainer.should_stop = True
        # Lightning 2.x's own test: a val loader source (loader, datamodule or the module's
        # val_dataloader), validation_step, and batches to take
        source = getattr(getattr(getattr(trainer.fit_loop, "epoch_loop", None), "val_loop", None), "_data_source", None)
        self._validation_runs = (trainer.limit_val_batches != 0 and is_overridden("validation_step", pl_module)
                                 and (source is None or source.is_defined()))
        if self.phase != "fp32" or self.start != "epoch":
            return
        accumulate = max(1, int(trainer.accumulate_grad_batches))
        batches = trainer.num_training_batches
        if not isinstance(batches, int) or batches <= 0:  # an iterable of unknown length
            return
        per_epoch = math.ceil(batches / accumulate)
        # the index of the first optimizer step QAT trains: calibration ending inside an accumulation
        # window drops its gradients, so that window's step is QAT's
        # Lightning restarts its accumulation windows every epoch: calibration spanning whole epochs
        # uses per_epoch steps of each, then the rest's windows in the epoch QAT starts in
        full, rest = divmod(self.calibration_batches, batches)
        qat_step = (self.start_epoch + full) * per_epoch + rest // accumulate
        limits = []
        if trainer.max_steps is not None and trainer.max_steps >= 0:
            limits.append((trainer.max_steps, f"max_steps={trainer.max_steps}", "max_steps"))
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            # calibration may run into the next epoch; an fit that ends inside it trains no QAT step
            # (a trial: 10 batches an epoch, calibration_batches=16, max_epochs=2: "QAT never ran")
            limits.append((trainer.max_epochs * per_epoch, f"max_epochs={trainer.max_epochs}, {trainer.max_epochs * per_epoch} "
                           "steps", "max_epochs"))
        for limit, given, knob in limits:
            if qat_step >= limit:
                raise ValueError(
                    f"ProgressiveQuantization(start_epoch={self.start_epoch}, calibration_batches={self.calibration_batches}) "
                    f"would start QAT at optimizer step {qat_step} ({per_epoch} per epoch), but Trainer({given}) stops "
                    f"before it: lower start_epoch or calibration_batches, or raise {knob}")

    @override
    def _without_state(self) -> str:
        if self._states:  # (a fit in this process left them: validate(ckpt_path="best") of a weights-only checkpoint)
            return (f"The callback keeps the state it had (phase {self.phase!r}, {len(self._states)} quantized layer(s), "
                    "from its own fit): the model runs, and hwaware.export packs it, with those specs, scales and "
                    "fallbacks, which are this checkpoint's only if the fit that saved it is the one this callback ran")
        return (f"The callback is in phase {self.phase!r}: the model runs unquantized. If the checkpoint is from QAT, its "
                "specs, skips, frozen scales and KL fallbacks are not in it, and hwaware.export would pack these weights "
                "as a post-training export (every layer, default specs, these weights as the gate's reference): save "
                "QAT checkpoints with save_weights_only=False. For an FP32 checkpoint this is as it should be")

    @override
    def _restore_for_evaluation(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # validate / test / predict(ckpt_path=...): attach the quantizers, so the model runs (and
        # exports) as QAT left it
        if self._pending_quantizers is not None:
            self._restore_quantizers(trainer, pl_module)
        elif not self._layers and _attached_states(pl_module):
            # a checkpoint from before calibration (ckpt_path="best" from the FP32 epochs, after a fit
            # that ran QAT): its weights are FP32, and the quantizers the fit left on the model (scales
            # frozen on other weights) would run them quantized, and export would pack them with those
            detach_quantization(pl_module)
            self._states = {}
            self._set_gate_reference(trainer, pl_module)  # (this checkpoint's: no QAT-start model yet)
            rank_zero_info(f"ProgressiveQuantization: the checkpoint is from phase {self.phase!r}, before quantization: "
                           "the fake quantizers this fit attached are removed, so the model runs as FP32")
        if self.phase != "qat" or not self._states:
            return
        # A checkpoint Lightning saved during fit is always from before on_fit_end, where the KL
        # validation and its fallbacks run: without them, export would pack every layer the run
        # decided to keep at higher precision
        if trainer.state.fn == TrainerFn.VALIDATING:
            rank_zero_info("ProgressiveQuantization: this checkpoint is from before the end-of-fit KL validation (phase "
                           "'qat'); running it now on the validation batches, as the end of fit would have")
            self._validate(trainer, pl_module)
        else:
            rank_zero_warn(
                f"ProgressiveQuantization: this checkpoint is from before the end-of-fit KL validation (phase 'qat'), and "
                f"{trainer.state.fn.value} does not run it: the model is as QAT left it, with no KL fallback. Run "
                "trainer.validate(model, datamodule, ckpt_path=...) before exporting, as the README shows")

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        resumed_inside = self._resumed_epoch is not None and self._resumed_epoch == trainer.current_epoch
        self._resumed_epoch = None
        if resumed_inside:
            # resumed from a checkpoint written inside this epoch (a mid-epoch validation's): it had
            # started, and what starts at an epoch's start (calibration after a plateau reached at that
            # validation) waits for the next one, as in the run that was not interrupted
            self._epoch_started = trainer.current_epoch
            return
        self._epoch_started = trainer.current_epoch
        self._epoch_start_step = trainer.global_step
        if self.phase == "validate":  # a checkpoint written while the end-of-fit KL validation ran
            raise RuntimeError(
                "ProgressiveQuantization: this run resumed from a checkpoint written during the end-of-fit KL validation "
                "(phase 'validate'): its scales are frozen, and training on would move the weights away from them. "
                "Resume with the max_epochs / max_steps the checkpoint was written with (the validation then runs again "
                "at the end of fit), or start a new run with a new ProgressiveQuantization")
        if self.phase == "done":
            done = next((p for p in reversed(self._history) if p["phase"] == "done"), {})
            raise RuntimeError(
                f"ProgressiveQuantization already finished (QAT validated, phase 'done' at epoch {done.get('epoch', '?')}): "
                "training on would move the weights away from the scales it froze and validated, and export would clip "
                "them silently. Train longer within one fit (a larger max_epochs), or start a new run with a new "
                "ProgressiveQuantization")
        if self.phase != "fp32" or trainer.current_epoch < self.start_epoch:
            return
        if self.start == "plateau":
            reached = trainer.strategy.broadcast(self._plateau_reached, src=0)
            if not reached:
                return
        self._enter_calibrate(trainer, pl_module)
        if self.calibration_batches == 0:
            self._enter_qat(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._epoch_started != trainer.current_epoch:
            # resumed from the checkpoint of an epoch's last step, Lightning starts the next epoch
            # without on_train_epoch_start: QAT would start an epoch late, or never
            self.on_train_epoch_start(trainer, pl_module)
        if not self._call_checked and self.phase in ("calibrate", "qat"):
            # no validation batch has come yet (no sanity check, start_epoch=0, or no validation):
            # check before the first quantized step, on the batches the output KL would use now
            self._check_model_call(trainer, pl_module, batch if trainer.val_dataloaders is None else None)
        if self.phase == "qat" and self.freeze_bn:
            for bn in self._bn:
                bn.eval()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.phase in ("calibrate", "qat"):
            self._check_finite(outputs)
        if self.phase == "calibrate":
            self._calib_seen += 1
            if self._calib_seen >= self.calibration_batches:
                self._enter_qat(trainer, pl_module)
        elif self.phase == "qat":
            self._qat_seen += 1
            if not self._observers_frozen and self.freeze_observers_after is not None and self._qat_seen >= self.freeze_observers_after:
                self._freeze_observers()

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._step_watch.lightning_step()
        if self.phase == "calibrate":
            # calibration observes, it does not train: without gradients the optimizer skips every
            # parameter (weights, Adam moments and weight decay stay as they were; per-step LR
            # schedules, which Lightning steps anyway, are put back at QAT start), so the FP32
            # reference kept at QAT start is the FP32 model as trained
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        # LSQ scales live outside the DDP-wrapped module: average their gradients across ranks
        if self.phase != "qat" or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        world = torch.distributed.get_world_size()
        for st in self._states.values():
            for q in st.quantizers():
                g = q.learned_log_scale.grad if q.learned_log_scale is not None else None
                if g is not None:
                    torch.distributed.all_reduce(g)
                    g.div_(world)

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync_running_observers()
        if trainer.state.fn == TrainerFn.FITTING:
            # the epoch's training metrics are aggregated now: the report's metrics pair this epoch's
            # validation with this epoch's training (not the last epoch's), and a fit that never
            # validates (limit_val_batches=0) still has them
            self._record_metrics(_scalar_metrics(trainer))
        if self._called is not None and self.phase == "qat":  # after this epoch's validation too
            self._drop_uncalled(trainer, pl_module)
        if self.phase == "qat":
            # an epoch counts once QAT trained in it: calibration can use up the epoch QAT starts in
            qat_step = next(h["step"] for h in self._history if h["phase"] == "qat")
            if trainer.global_step > max(self._epoch_start_step, qat_step):
                self._qat_epochs_done += 1
            if self.qat_epochs is not None and self._qat_epochs_done >= self.qat_epochs:
                trainer.should_stop = True  # on_fit_end validates, as at max_epochs
        if self.phase == "fp32" and self.start == "plateau" and (self._plateau_pending or not self._validation_runs):
            # the epoch's training metrics are aggregated now (after validation): what Lightning's
            # EarlyStopping reads at this point too. Without validation this is the only reading
            metrics = _scalar_metrics(trainer)
            if self._plateau_pending and self.monitor not in metrics and self._plateau_pending_value is not None:
                # resumed from a checkpoint written at this epoch's validation end: Lightning ends the
                # epoch without the training metrics it had aggregated; the value saved then is this one
                metrics[self.monitor] = self._plateau_pending_value
            self._plateau_pending = False
            self._plateau_pending_value = None
            self._update_plateau(metrics)

    @override
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._monitor_at_val_start = trainer.callback_metrics.get(self.monitor) if self.monitor else None
        self._val_batches_seen = 0
        if self.phase == "qat" and not trainer.sanity_checking:
            self._collector = LayerErrorCollector(self._enabled_states()).attach_to(pl_module)
            self._collecting = True

    @override
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if not self._call_checked and dataloader_idx == 0:  # the loader the output KL reads (the sanity check's too)
            self._check_model_call(trainer, pl_module, batch)
        if self._collector is not None:
            # each epoch's per-layer KL reads the first validation loader only, as the end-of-fit
            # validation does: with several, kl_history mixed every loader's batches
            self._collector.paused = dataloader_idx != 0

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if dataloader_idx != 0:
            return
        self._val_batches_seen += 1
        if self._collecting and self._val_batches_seen >= self.validation_batches:
            self._stop_collecting()

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._collecting:
            self._stop_collecting()
        if self._collector is not None:
            results = self._collector.results()
            self._collector = None
            kl = self._rank_mean(trainer, pl_module, {n: r["kl"] for n, r in results.items()})
            for name, value in kl.items():
                pl_module.log(f"kl/{name}", value)  # the mean over ranks already: what kl_history holds
            self._kl_history[str(trainer.current_epoch)] = kl

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            # only a fit's own validations count: a trainer.validate() before fit (or between fits)
            # would move the plateau count and metrics_before of the fit that follows
            return
        metrics = _scalar_metrics(trainer)
        if self.phase in ("fp32", "qat"):
            # with this epoch's training metrics so far, not the last epoch's that callback_metrics still
            # holds (what this epoch's end will aggregate: a checkpoint written now keeps them for a resume)
            self._record_metrics({**metrics, **_epoch_training_values(trainer, self.monitor)})
        if self.phase == "fp32" and self.start == "plateau":
            # trainer.callback_metrics keeps every metric's last value: the monitor counts here only
            # when this validation logged it (a new value object), else it is last epoch's value of
            # an epoch-level training metric, aggregated after validation: read at the epoch's end
            if trainer.callback_metrics.get(self.monitor) is not self._monitor_at_val_start and self.monitor in metrics:
                self._update_plateau(metrics)
            else:
                self._plateau_pending = True
                # ... and what that reading will be, as far as the epoch has come: a checkpoint
                # written now (ModelCheckpoint at validation end) keeps it, since a run resumed
                # from it ends this epoch with none of its training metrics (Lightning does not
                # save them)
                self._plateau_pending_value = self._epoch_training_value(trainer)

    def _record_metrics(self, metrics: Dict[str, float]) -> None:
        """Into ``metrics_before`` (FP32 phase) or ``metrics_after`` (QAT), merged, as
        callback_metrics keeps every metric's last value: a resumed run (whose callback_metrics lost
        the training metrics) keeps those recorded before it."""
        if self.phase == "fp32":
            self._metrics_before = {**self._metrics_before, **metrics}
        elif self.phase == "qat":
            self._metrics_after = {**self._metrics_after, **metrics}

    def _epoch_training_value(self, trainer: "pl.Trainer") -> Optional[float]:
        """The epoch-level value of ``monitor`` logged in training so far this epoch (what Lightning
        aggregates into ``callback_metrics`` at the epoch's end), or None where there is none."""
        return _epoch_training_values(trainer, self.monitor).get(self.monitor)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.phase == "validate":  # resumed from a checkpoint written during it: validate again, whole
            self._validate(trainer, pl_module)
        elif self.phase == "qat":
            if self._qat_seen == 0:
                rank_zero_warn("ProgressiveQuantization: fit ended right as QAT began, after 0 QAT training steps: the "
                               "model is calibrated but not fine-tuned quantized (the report's phases say where each began)")
            self._validate(trainer, pl_module)
        elif self.phase in ("fp32", "calibrate"):
            self._untrack_calls()  # (a resume from a checkpoint tracks again from what it saved)
            rank_zero_warn(
                f"ProgressiveQuantization: fit ended in phase {self.phase!r}; QAT never ran "
                f"(start={self.start!r}, start_epoch={self.start_epoch}, max_epochs={trainer.max_epochs})"
                + _stopped_by(trainer, self.monitor if self.start == "plateau" else None)
            )

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._remove_hooks()  # no hook of this callback stays on the user's model

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # every fit / validate ends here, normally or not: a validation that never reached its epoch
        # end (stopped inside it) leaves no KL collector on the layers. Call tracking is not touched
        # here: on_fit_end and on_exception end it, and nothing else may stop it mid-fit
        self._remove_collector()
        self._step_watch.detach()

    def _remove_collector(self) -> None:
        """Take the per-layer KL collector's hooks off the model (its results are dropped)."""
        if self._collecting:
            self._stop_collecting()
        self._collector = None

    def _remove_hooks(self) -> None:
        self._remove_collector()
        self._untrack_calls()

    # ===================================================================== state / resume ===
    @override
    def state_dict(self) -> Dict[str, Any]:
        quantizers = {}
        for name, st in self._states.items():
            quantizers[name] = {
                "weight": {k: v.detach().cpu().clone() for k, v in st.weight.state_dict().items()},
                "activation": (
                    {k: v.detach().cpu().clone() for k, v in st.activation.state_dict().items()}
                    if st.activation is not None else None
                ),
            }
        if self._pending_quantizers is not None and not quantizers:
            quantizers = self._pending_quantizers
        return {
            "phase": self.phase,
            "history": copy.deepcopy(self._history),
            "calib_seen": self._calib_seen,
            "qat_seen": self._qat_seen,
            "observers_frozen": self._observers_frozen,
            "best": self._best,
            "wait": self._wait,
            "plateau_reached": self._plateau_reached,
            # a checkpoint written at validation end, between the validation and the end of the epoch
            # that reads an epoch-level training monitor (start="plateau")
            "plateau_pending": self._plateau_pending,
            "qat_epochs_done": self._qat_epochs_done,
            "plateau_pending_value": self._plateau_pending_value,
            "layers": copy.deepcopy(self._layers),
            "skipped": dict(self._skipped),
            "fallbacks": dict(self._fallbacks),
            "fallback_kl": copy.deepcopy(self._fallback_kl),
            "kl": dict(self._kl),
            "sqnr": dict(self._sqnr),
            "output_kl": self._output_kl,
            "kl_history": copy.deepcopy(self._kl_history),
            "metrics_before": dict(self._metrics_before),
            "metrics_after": dict(self._metrics_after),
            "layer_specs": layer_specs_to_state(self.layer_specs),
            "global_specs": self._global_specs(),
            "skip": list(self.skip),
            "called": None if self._called is None else sorted(self._called),
            "fp32_reference": self.fp32_reference,
            "quantizers": quantizers,
            # taken at calibration start, used at QAT start: a run resumed in between needs them
            "fp32_buffers": self._fp32_buffers,
            "schedules_at_calibration": copy.deepcopy(self._schedules_at_calibration),
            "settings": settings_of(self, _SETTINGS),
            # the epoch running when the checkpoint was written (and the step it began at): a resume
            # inside it does not start it again
            "epoch_started": self._epoch_started,
            "epoch_start_step": self._epoch_start_step,
        }

    def _global_specs(self) -> Dict[str, Optional[Dict[str, Any]]]:
        """weight_spec / activation_spec / embedding_spec as saved in a checkpoint (dicts or None)."""
        return {k: (None if v is None else v.to_dict()) for k, v in
                (("weight", self.weight_spec), ("activation", self.activation_spec), ("embedding", self.embedding_spec))}

    @override
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._state_loaded = True
        phase = state_dict["phase"]
        _check_choice("checkpoint phase", phase, PHASES)
        saved_specs = state_dict.get("layer_specs", [])  # absent: written before layer_specs existed (none)
        if state_dict["layers"] and saved_specs != layer_specs_to_state(self.layer_specs):
            # the layers' specs come from the checkpoint: resuming under other overrides would
            # silently train what the checkpoint planned, not what this callback says
            raise ValueError(
                f"the checkpoint was written by ProgressiveQuantization(layer_specs={_describe_specs(saved_specs)}) in phase "
                f"{phase!r} (layers already quantized), but this callback has layer_specs="
                f"{_describe_specs(layer_specs_to_state(self.layer_specs))}; resume with the layer_specs= the checkpoint "
                "was written with")
        saved = state_dict.get("global_specs")  # absent: written before the specs were saved (not checked)
        here = self._global_specs()
        if state_dict["layers"] and saved is not None and saved != here:
            # as for layer_specs: the quantized layers' specs come from the checkpoint
            diff = ", ".join(f"{k}_spec: checkpoint {_short(saved.get(k))}, this callback {_short(here.get(k))}"
                             for k in here if saved.get(k) != here.get(k))
            raise ValueError(f"the checkpoint was written in phase {phase!r} (layers already quantized) by a "
                             f"ProgressiveQuantization with other specs ({diff}); resume with the specs the "
                             "checkpoint was written with")
        saved_skip = state_dict.get("skip")  # absent: written before skip was saved (not checked)
        if state_dict["layers"] and saved_skip is not None and list(saved_skip) != list(self.skip):
            # as for layer_specs: which layers are quantized comes from the checkpoint, so another
            # skip= would be ignored while this callback says it holds
            raise ValueError(
                f"the checkpoint was written in phase {phase!r} (layers already quantized) by a ProgressiveQuantization "
                f"with skip={list(saved_skip)}, but this callback has skip={list(self.skip)}; resume with the skip= the "
                "checkpoint was written with")
        warn_changed_settings("ProgressiveQuantization", state_dict.get("settings"), settings_of(self, _SETTINGS), phase)
        self.phase = phase
        self._history = copy.deepcopy(state_dict["history"])
        self._calib_seen = state_dict["calib_seen"]
        self._qat_seen = state_dict["qat_seen"]
        self._observers_frozen = state_dict["observers_frozen"]
        self._best = state_dict["best"]
        self._wait = state_dict["wait"]
        self._plateau_reached = state_dict["plateau_reached"]
        self._resumed_epoch = self._epoch_started = state_dict.get("epoch_started")  # absent: written before it was saved
        self._epoch_start_step = int(state_dict.get("epoch_start_step", self._epoch_start_step))
        # absent: written before they were saved. A pending reading with no value to read is dropped,
        # as those checkpoints' resumes did (the resumed epoch ends with no training metrics)
        self._qat_epochs_done = int(state_dict.get("qat_epochs_done", 0))
        self._plateau_pending_value = state_dict.get("plateau_pending_value")
        self._plateau_pending = bool(state_dict.get("plateau_pending", False)) and self._plateau_pending_value is not None
        self._layers = copy.deepcopy(state_dict["layers"])
        self._skipped = dict(state_dict["skipped"])
        self._fallbacks = dict(state_dict["fallbacks"])
        self._fallback_kl = copy.deepcopy(state_dict.get("fallback_kl", {}))
        self._kl = dict(state_dict["kl"])
        self._sqnr = dict(state_dict["sqnr"])
        self._output_kl = state_dict["output_kl"]
        self._kl_history = copy.deepcopy(state_dict["kl_history"])
        self._metrics_before = dict(state_dict["metrics_before"])
        self._metrics_after = dict(state_dict["metrics_after"])
        self.fp32_reference = state_dict["fp32_reference"]
        self._fp32_buffers = state_dict.get("fp32_buffers")  # absent: written before they were saved
        self._schedules_at_calibration = copy.deepcopy(state_dict.get("schedules_at_calibration"))
        self._pending_quantizers = state_dict["quantizers"] if self._layers else None
        called = state_dict.get("called")
        self._resume_called = None if called is None else set(called)

    def _restore_quantizers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        saved = self._pending_quantizers
        self._attach(pl_module, self._layers)
        for name, st in self._states.items():
            if name not in saved:
                raise ValueError(f"checkpoint has no quantizer state for layer {name!r}")
            st.weight.load_state_dict(saved[name]["weight"])
            if st.activation is not None:
                st.activation.load_state_dict(saved[name]["activation"])
        self._pending_quantizers = None
        if self._resume_called is not None and trainer.state.fn == TrainerFn.FITTING:
            # tracking was under way: it goes on with what it had seen
            self._track_calls(pl_module, self._resume_called)
        self._resume_called = None
        if self.fp32_reference is not None:
            self._set_gate_reference(trainer, pl_module)
        self._apply_phase_flags()
        self._add_lsq_params(trainer)

    # ================================================================== phase transitions ===
    def _plan(self, pl_module: nn.Module):
        return find_quantizable(
            pl_module, weight_spec=self.weight_spec, activation_spec=self.activation_spec,
            embedding_spec=self.embedding_spec, skip=self.skip, layer_specs=self.layer_specs,
        )

    def _attach(self, pl_module: nn.Module, layers: Dict[str, Dict[str, Any]]) -> None:
        plan = {
            name: (
                info["kind"],
                QuantSpec.from_dict(info["weight_spec"]),
                QuantSpec.from_dict(info["activation_spec"]) if info["activation_spec"] is not None else None,
            )
            for name, info in layers.items()
        }
        self._states = attach_quantization(pl_module, plan)
        for name, st in self._states.items():
            st.enabled = layers[name]["enabled"]
        self._bn = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def _mark(self, phase: str, trainer: "pl.Trainer") -> None:
        self.phase = phase
        self._history.append({"phase": phase, "epoch": trainer.current_epoch, "step": trainer.global_step})

    def _enter_calibrate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        with warnings.catch_warnings():  # the plan's warnings were given at fit start, on the same model
            warnings.simplefilter("ignore", UserWarning)
            plan, skipped = self._plan(pl_module)
        self._skipped = skipped
        self._layers = {
            name: {"kind": kind, "weight_spec": w.to_dict(), "activation_spec": a.to_dict() if a is not None else None, "enabled": True}
            for name, (kind, w, a) in plan.items()
        }
        self._attach(pl_module, self._layers)
        self._track_calls(pl_module, set())
        # the buffers as FP32 training left them: the calibration batches run in train mode and move
        # BatchNorm's running statistics, which the FP32 reference taken at QAT start must not see
        self._fp32_buffers = {k: b.detach().cpu().clone() for k, b in pl_module.named_buffers()}
        # ... and the per-step LR schedules: Lightning steps them after every optimizer step, which
        # calibration's gradient-free steps are too; QAT starts from where FP32 training left them
        # (with each group's initial_lr: what another callback scaling the LR during calibration, e.g.
        # SemiStructuredSparsity(lr_scale=...) starting pruning, scales too, so QAT keeps that scaling)
        steps = [cfg.scheduler for cfg in trainer.lr_scheduler_configs if cfg.interval == "step"]
        self._schedules_at_calibration = [
            [copy.deepcopy(s.state_dict()) for s in steps],
            [[g["lr"] for g in opt.param_groups] for opt in trainer.optimizers],
            [[g.get("initial_lr") for g in opt.param_groups] for opt in trainer.optimizers]] if steps else None
        self._mark("calibrate", trainer)
        self._apply_phase_flags()
        rank_zero_info(f"ProgressiveQuantization: calibrating {len(plan)} layers for {self.calibration_batches} batches")

    def _keep_fp32_reference(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._fp32_buffers, buffers = None, self._fp32_buffers
        ref = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        ref.update({k: v for k, v in (buffers or {}).items() if k in ref})
        self.fp32_reference = ref
        self._set_gate_reference(trainer, pl_module)

    def _set_gate_reference(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The model's FP32 reference for export's gate: this callback's (the model at QAT start), or
        the dense model a SemiStructuredSparsity kept when 2:4 pruning started before QAT, so that
        the gate covers what pruning cost too."""
        dense = [cb.dense_reference for cb in trainer.callbacks if getattr(cb, "dense_reference", None) is not None]
        set_fp32_reference(pl_module, dense[0] if dense else self.fp32_reference)
        # the gate measures this one too and compares against the better: a dense model kept before
        # it had learned (pruning from an early epoch) would gate nothing
        set_other_fp32_references(pl_module, {"fp32 at QAT start": self.fp32_reference}
                                  if dense and self.fp32_reference is not None else {})

    def _enter_qat(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # calibration observes, it does not train: with gradient accumulation, the gradients of the
        # calibration batches since the last optimizer step would otherwise reach QAT's first step
        for p in pl_module.parameters():
            p.grad = None
        self._sync_observers()
        for name, st in self._states.items():
            st.weight.update_qparams(self._weight_of(pl_module, name))
            st.weight.check_finite()
            if st.activation is not None and not st.activation.spec.dynamic and st.activation.observer.initialized:
                st.activation.update_qparams()
        # the FP32 model at the start of QAT, on CPU: the reference for export's gate. Its weights are
        # QAT's starting weights, its buffers the ones FP32 training left (when this run saw
        # calibration start; a resumed one has only its own). When 2:4 pruning started before QAT,
        # the dense model SemiStructuredSparsity kept instead: the gate then covers pruning too
        self._keep_fp32_reference(trainer, pl_module)
        if self._schedules_at_calibration is not None:
            self._rewind_schedules(trainer)
            self._schedules_at_calibration = None
        self._mark("qat", trainer)
        self._apply_phase_flags()
        if self.lr_scale != 1.0:
            _scale_lr(trainer, self.lr_scale)
        self._add_lsq_params(trainer)
        if self.freeze_observers_after == 0:
            self._freeze_observers()
        rank_zero_info(f"ProgressiveQuantization: QAT from epoch {trainer.current_epoch}, step {trainer.global_step}")

    def _rewind_schedules(self, trainer: "pl.Trainer") -> None:
        """Undo what calibration's gradient-free steps did to the per-step LR schedules, and only that.

        The schedulers go back to their state at calibration start, and each param group's ``lr`` to
        its value then, times whatever scaled the group's ``initial_lr`` since: another callback that
        scaled the learning rates during calibration (``SemiStructuredSparsity(lr_scale=...)``, whose
        pruning may start while this callback calibrates; ``_scale_lr`` scales ``lr``, ``initial_lr``
        and the schedulers' ``base_lrs`` alike) keeps its scaling, in either callback order. The
        schedulers keep their current absolute rates (``base_lrs``, ``eta_min``, ...: ``scheduler_lrs``)
        for the same reason: their step counters are what calibration moved."""
        saved = self._schedules_at_calibration
        states, lrs = saved[0], saved[1]
        initials = saved[2] if len(saved) > 2 else None  # (absent: a checkpoint from before they were kept)
        steps = [cfg.scheduler for cfg in trainer.lr_scheduler_configs if cfg.interval == "step"]
        for sched, state in zip(steps, states):
            current = scheduler_lrs(sched)  # (with those of the schedulers a SequentialLR / ChainedScheduler drives)
            sched.load_state_dict(state)
            for s, k, v in current:
                setattr(s, k, v)
        scaled: Dict[int, float] = {}  # id(param group) -> the factor another callback applied since
        stepped = {id(getattr(sched, "optimizer", None)) for sched in steps}
        for i, (opt, group_lrs) in enumerate(zip(trainer.optimizers, lrs)):
            if id(opt) not in stepped:  # no per-step schedule moved this optimizer's rates: nothing to undo
                continue
            for j, (group, lr) in enumerate(zip(opt.param_groups, group_lrs)):
                then = initials[i][j] if initials is not None and i < len(initials) and j < len(initials[i]) else None
                if initials is not None and then is None:  # a group its scheduler does not drive (added after it)
                    continue
                now = group.get("initial_lr")
                if (isinstance(then, (int, float)) and isinstance(now, (int, float)) and then > 0 and now != then
                        and math.isfinite(now / then)):
                    scaled[id(group)] = now / then
                    lr = lr * scaled[id(group)]
                group["lr"] = lr
        for sched in steps:  # what get_last_lr() reports: scaled as the rates are
            last, groups = getattr(sched, "_last_lr", None), getattr(getattr(sched, "optimizer", None), "param_groups", None)
            if scaled and isinstance(last, list) and isinstance(groups, list) and len(last) == len(groups):
                sched._last_lr = [v * scaled.get(id(g), 1.0) for v, g in zip(last, groups)]

    def _check_finite(self, outputs: Any) -> None:
        """Name the first layer (in model order) whose quantizer saw NaN/inf, when the loss is not
        finite (or on every step when the training step returns no loss to look at)."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor) and bool(torch.isfinite(loss.detach()).all()):
            return
        for st in self._states.values():
            if st.activation is not None:
                st.activation.check_finite()
            st.weight.check_finite()

    def _freeze_observers(self) -> None:
        self._sync_observers()
        for st in self._states.values():
            for q in st.quantizers():
                if q.observer is not None:  # static ranges; weight trackers keep following the weights
                    if q.observer.initialized:
                        q.update_qparams()
                    q.freeze()
        self._observers_frozen = True

    def _apply_phase_flags(self) -> None:
        """Set every quantizer's observe/quantize switches from the phase (and freeze state)."""
        for st in self._states.values():
            for q in st.quantizers():
                if self.phase == "calibrate":
                    q.observe, q.quantize = True, False
                elif self.phase == "qat":
                    q.quantize = True
                    q.observe = not bool(q.frozen) and q.learned_log_scale is None
                else:  # validate / done
                    q.observe, q.quantize = False, True

    def _add_lsq_params(self, trainer: "pl.Trainer") -> None:
        """Put the learned (LSQ) scales in the optimizer that trains their layer's weights, one new
        param group per optimizer (weight decay off), in layer order: a GAN's discriminator's scales
        went to the generator's optimizer, stepped on the generator's loss. The group takes the
        hyperparameters of the group holding the first such layer's weights (its rate, scaled like
        it; the keys its scheduler reads: OneCycleLR's ``initial_lr`` / ``max_lr`` were missing,
        a KeyError at QAT's first step). A layer no optimizer trains (frozen) has its scales
        learned by the first optimizer, at its first group's hyperparameters."""
        if not trainer.optimizers:
            return
        owner: Dict[int, Tuple[int, Dict[str, Any]]] = {}  # id(parameter) -> (optimizer index, its group)
        for i, opt in enumerate(trainer.optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    owner.setdefault(id(p), (i, group))
        module = trainer.lightning_module
        buckets: Dict[int, List[nn.Parameter]] = {}
        like: Dict[int, Dict[str, Any]] = {}  # optimizer index -> the group its new one copies
        for name, st in self._states.items():
            learned = [q.make_learnable() for q in st.quantizers()
                       if q.spec.learnable and not q.spec.dynamic and q.has_qparams]
            if not learned:
                continue
            layer = module.get_submodule(name) if module is not None else None
            # (a routed attention's in_proj holds no Parameter: its weight is the attention module's)
            params = [*layer.parameters(), getattr(layer, "weight", None)] if layer is not None else []
            where, group = next((owner[id(p)] for p in params if p is not None and id(p) in owner),
                                (0, trainer.optimizers[0].param_groups[0]))
            like.setdefault(where, group)
            buckets.setdefault(where, []).extend(p for p in learned if id(p) not in owner)
        for i in sorted(buckets):
            if buckets[i]:
                hyper = {k: copy.deepcopy(v) for k, v in like[i].items() if k not in ("params", "weight_decay")}
                trainer.optimizers[i].add_param_group({**hyper, "params": buckets[i], "weight_decay": 0.0})

    def _drop_lsq_params(self, trainer: "pl.Trainer", names: List[str]) -> None:
        """Take the learned scales of ``names`` out of the optimizer (and its state), so that a resume,
        which adds the remaining layers' scales, rebuilds the same parameter groups."""
        gone = {id(q.learned_log_scale) for n in names for q in self._states[n].quantizers() if q.learned_log_scale is not None}
        if not gone:
            return
        for opt in trainer.optimizers:
            for group in list(opt.param_groups):
                kept = [p for p in group["params"] if id(p) not in gone]
                for p in group["params"]:
                    if id(p) in gone:
                        opt.state.pop(p, None)
                if len(kept) != len(group["params"]):
                    group["params"] = kept
                    if not kept:  # the group _add_lsq_params made, now empty: a resume would not make it
                        opt.param_groups.remove(group)

    def _sync_running_observers(self) -> None:
        """Under DDP, while static observers still observe (calibration, QAT before they freeze):
        every rank's statistics made one, and the scales QAT trains with recomputed from them. Each
        rank observes its own shard in between (its running ranges are its own until the next
        sync); this runs at every training epoch's end and when a checkpoint is written, which
        holds rank 0's state only: without it, a resume dropped the other ranks' statistics and did
        not reproduce the uninterrupted run (a DDP trial). A collective: every rank calls it."""
        if self.phase not in ("calibrate", "qat") or self._observers_frozen or not _dist_ready():
            return
        self._sync_observers()
        if self.phase == "qat":
            for st in self._states.values():
                act = st.activation
                if (act is not None and not act.spec.dynamic and act.observer is not None and act.observer.initialized
                        and not act.frozen and act.learned_log_scale is None):
                    act.update_qparams()

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: Dict[str, Any]) -> None:
        # (every rank writes the checkpoint's dict; Lightning took state_dict() before this hook)
        if self.phase in ("calibrate", "qat") and not self._observers_frozen and _dist_ready():
            self._sync_running_observers()
            if self.state_key in checkpoint.get("callbacks", {}):
                checkpoint["callbacks"][self.state_key] = self.state_dict()

    def _sync_observers(self) -> None:
        # a collective on every rank, observed or not: a layer only some ranks' batches reach (a
        # data-dependent branch) has no statistics on the others, which contribute the identity; a
        # rank that skipped the call left the rest waiting in all_reduce forever (trial: a hang)
        for st in self._states.values():
            for q in st.quantizers():
                if q.observer is not None:
                    q.observer.sync_()

    def _update_plateau(self, metrics: Dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise ValueError(
                f"ProgressiveQuantization(monitor={self.monitor!r}): metric not logged; logged metrics are {sorted(metrics)}"
                + ("" if self._validation_runs else
                   " (this fit runs no validation: no val dataloader, no validation_step or limit_val_batches=0; "
                   "monitor a training metric logged with on_epoch=True, or use start='epoch')")
                + ". It is read when validation ends, or for a metric logged with on_epoch=True in training_step, at "
                  "the end of the training epoch; one the LightningModule logs in its own on_train_epoch_end comes "
                  "after callbacks run")
        value = metrics[self.monitor]
        better = (
            self._best is None
            or (self.mode == "min" and value < self._best - self.min_delta)
            or (self.mode == "max" and value > self._best + self.min_delta)
        )
        if better:
            self._best, self._wait = value, 0
        else:
            self._wait += 1
            if self._wait >= self.patience:
                self._plateau_reached = True

    @staticmethod
    def _weight_of(pl_module: nn.Module, name: str) -> Tensor:
        return pl_module.get_submodule(name).weight

    def _enabled_states(self) -> Dict[str, QuantState]:
        return {n: st for n, st in self._states.items() if st.enabled}

    def _stop_collecting(self) -> None:
        self._collector.__exit__(None, None, None)  # removes the hooks; results stay
        self._collecting = False

    def _track_calls(self, pl_module: nn.Module, called: set) -> None:
        """Record which quantized layers the model calls (a forward pre-hook each), from calibration
        to the end of the first epoch with QAT, training and validation batches alike."""
        self._called = called
        modules = dict(pl_module.named_modules())
        for name in self._states:
            self._call_hooks.append(modules[name].register_forward_pre_hook(lambda m, a, name=name: called.add(name)))

    def _untrack_calls(self) -> None:
        for h in self._call_hooks:
            h.remove()
        self._call_hooks = []

    def _drop_uncalled(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Stop tracking; leave FP32 every quantized layer the model never called while it was tracked.

        Its fake quantization runs in its forward, so a model that reads the layer's weight itself
        (``F.linear(x, self.proj.weight)``) trained it in FP32: quantizing it at export would pack
        weights QAT never saw (and a deploy module has no ``weight`` for that code to read)."""
        self._untrack_calls()
        called, self._called = self._called, None
        if called is None:
            return
        names = sorted(self._states)
        flags = torch.tensor([n in called for n in names], dtype=torch.float32, device=pl_module.device)
        if trainer.world_size > 1:  # a layer any rank called counts as called: every rank decides alike
            flags = trainer.strategy.reduce(flags, reduce_op="sum")
        uncalled = [n for n, f in zip(names, flags.tolist()) if f == 0]
        if not uncalled:
            return
        self._drop_lsq_params(trainer, uncalled)
        detach_quantization(pl_module, uncalled)
        why = ("never called by the model between calibration and the end of the first QAT epoch (forward reads its "
               "weight directly, e.g. F.linear(x, layer.weight), or does not use the layer): fake quantization never "
               "ran on it; left FP32")
        for n in uncalled:
            del self._states[n], self._layers[n]
            self._skipped[n] = why
        rank_zero_warn(f"ProgressiveQuantization: {len(uncalled)} quantized layer(s) {uncalled} were {why}")

    # ========================================================================= validation ===
    def _validation_batches(self, trainer: "pl.Trainer", limit: Optional[int] = None) -> List[Any]:
        loaders = trainer.val_dataloaders
        if loaders is None and trainer.state.fn == TrainerFn.FITTING:
            # a fit resumed from a checkpoint of its last step runs no validation, so Lightning never
            # set up the val dataloader: the KL validation at its end read training batches instead
            val_loop = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
            source = getattr(val_loop, "_data_source", None)
            if source is not None and hasattr(val_loop, "setup_data") and source.is_defined():
                val_loop.setup_data()
                loaders = trainer.val_dataloaders
        if loaders is None:
            loaders = trainer.train_dataloader
            if limit is None:
                rank_zero_warn("ProgressiveQuantization: no validation dataloader; KL validation uses training batches")
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0]
        if loaders is None:
            raise ValueError("ProgressiveQuantization: KL validation needs a val_dataloader (or train_dataloader)")
        batches = []
        for i, batch in enumerate(loaders):
            if i >= (self.validation_batches if limit is None else limit):
                break
            # as Lightning's loops hand a batch to the model: the precision's dtype ("bf16-true",
            # "64-true" cast float inputs), the module's on_before_batch_transfer, then the device
            batch = trainer.precision_plugin.convert_input(batch)
            batch = trainer.lightning_module._on_before_batch_transfer(batch, dataloader_idx=0)
            batches.append(trainer.strategy.batch_to_device(batch, dataloader_idx=0))
        return batches

    def _check_model_call(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any) -> None:
        """Once per fit, at the first batch the callback is handed: run the model on a batch the way
        the output KL at the end of fit will (:meth:`_model_output`: ``output_fn``, ``predict_step``
        or the call on the batch's inputs), so that a model which cannot take its batches raises that
        error now, not after all of training. ``batch=None``: there is no validation batch yet though
        a validation loader exists, so its first batch is read (once).

        Free of side effects: eval mode (BatchNorm statistics and observers stay), no gradients,
        quantization off (no quantizer and no KL collector sees the batch), RNG state restored and
        every submodule's train/eval flag put back as it was."""
        self._call_checked = True
        if batch is None:
            first = self._validation_batches(trainer, limit=1)
            if not first:  # an empty loader: the output KL will have nothing to run either
                return
            batch = first[0]
        with side_effect_free(pl_module):
            self._model_output(pl_module, batch)

    def _model_output(self, pl_module: "pl.LightningModule", batch: Any) -> Optional[Tensor]:
        out = (self.output_fn(pl_module, batch) if self.output_fn is not None
               else model_predictions(pl_module, batch, "ProgressiveQuantization (output KL)"))
        if isinstance(out, Tensor):
            return out
        if not self._warned_output:
            # (its first element or value was taken: in a trial, a dict's first value was the batch's ids,
            # and the output KL read 0.0. export's gate refuses such an output: the same choice is asked here)
            self._warned_output = True
            who = ("output_fn" if self.output_fn is not None else
                   "its predict_step" if defines_predict_step(pl_module) else "the model")
            pick = " (e.g. out['logits'])" if isinstance(out, dict) else " (e.g. out[0])" if isinstance(out, (list, tuple)) else ""
            rank_zero_warn(
                f"ProgressiveQuantization: {who} returned {returned_what(out)} on a batch, not one tensor of "
                f"predictions, so the output KL is not measured (report['output_kl'] None). Pass output_fn=lambda model, "
                f"batch: ... returning the logits tensor{pick}, or define predict_step(batch, batch_idx) returning it "
                "(hwaware.export's regression gate needs the same)", category=UserWarning)
        return None

    def _measure(self, trainer, pl_module, batches) -> None:
        """Per-layer KL/SQNR and output KL over ``batches`` (all ranks agree: values are averaged)."""
        was_training = pl_module.training
        pl_module.eval()
        outs_q, outs_fp = [], []
        try:
            with torch.no_grad():
                with collect_layer_errors(pl_module, self._enabled_states()) as c:
                    for batch in batches:
                        outs_q.append(self._model_output(pl_module, batch))
                with quantization_disabled(pl_module):
                    for batch in batches:
                        outs_fp.append(self._model_output(pl_module, batch))
        finally:
            pl_module.train(was_training)
        results = c.results()
        # decisions (and the report) must be identical on every rank: each is the mean over ranks
        kl = self._rank_mean(trainer, pl_module, {n: r["kl"] for n, r in results.items()})
        sqnr = self._rank_mean(trainer, pl_module, {n: r["sqnr_db"] for n, r in results.items()})
        # a layer left FP32 has no quantization error; one still quantized that no KL batch reached
        # (a head only training_step calls) was not measured: None, not a perfect 0
        self._kl = {n: kl.get(n, None if st.enabled else 0.0) for n, st in self._states.items()}
        self._sqnr = {n: sqnr.get(n, None if st.enabled else math.inf) for n, st in self._states.items()}
        unmeasured = [n for n, v in self._kl.items() if v is None]
        if unmeasured and not self._warned_unmeasured:
            self._warned_unmeasured = True
            rank_zero_warn(
                f"ProgressiveQuantization: {len(unmeasured)} quantized layer(s) were not called by the model's forward on "
                f"the KL validation batches: {', '.join(unmeasured[:8])}{', ...' if len(unmeasured) > 8 else ''} (a head "
                "only training_step uses?). Their KL and SQNR are unmeasured (None in report['kl'] / report['sqnr_db']) "
                f"and on_kl_violation={self.on_kl_violation!r} cannot act on them; they stay quantized",
                category=UserWarning)
        outputs = all(o is not None for o in outs_q + outs_fp) and bool(outs_q)
        ref = torch.cat(outs_fp) if outputs else None
        local = {"": output_kl(ref, torch.cat(outs_q), self.output_kind)} if outputs else {}
        self._output_kl = self._rank_mean(trainer, pl_module, local).get("")  # a collective on every rank
        if ref is not None:
            if self.output_kind.endswith("logits") and not self._warned_probabilities and ref.numel() > 1 \
                    and 0 <= float(ref.min()) and float(ref.max()) <= 1:
                self._warned_probabilities = True
                rank_zero_warn(
                    f"ProgressiveQuantization: every model output over the KL batches lies in [0, 1] "
                    f"({ref.numel()} values), and output_kind={self.output_kind!r} reads them as logits. If forward "
                    f"returns probabilities (sigmoid or softmax applied), pass output_kind="
                    f"{self.output_kind.replace('logits', 'probabilities')!r}: read as logits, the output KL is "
                    "understated", category=UserWarning)

    @staticmethod
    def _int8_weight_spec(kind: str, w: QuantSpec) -> QuantSpec:
        """The int8 spec a sub-8-bit weight falls back to: the format export packs, so that what KL
        validates is what is served. A table: its spec at 8 bits with the int8 row format's scale
        dtype (float32; an int4 table's float16 scales would round what export stores in float32). A
        Linear (and a Conv, alike): symmetric int8 per output channel with float32 scales tracking
        the weight (min-max), the ``Int8Linear`` format; a group-wise or asymmetric int8 weight would
        train, then be left FP32 by export, and per-group int8 scales buy little at 8 bits."""
        if kind in ("embedding", "embedding_bag"):
            return table_spec(w.replace(bits=8))
        return int8_weight_spec()

    def _fall_back(self, pl_module: nn.Module, name: str) -> str:
        """Raise one layer's precision one step: sub-8-bit -> int8, int8 -> FP32. Returns the new label.

        A sub-8-bit weight becomes the int8 format export packs (:meth:`_int8_weight_spec`); an int8
        weight whose activation was sub-8-bit keeps its spec."""
        info = self._layers[name]
        st = self._states[name]
        w = QuantSpec.from_dict(info["weight_spec"])
        a = QuantSpec.from_dict(info["activation_spec"]) if info["activation_spec"] is not None else None
        if w.bits < 8 or (a is not None and a.bits < 8):
            w8 = self._int8_weight_spec(info["kind"], w) if w.bits < 8 else w
            a8 = a.replace(bits=8) if a is not None else None
            old_act = st.activation
            new = attach_quantization(pl_module, {name: (info["kind"], w8, a8)})[name]
            if old_act is not None and old_act.observer is not None and new.activation is not None:
                # ranges do not depend on the bit width: reuse the calibrated statistics
                new.activation.observer.load_state_dict(old_act.observer.state_dict())
                new.activation.update_qparams()
            if w8 == w:  # only the activation changed: the weight keeps its quantizer's state (scales, observer)
                new.weight.load_state_dict(st.weight.state_dict())
            else:
                new.weight.update_qparams(self._weight_of(pl_module, name))
                if new.weight._tracks_weight:  # frozen to the final weights, as _validate froze the others
                    new.weight.freeze()
            self._states[name] = new
            info["weight_spec"], info["activation_spec"] = w8.to_dict(), a8.to_dict() if a8 is not None else None
            label = "int8"
        else:
            st.enabled = False
            info["enabled"] = False
            label = "fp32"
        self._fallbacks[name] = label
        self._fallback_kl.setdefault(name, []).append(self._kl[name])
        self._apply_phase_flags()
        return label

    def _validate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._drop_uncalled(trainer, pl_module)  # (a no-op unless fit stopped within the first QAT epoch)
        if self.phase != "validate":  # (a run resumed from a checkpoint written during validation is in it)
            self._mark("validate", trainer)
        # final weights -> final weight scales: exactly what export will pack
        for name, st in self._states.items():
            if st.weight._tracks_weight and not bool(st.weight.frozen):
                st.weight.update_qparams(self._weight_of(pl_module, name))
                st.weight.check_finite()
                st.weight.freeze()
        if not self._observers_frozen:
            self._freeze_observers()
        self._apply_phase_flags()
        batches = self._validation_batches(trainer)
        self._measure(trainer, pl_module, batches)
        violators = self._violators()
        if self.on_kl_violation == "fallback":
            while violators:
                for name in violators:
                    label = self._fall_back(pl_module, name)
                    rank_zero_info(f"ProgressiveQuantization: {name} KL {self._kl[name]:.4g} > {self.kl_threshold}; falls back to {label}")
                self._apply_phase_flags()
                self._measure(trainer, pl_module, batches)
                violators = self._violators()
        elif violators:
            msg = (f"ProgressiveQuantization: {len(violators)} layer(s) over kl_threshold={self.kl_threshold}: "
                   + ", ".join(f"{n} (KL {self._kl[n]:.4g})" for n in violators))
            if self.on_kl_violation == "raise":
                raise KLViolationError(msg)
            rank_zero_warn(msg)
        self._mark("done", trainer)

    def _rank_mean(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", values: Dict[str, float]) -> Dict[str, float]:
        """``values`` averaged over the ranks that have them, so that decisions and the report agree
        on every rank; as given on one process. The names reduced are the same on every rank (the
        quantized layers, and ``""`` for the output KL): a layer only some ranks' batches called
        counts on those, and a rank without it still takes part in the collective."""
        if trainer.world_size <= 1:
            return values
        names = sorted({*self._states, ""})
        have = [n in values for n in names]
        t = torch.tensor([values[n] if h else 0.0 for n, h in zip(names, have)] + [float(h) for h in have],
                         dtype=torch.float64, device=pl_module.device)
        t = trainer.strategy.reduce(t, reduce_op="sum").tolist()
        k = len(names)
        return {n: t[i] / t[k + i] for i, n in enumerate(names) if t[k + i] > 0}

    def _violators(self) -> List[str]:
        return [n for n, st in self._states.items() if st.enabled and (self._kl.get(n) or 0.0) > self.kl_threshold]

    # ============================================================================= report ===
    @property
    def quant_states(self) -> Dict[str, QuantState]:
        """``{layer: QuantState}`` currently attached (empty before calibration)."""
        return dict(self._states)

    @property
    def report(self) -> Dict[str, Any]:
        """Phases (with epochs/steps), per-layer KL and SQNR, output KL, fallbacks, metrics before/after."""
        phases = []
        for i, h in enumerate(self._history):
            end = self._history[i + 1] if i + 1 < len(self._history) else None
            phases.append({
                "phase": h["phase"], "start_epoch": h["epoch"], "start_step": h["step"],
                "end_epoch": end["epoch"] if end else None, "end_step": end["step"] if end else None,
            })
        return {
            "phase": self.phase,
            "phases": phases,
            "layers": {n: {"kind": i["kind"], "weight": QuantSpec.from_dict(i["weight_spec"]).short(),
                           "activation": QuantSpec.from_dict(i["activation_spec"]).short() if i["activation_spec"] else None,
                           "enabled": i["enabled"]} for n, i in self._layers.items()},
            "skipped": dict(self._skipped),
            "kl": dict(self._kl),
            "sqnr_db": dict(self._sqnr),
            "output_kl": self._output_kl,
            "output_kind": self.output_kind,
            "kl_threshold": self.kl_threshold,
            "kl_history": copy.deepcopy(self._kl_history),
            "fallback_layers": sorted(self._fallbacks),
            "fallbacks": dict(self._fallbacks),
            "fallback_kl": copy.deepcopy(self._fallback_kl),
            "monitor": self.monitor,
            "metrics_before": dict(self._metrics_before),
            "metrics_after": dict(self._metrics_after),
        }
