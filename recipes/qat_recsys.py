"""Headline recipe: a DLRM-style CTR model goes FP32 -> channel-wise int8 QAT -> KL-validated.

    python recipes/qat_recsys.py                      # synthetic Criteo-schema clicks (48 s here, benchmarks/results/qat_recsys_cpu.json)
    python recipes/qat_recsys.py --fast               # smoke run, well under a minute
    python recipes/qat_recsys.py --data train.tsv     # real Criteo-format TSV (label, I1-I13, C1-C26)
    python recipes/qat_recsys.py --report out.json    # also write the JSON report
    python recipes/qat_recsys.py --sparsity 2:4       # prune the MLPs 2:4 (SR-STE), then int8 QAT

Prints a table (FP32 AUC, QAT AUC, drop, KL per layer, fallbacks). Both AUCs come from torchmetrics
on the same validation split: FP32 is the model as it was when QAT started (the weights the
callback keeps), QAT is the fake-quantized model after KL validation.
Uses only hwaware's public API.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.exceptions import SIGTERMException

import hwaware
from hwaware import ProgressiveQuantization, QuantSpec, SemiStructuredSparsity
from hwaware.quant import quantization_disabled
from hwaware.cli import artifact_file_problem, int_at_least, write_json
from hwaware.export import ArtifactError, is_artifact
from hwaware.export.artifact import artifact_size_bytes, check_target, nearest_existing_parent
from hwaware.export.bench import compare_throughput
from hwaware.recsys import DEFAULT_TABLE_SIZES, DLRM, NUM_SPARSE, CriteoDataModule, evaluate_auroc
from hwaware.sparsity import find_prunable


def _float_in(lo: float, *, lo_open: bool, hi: float = math.inf, hi_open: bool = True):
    """argparse type: a finite float in the given interval; the error names the value and the range."""
    rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; expected a finite number in {rng}") from None
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"{text} is invalid; expected a finite number in {rng}")
        return v
    parse.__name__ = f"number in {rng}"
    return parse




def _table_sizes(text: str) -> tuple:
    """``"100000"`` (every table) or 26 comma-separated positive ints -> the 26 table sizes."""
    parts = [q.strip() for q in text.split(",")]
    if not all(q.isdigit() and int(q) > 0 for q in parts) or len(parts) not in (1, NUM_SPARSE):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected one positive int (every table) or {NUM_SPARSE} "
                                         "comma-separated positive ints (C1..C26)")
    return tuple(int(q) for q in parts) * (NUM_SPARSE if len(parts) == 1 else 1)


def _widths(text: str) -> tuple:
    """``"512,256"`` -> (512, 256): comma-separated positive ints ("" for none)."""
    parts = [q.strip() for q in text.split(",")] if text.strip() else []
    if not all(q.isdigit() and int(q) > 0 for q in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; expected comma-separated positive ints, e.g. 512,256")
    return tuple(int(q) for q in parts)


_widths.__name__ = "layer widths"


def model_kwargs(args: argparse.Namespace, table_sizes) -> dict:
    """DLRM's arguments from the flags: the bottom MLP runs 13 -> --bottom-mlp -> --embedding-dim."""
    kwargs = {"table_sizes": table_sizes, "embedding_dim": args.embedding_dim,
              "bottom_mlp": (*args.bottom_mlp, args.embedding_dim), "top_mlp": args.top_mlp}
    if args.lr is not None:
        kwargs["lr"] = args.lr
    if args.sparsity != "none":
        kwargs["interaction_pad"] = 4
    return kwargs


def default_export_dir(args: argparse.Namespace) -> str:
    """out/qat_recsys-int<bits>, with -24 for a 2:4 run: a sparse run does not replace the dense artifact."""
    return os.path.join("out", f"qat_recsys-int{args.embedding_bits}" + ("-24" if args.sparsity == "2:4" else ""))


def export_dir_problem(path: str):
    """Why the export cannot write to ``path`` (hwaware.export's own check), else None."""
    try:
        check_target(path)
    except ArtifactError as e:
        prefix = f"{os.path.abspath(path)}: "
        return str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)
    return None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="Criteo-format TSV file (default: generated Criteo-schema data)")
    p.add_argument("--table-sizes", type=_table_sizes, default=DEFAULT_TABLE_SIZES, metavar="SIZES",
                   help="rows of the 26 tables, one int for all or 26 comma-separated; --data categories are hashed "
                        "into them (default: DLRM's Criteo-Kaggle sizes, 3 to 48000 rows)")
    p.add_argument("--cache-dir", default=None,
                   help="where --data's parsed rows are cached (default: the datasets library's cache)")
    p.add_argument("--num-samples", type=int_at_least(2), default=None,
                   help="synthetic samples (default 400000; --fast 24000); not with --data, which uses every row")
    p.add_argument("--start", choices=("plateau", "epoch"), default=None,
                   help="plateau: FP32 until val_auroc stops improving (default; --fast: epoch); "
                        "epoch: after --fp32-epochs")
    p.add_argument("--fp32-epochs", type=int_at_least(0), default=None,
                   help="FP32 epochs (--start epoch, default 3, --fast 1; 0: QAT from the start) or the FP32 cap "
                        "(--start plateau, default 8, --fast 4; at least 2)")
    p.add_argument("--qat-epochs", type=int_at_least(1), default=None, help="QAT fine-tuning epochs (default 1)")
    p.add_argument("--batch-size", type=int_at_least(1), default=1024)
    p.add_argument("--embedding-bits", type=int, default=8, choices=(8, 4), help="row-wise bits of the embedding tables")
    p.add_argument("--embedding-dim", type=int_at_least(1), default=16,
                   help="width of every table and of the bottom MLP output (default 16)")
    p.add_argument("--bottom-mlp", type=_widths, default=(64,), metavar="WIDTHS",
                   help="hidden widths of the bottom MLP before --embedding-dim (default 64)")
    p.add_argument("--top-mlp", type=_widths, default=(256, 128), metavar="WIDTHS",
                   help="hidden widths of the top MLP before its output (default 256,128; '' for none)")
    p.add_argument("--kl-threshold", type=_float_in(0, lo_open=True), default=0.01)
    p.add_argument("--qat-lr-scale", type=_float_in(0, lo_open=True, hi=1, hi_open=False), default=0.01,
                   help="QAT fine-tunes at this fraction of the FP32 learning rate")
    p.add_argument("--lr", type=_float_in(0, lo_open=True), default=None, help="Adam learning rate (default: the model's)")
    p.add_argument("--max-drop", type=_float_in(0, lo_open=False), default=0.001,
                   help="export gate: largest AUROC drop allowed")
    p.add_argument("--export-dir", default=None,
                   help="artifact directory (default out/qat_recsys-int<bits>, -24 appended with --sparsity 2:4)")
    p.add_argument("--infer-batch-size", type=int_at_least(1), default=2048,
                   help="batch for the exported-vs-FP32 throughput ratio")
    p.add_argument("--no-export", action="store_true", help="stop after QAT")
    p.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0)  # (Lightning's seed_everything range)
    p.add_argument("--fast", action="store_true", help="tiny run for smoke tests")
    p.add_argument("--report", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="hide Lightning's progress bar")
    p.add_argument("--sparsity", choices=("none", "2:4"), default="none",
                   help="2:4: after the FP32 epochs (default 2, --fast 1) prune every MLP layer 2:4, train sparse, then int8 QAT "
                        "(the top MLP input is zero-padded to a multiple of 4, 367 -> 368 by default, so that its K is one)")
    p.add_argument("--sparsity-method", choices=("sr_ste", "magnitude"), default=None,
                   help="with --sparsity 2:4 (default sr_ste)")
    p.add_argument("--sparsity-skip", default=None,
                   help="with --sparsity 2:4: comma-separated fnmatch patterns of MLP layers to keep dense (e.g. top_mlp.4)")
    p.add_argument("--sparse-epochs", type=int_at_least(1), default=None,
                   help="sparse training epochs before QAT (--sparsity 2:4; default 1)")
    p.add_argument("--sparse-lr-scale", type=_float_in(0, lo_open=True, hi=1, hi_open=False), default=None,
                   help="sparse training at this fraction of the FP32 learning rate (--sparsity 2:4; default 1.0; "
                        "QAT still runs at --qat-lr-scale of it)")
    args = p.parse_args(argv)

    sparse_only = {"--sparsity-method": args.sparsity_method, "--sparsity-skip": args.sparsity_skip,
                   "--sparse-epochs": args.sparse_epochs, "--sparse-lr-scale": args.sparse_lr_scale}
    given = [flag for flag, v in sparse_only.items() if v is not None]
    if args.sparsity == "none" and given:
        p.error(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --sparsity 2:4")
    args.sparsity_method = args.sparsity_method or "sr_ste"
    args.sparsity_skip = args.sparsity_skip or ""
    args.sparse_epochs = args.sparse_epochs if args.sparse_epochs is not None else 1
    args.sparse_lr_scale = args.sparse_lr_scale if args.sparse_lr_scale is not None else 1.0

    if args.data is not None and args.num_samples is not None:
        p.error(f"--num-samples {args.num_samples} only applies to the synthetic data; --data uses every row of its file")
    args.num_samples = args.num_samples if args.num_samples is not None else (24_000 if args.fast else 400_000)
    if args.sparsity != "none":
        # FP32 -> 2:4 -> QAT on a fixed schedule: prune after 2 FP32 epochs, while val_auroc still rises
        # (the dense model peaks after 3), so the sparse epoch trains on rather than re-fits a converged
        # model; benchmarks/bench_sparsity_recsys.py compares against the converged dense model
        if args.start == "plateau":
            p.error("--start plateau cannot be combined with --sparsity 2:4: the 2:4 schedule is fixed "
                    "(prune after --fp32-epochs, then --sparse-epochs, then QAT); use --fp32-epochs")
        args.start = "epoch"
        if args.fp32_epochs is None:
            args.fp32_epochs = 1 if args.fast else 2
    if args.start is None:  # --fast runs a fixed short schedule unless --start plateau is asked for
        args.start = "epoch" if args.fast else "plateau"
    if args.fp32_epochs is None:
        args.fp32_epochs = {("epoch", True): 1, ("epoch", False): 3, ("plateau", True): 4, ("plateau", False): 8}[
            (args.start, args.fast)]
    args.qat_epochs = args.qat_epochs if args.qat_epochs is not None else 1
    if args.start == "plateau" and args.fp32_epochs < 2:
        # plateau needs one validation to set the best val_auroc and one more that does not improve on it
        p.error(f"--fp32-epochs {args.fp32_epochs} is too small for --start plateau: it caps the FP32 epochs, and "
                "a plateau needs at least 2 (one to set the best val_auroc, one that does not improve on it); "
                "expected --fp32-epochs 2 or more, or --start epoch")

    if args.report is not None:
        if os.path.isdir(args.report):
            p.error(f"--report {args.report}: is a directory; expected a file path")
        parent = nearest_existing_parent(args.report)
        if not os.path.isdir(parent):
            p.error(f"--report {args.report}: {parent} is not a directory")
        inside = artifact_file_problem(args.report)
        if inside:
            p.error(f"--report {args.report}: {inside}")
    if not args.no_export:
        args.export_dir = args.export_dir or default_export_dir(args)
        problem = export_dir_problem(args.export_dir)
        if problem:
            p.error(f"--export-dir {args.export_dir}: {problem}")
        if args.report is not None:
            report_dir, export_dir = os.path.dirname(os.path.abspath(args.report)), os.path.abspath(args.export_dir)
            if os.path.commonpath([report_dir, export_dir]) == export_dir:
                # (written after the export, it would replace or join the artifact's own files)
                p.error(f"--report {args.report}: is inside --export-dir {args.export_dir}, where the artifact is written; "
                        "an artifact holds only its own files: write the report elsewhere")
    return args


def build_sparsity(args: argparse.Namespace):
    if args.sparsity == "none":
        return None
    skip = [p for p in args.sparsity_skip.split(",") if p]
    return SemiStructuredSparsity(method=args.sparsity_method, start_epoch=args.fp32_epochs, monitor="val_auroc",
                                  lr_scale=args.sparse_lr_scale, skip=skip)


class DenseSnapshot(pl.Callback):
    """The dense FP32 weights at the start of ``epoch`` (before pruning): the reference for the 2:4 drop."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.state = epoch, None

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch and self.state is None:
            self.state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}


def calibration_batches(args: argparse.Namespace) -> int:
    return 8 if args.fast else 32


def max_epochs(args: argparse.Namespace) -> int:
    return args.fp32_epochs + (args.sparse_epochs if args.sparsity != "none" else 0) + args.qat_epochs


def earliest_calibration_epoch(qat: ProgressiveQuantization) -> int:
    """The first epoch calibration can begin: ``start_epoch``; under ``start="plateau"`` also not before
    ``patience + 1`` validations (one sets the best val_auroc, ``patience`` more do not improve on it)."""
    return qat.start_epoch if qat.start == "epoch" else max(qat.start_epoch, qat.patience + 1)


def check_qat_schedule(args: argparse.Namespace, qat: ProgressiveQuantization, dm: CriteoDataModule) -> None:
    """Refuse, before any training, a schedule under which QAT cannot run on this data.

    Calibration begins at an epoch (``--start epoch``: after the FP32 and any sparse epochs;
    ``--start plateau``: once val_auroc stops improving, epoch 2 at the earliest), takes
    ``qat.calibration_batches`` training batches, and QAT trains on what is left of the
    ``--fp32-epochs`` + ``--qat-epochs`` epochs; a small data file or a large ``--batch-size`` gives
    too few batches per epoch for that. Under ``--start plateau`` the check assumes the earliest
    plateau, so it refuses only schedules that cannot fit at all; run() still checks after fit that
    QAT started (a later plateau leaves fewer batches).

    Raises:
        ValueError: naming the rows, the batches per epoch, what the schedule needs and the flags
            that would make it fit.
    """
    per_epoch = len(dm.train_dataloader())  # the sampler's batches, the last one possibly short
    first = earliest_calibration_epoch(qat)
    epochs = max_epochs(args) - first
    available = epochs * per_epoch
    calib = qat.calibration_batches
    need = calib + 1  # calibration, then at least one QAT training batch
    if available >= need:
        return
    train_rows, rows = len(dm.train_set), len(dm.train_set) + len(dm.val_set)
    source = f"--data {args.data}" if args.data is not None else f"--num-samples {args.num_samples}"
    if qat.start == "epoch":
        before = f"{args.fp32_epochs} FP32 epoch(s)" + (
            f" and {args.sparse_epochs} sparse epoch(s)" if args.sparsity != "none" else "")
        budget = f"after {before}, --qat-epochs {args.qat_epochs} leaves"
    else:
        budget = (f"under --start plateau calibration begins at epoch {first} at the earliest (one validation "
                  f"sets the best val_auroc, one more that does not improve on it reaches the plateau), so "
                  f"--fp32-epochs {args.fp32_epochs} + --qat-epochs {args.qat_epochs} = {max_epochs(args)} epochs "
                  f"leave at most")
    fixes = [f"--qat-epochs {args.qat_epochs + -(-need // per_epoch) - epochs} or more"]
    k = -(-need // epochs)  # batches per epoch the schedule needs at the current --qat-epochs (k >= 2 here)
    if k <= train_rows:
        fixes.append(f"--batch-size {-(-train_rows // (k - 1)) - 1} or less")
    need_train = (k - 1) * args.batch_size + 1  # training rows that give k batches at --batch-size
    n = math.ceil(need_train / (1 - dm.val_fraction))
    while n - int(round(n * dm.val_fraction)) < need_train:
        n += 1
    fixes.append(f"a --data file of {n} rows or more" if args.data is not None else f"--num-samples {n} or more")
    raise ValueError(
        f"QAT cannot start with this data and these flags: {source} gives {rows} rows, {train_rows} of them "
        f"for training, which at --batch-size {args.batch_size} is {per_epoch} batch(es) per epoch; {budget} "
        f"{epochs} x {per_epoch} = {available} batch(es), "
        f"but the schedule needs {need}: {calib} to calibrate ({'--fast' if args.fast else 'without --fast'}) "
        f"and at least 1 to train with QAT. Expected {', or '.join(fixes)}"
        + (" (enough only if val_auroc stops improving at once: a later plateau needs more)"
           if qat.start == "plateau" else "")
    )


def qat_never_started(args: argparse.Namespace, qat: ProgressiveQuantization, per_epoch: int, global_step: int) -> str:
    """Why fit ended before QAT: the backstop for ``--start plateau``, whose FP32 length is known only
    in training. ``global_step`` is the trainer's at the end (calibration batches count as steps)."""
    budget = f"{max_epochs(args)} epochs (--fp32-epochs {args.fp32_epochs} + --qat-epochs {args.qat_epochs})"
    if qat.phase == "calibrate":
        calib = next(p for p in qat.report["phases"] if p["phase"] == "calibrate")
        seen = global_step - calib["start_step"]
        left = qat.calibration_batches - seen + 1  # the rest of calibration, then one QAT batch
        return (
            f"QAT never started: the run ended in phase 'calibrate'. val_auroc stopped improving after epoch "
            f"{calib['start_epoch'] - 1} and calibration began at epoch {calib['start_epoch']}, but the {budget} "
            f"ran out after {seen} of its {qat.calibration_batches} calibration batches "
            f"({'--fast' if args.fast else 'without --fast'}; {per_epoch} training batch(es) per epoch at "
            f"--batch-size {args.batch_size}); it needed {left} more: {left - 1} to finish calibrating and 1 to "
            f"train with QAT. Expected --qat-epochs "
            f"{args.qat_epochs + -(-left // per_epoch)} or more, or a smaller --batch-size, or more rows"
        )
    return (
        f"QAT never started: the run ended in phase {qat.phase!r}: val_auroc did not stop improving before the "
        f"last of the {budget}, so calibration never began (--fp32-epochs caps the FP32 epochs under --start "
        f"plateau). Expected a larger --fp32-epochs, or --start epoch"
    )


def build_callback(args: argparse.Namespace) -> ProgressiveQuantization:
    table_spec = QuantSpec(
        bits=args.embedding_bits, granularity="per_row", symmetric=False, dynamic=True,
        # FBGEMM stores int4 rows with fp16 scale/offset; QAT sees exactly that
        scale_dtype="float16" if args.embedding_bits == 4 else "float32",
    )
    common = dict(
        monitor="val_auroc", mode="max", calibration_batches=calibration_batches(args),
        freeze_observers_after=50 if args.fast else 200, embedding_spec=table_spec,
        kl_threshold=args.kl_threshold, validation_batches=8,
        # relative to the rate when QAT starts: after sparse fine-tuning that is already scaled
        lr_scale=args.qat_lr_scale / (args.sparse_lr_scale if args.sparsity != "none" else 1.0),
    )
    if args.start == "plateau":
        return ProgressiveQuantization(start_epoch=1, start="plateau", patience=1, min_delta=2e-4, **common)
    sparse_epochs = args.sparse_epochs if args.sparsity != "none" else 0
    return ProgressiveQuantization(start_epoch=args.fp32_epochs + sparse_epochs, **common)


class StopAfterQAT(pl.Callback):
    """Ends fit ``qat_epochs`` epochs after QAT started (the FP32 phase length is not known ahead)."""

    def __init__(self, qat: ProgressiveQuantization, qat_epochs: int) -> None:
        self.qat, self.qat_epochs = qat, qat_epochs

    def on_train_epoch_end(self, trainer, pl_module):
        starts = [p["start_epoch"] for p in self.qat.report["phases"] if p["phase"] == "qat"]
        if starts and trainer.current_epoch + 1 >= starts[0] + self.qat_epochs:
            trainer.should_stop = True


class FP32Trajectory(pl.Callback):
    """val_auroc after every epoch, so the report shows whether FP32 had converged; the phase is QAT's,
    or ``sparse`` for the 2:4 epochs before QAT (QAT's phase is still ``fp32`` then)."""

    def __init__(self, qat: ProgressiveQuantization, sparsity=None) -> None:
        self.qat, self.sparsity, self.rows = qat, sparsity, []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking and "val_auroc" in trainer.callback_metrics:
            phase = self.qat.phase
            if phase == "fp32" and self.sparsity is not None and self.sparsity.phase != "dense":
                phase = "sparse"
            self.rows.append({"epoch": trainer.current_epoch, "phase": phase,
                              "val_auroc": float(trainer.callback_metrics["val_auroc"])})


def qat_label(embedding_bits: int) -> str:
    """The table's name for the QAT row: the MLPs are int8; the tables are --embedding-bits."""
    return "QAT (int8, validated)" if embedding_bits == 8 else f"QAT (int8, int{embedding_bits} tables)"


def throughput_warning(export: dict) -> str:
    """The warning line for an export whose throughput rounds disagree (a busy machine), else ``""``."""
    if not export.get("throughput_unstable"):
        return ""
    return (f"warning: throughput timings unstable: the exported/FP32 ratio ran x{export['throughput_ratio_min']:.2f}"
            f"..x{export['throughput_ratio_max']:.2f} over {export['throughput_rounds']} rounds, more than "
            f"{export['throughput_unstable_spread']:.0%} apart; the machine may be busy: rerun on an idle machine "
            "before quoting the ratio")


def print_table(report: dict) -> None:
    print()
    print(f"{'':24s}{'AUROC':>10s}")
    sp = report.get("sparsity")
    if sp:
        print(f"{'FP32 dense, at pruning':24s}{sp['dense_fp32_auroc']:>10.5f}")
    print(f"{'FP32 (at QAT start)':24s}{report['fp32']['auroc']:>10.5f}")
    print(f"{qat_label(report['config']['embedding_bits']):24s}{report['qat']['auroc']:>10.5f}")
    print(f"{'drop':24s}{report['auroc_drop']:>10.5f}")
    if sp:
        print(f"{'2:4 + int8 drop vs dense':24s}{sp['auroc_drop']:>10.5f}   ({sp['method']}; 2:4 layers: "
              f"{', '.join(f'{n} {f:.0%}' for n, f in sp['layers'].items())}; dense: {', '.join(sp['skipped']) or 'none'})")
    print(f"{'QAT weights, quant off':24s}{report['qat_weights_fp32_auroc']:>10.5f}   (quantization itself costs {report['quantization_cost']:.5f})")
    print()
    print(f"{'layer':20s}{'scheme':28s}{'KL':>10s}{'SQNR dB':>10s}  fallback")
    for name, kl in report["kl"].items():
        layer = report["layers"].get(name, {})
        scheme = layer.get("weight", "") + (f" x {layer['activation']}" if layer.get("activation") else "")
        sqnr = report["sqnr_db"].get(name, math.inf)
        kl_s, sqnr_s = ("n/a", "n/a") if kl is None else (f"{kl:.2e}", f"{sqnr:.1f}")  # None: no KL batch reached it
        print(f"{name:20s}{scheme:28s}{kl_s:>10s}{sqnr_s:>10s}  {report['fallbacks'].get(name, '')}")
    print(f"output KL (Bernoulli, mean per sample): {report['output_kl']:.3e}; fallback layers: {report['fallback_layers'] or 'none'}")
    print("val_auroc by epoch: " + ", ".join(f"{r['epoch']}:{r['val_auroc']:.4f}({r['phase']})" for r in report["val_auroc_by_epoch"]))
    e = report.get("export")
    if e:
        gate = e.get("gate") or {}
        refs = gate.get("references") or {}  # (2:4 pruning before QAT: the gate measured both, took the better)
        gated = ("" if gate.get("drop") is None or abs(gate["drop"] - e["auroc_drop"]) < 1e-12 else
                 f"; the gate's drop {gate['drop']:.5f} is against its reference {gate['reference']:.5f}"
                 + (f" ({max(refs, key=refs.get)}, the better of " + ", ".join(f"{k} {v:.5f}" for k, v in refs.items())
                    + ")" if refs else ""))
        print(f"export: {e['path']}  AUROC through the deploy ops {e['auroc']:.5f} (drop {e['auroc_drop']:.5f} against "
              f"the FP32 model at QAT start{gated}); "
              f"{e['size_bytes']:,} bytes = {e['size_fraction']:.1%} of FP32 ({e['artifact_bytes_on_disk']:,} on disk with "
              "program.pt2); "
              f"throughput {e['throughput_ratio']:.2f}x FP32 at batch {e['batch_size']}"
              + (" (UNSTABLE: see the warning)" if e.get("throughput_unstable") else ""))
    print("phases: " + ", ".join(f"{p['phase']}@epoch{p['start_epoch']}/step{p['start_step']}" for p in report["phases"]))


def export_and_bench(args, model, fp32, dm, fp32_auroc, state: dict) -> dict:
    """Pack, gate (AUROC through the deploy ops), reload from disk, and time exported vs FP32."""
    path = args.export_dir
    infer = CriteoDataModule(data=args.data, num_samples=args.num_samples, batch_size=args.infer_batch_size, seed=args.seed,
                             table_sizes=args.table_sizes, cache_dir=args.cache_dir)
    infer.setup("fit")
    batches = [(b["dense"], b["sparse"]) for _, b in zip(range(4 if args.fast else 8), infer.val_dataloader())]
    # a validation split smaller than --infer-batch-size gives smaller batches: time and report those
    rows = batches[0][0].shape[0]
    batches = [b for b in batches if b[0].shape[0] == rows]
    if rows != args.infer_batch_size:
        print(f"note: the validation split gives batches of {rows} rows, fewer than --infer-batch-size "
              f"{args.infer_batch_size}: the throughput ratio is measured at {rows}")
    # example_inputs at the serving batch: the export times each layer's kernels at these rows
    if is_artifact(path):
        print(f"replacing the artifact at {path}")
    art = hwaware.export(model, path, val_dataloader=dm.val_dataloader(), metric="auroc", max_drop=args.max_drop,
                         example_inputs=batches[0])  # also writes program.pt2
    state["written"] = True
    served = hwaware.load(path)  # what a deployment runs: verified, rebuilt from the artifact
    auroc = evaluate_auroc(served, dm.val_dataloader())
    timing = compare_throughput({"fp32": fp32, "exported": served}, batches, batch_size=rows,
                                rounds=2 if args.fast else 5)
    exported = timing["models"]["exported"]
    stability = {
        "throughput_unstable": "exported" in timing["unstable"], "throughput_rounds": timing["rounds"],
        "throughput_round_ratios": exported["round_ratios"], "throughput_ratio_min": exported["ratio_min"],
        "throughput_ratio_max": exported["ratio_max"], "throughput_ratio_spread": exported["ratio_spread"],
        "throughput_unstable_spread": timing["unstable_spread"],
    }
    warning = throughput_warning(stability)
    if warning:
        print(warning, file=sys.stderr)
    tiny = torch.finfo(torch.float32).tiny
    subnormal = sum(int(((p != 0) & (p.abs() < tiny)).sum()) for p in fp32.parameters())
    if subnormal:  # Adam + L2 weight decay drives rare ids' rows toward 0: FP32 eager pays for subnormal math
        print(f"note: the FP32 model holds {subnormal:,} subnormal weights, which make FP32 eager slower on x86 than it "
              "is with flush-to-zero (torch.set_flush_denormal(True) before any op): the throughput ratio is against FP32 "
              "as trained; benchmarks/bench_export_recsys.py times both")
    return {
        "path": path, "auroc": auroc, "auroc_drop": fp32_auroc - auroc,
        "size_bytes": art.size_bytes, "fp32_size_bytes": art.manifest["fp32_bytes"],
        "size_fraction": art.size_bytes / art.manifest["fp32_bytes"],
        # size_bytes: the model (weights and manifest); on disk the artifact also holds program.pt2,
        # a torch.export program with its own copy of the weights
        "artifact_bytes_on_disk": artifact_size_bytes(path),
        "throughput_ratio": exported["ratio"], "batch_size": rows, **stability,
        "fp32_subnormal_weights": subnormal,
        "latency_ms_p50": {k: v["latency_ms_p50"] for k, v in timing["models"].items()},
        "gate": art.report, "dense_layers": art.manifest["dense_layers"],
    }


def _strict_json(obj):
    """Infinite SQNR (a layer left in FP32) becomes null: the report stays strict JSON."""
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _fail(message: str, status: int = 1):
    """One line on stderr, no traceback."""
    print(f"qat_recsys.py: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(status)


def check_sparsity_skip(args: argparse.Namespace, model: torch.nn.Module) -> None:
    """Every --sparsity-skip pattern must name a layer (a typo would prune it): refused before training."""
    try:
        find_prunable(model, [q for q in args.sparsity_skip.split(",") if q])
    except ValueError as e:
        _fail(f"--sparsity-skip: {e}", 2)


class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised where the signal arrives. Not a KeyboardInterrupt: Lightning's fit
    catches that and calls sys.exit(1), and turns SIGTERM into a SystemExit without a code (exit
    status 0); an exception of its own passes through fit (after its on_exception hooks) to main()."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals():
    """SIGINT and SIGTERM raise :class:`Interrupted` inside the block. A handler already set, or an
    ignored signal (nohup, a background job's SIGINT), is left alone; the old handlers come back after."""
    installed = {}
    if threading.current_thread() is threading.main_thread():  # signal.signal works only there
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) is default:
                installed[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, old in installed.items():
            signal.signal(sig, old)


def main(argv=None) -> dict:
    args = parse_args(argv)
    state = {"written": False}
    existed = not args.no_export and is_artifact(args.export_dir)
    try:
        with stop_signals():
            return run(args, state)[0]
    except (KeyboardInterrupt, Interrupted, SIGTERMException) as e:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal does not interrupt the message
            if threading.current_thread() is threading.main_thread():
                signal.signal(sig, signal.SIG_IGN)
        # SIGTERMException: Lightning's own SIGTERM handling, where a handler set before ours kept SIGTERM
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGTERM if isinstance(e, SIGTERMException) else None
        if args.no_export:
            what = "no artifact was written (--no-export)"
        elif state["written"]:
            what = f"the artifact at {args.export_dir} was written"
        elif existed:
            what = f"no artifact was written; the previous artifact at {args.export_dir} is intact"
        else:
            what = "no artifact was written"
        print(f"\ninterrupted{f' by {signal.Signals(signum).name}' if signum else ''}; {what}", file=sys.stderr)
        raise SystemExit(128 + (signum or signal.SIGINT))  # the shell's status for a signal: 130, 143


def run(args: argparse.Namespace, state: dict = None):
    """The recipe; returns ``(report, {"fp32": model, "qat": model, "datamodule": dm})`` for benchmarks."""
    pl.seed_everything(args.seed, verbose=False)
    t0 = time.perf_counter()
    try:
        dm = CriteoDataModule(data=args.data, num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                              table_sizes=args.table_sizes, cache_dir=args.cache_dir)
        dm.setup("fit")
    except (OSError, ValueError) as e:  # names the file (and line) already; a directory, too
        source = "--data" if args.data is not None else f"--num-samples {args.num_samples}"
        raise SystemExit(f"qat_recsys.py: error: {source}: {e}") from None
    kwargs = model_kwargs(args, dm.table_sizes)
    sparsity = build_sparsity(args)
    model = DLRM(**kwargs)
    if sparsity is not None:
        check_sparsity_skip(args, model)
    cb = build_callback(args)
    try:  # before any training: a fixed schedule that cannot reach QAT on this data is refused now
        check_qat_schedule(args, cb, dm)
    except ValueError as e:
        raise SystemExit(f"qat_recsys.py: error: {e}") from None
    trajectory = FP32Trajectory(cb, sparsity)
    callbacks = [cb, StopAfterQAT(cb, args.qat_epochs), trajectory]
    if sparsity is not None:
        snapshot = DenseSnapshot(args.fp32_epochs)
        callbacks += [sparsity, snapshot]
    trainer = pl.Trainer(
        max_epochs=max_epochs(args),
        accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=not args.no_progress, num_sanity_val_steps=0,
    )
    try:
        trainer.fit(model, datamodule=dm)
    except SIGTERMException:  # SIGTERM under a handler set before main()'s: main() says so
        raise
    except SystemExit:  # Lightning's own Ctrl-C handling (outside main()'s stop_signals) is sys.exit(1)
        if trainer.interrupted:
            raise KeyboardInterrupt from None
        raise
    if cb.fp32_reference is None:  # the backstop: when --start plateau reaches QAT is only known in training
        _fail(qat_never_started(args, cb, len(dm.train_dataloader()), trainer.global_step))

    fp32 = DLRM(**kwargs)
    fp32.load_state_dict(cb.fp32_reference)
    val = dm.val_dataloader()
    fp32_auroc = evaluate_auroc(fp32, val)
    qat_auroc = evaluate_auroc(model, val)
    # the same trained weights with fake quantization switched off: separates what quantization
    # costs from what the extra fine-tuning epochs did to the FP32 model
    with quantization_disabled(model):
        qat_weights_fp32_auroc = evaluate_auroc(model, val)
    r = cb.report
    sparsity_report = None
    if sparsity is not None:
        dense = DLRM(**kwargs)
        dense.load_state_dict(snapshot.state)
        dense_auroc = evaluate_auroc(dense, val)
        sr = sparsity.report
        sparsity_report = {
            "method": sr["method"], "layers": {n: v["sparsity"] for n, v in sr["layers"].items()},
            "verified_24": all(v["verified_24"] for v in sr["layers"].values()), "skipped": sr["skipped"],
            "dense_fp32_auroc": dense_auroc, "sparse_fp32_auroc": fp32_auroc,
            "auroc": qat_auroc, "auroc_drop": dense_auroc - qat_auroc,
        }
    state = state if state is not None else {"written": False}
    try:
        export_report = None if args.no_export else export_and_bench(args, model, fp32, dm, fp32_auroc, state)
    except hwaware.RegressionError as e:  # the gate refused: nothing was written
        kept = f"; the previous artifact at {args.export_dir} is intact" if is_artifact(args.export_dir) else ""
        msg = str(e)
        _fail(f"{msg if msg.startswith('export refused') else 'export refused: ' + msg}{kept}")  # (not twice)
    report = {
        "fp32": {"auroc": fp32_auroc},
        "qat": {"auroc": qat_auroc},
        "auroc_drop": fp32_auroc - qat_auroc,
        "qat_weights_fp32_auroc": qat_weights_fp32_auroc,
        "quantization_cost": qat_weights_fp32_auroc - qat_auroc,
        "kl": r["kl"],
        "sqnr_db": r["sqnr_db"],
        "output_kl": r["output_kl"],
        "fallback_layers": r["fallback_layers"],
        "fallbacks": r["fallbacks"],
        "layers": r["layers"],
        "phases": r["phases"],
        "metrics_before": r["metrics_before"],
        "metrics_after": r["metrics_after"],
        "val_auroc_by_epoch": trajectory.rows,
        "export": export_report,
        "sparsity": sparsity_report,
        "config": {
            "data": args.data or "synthetic", "num_samples": None if args.data is not None else args.num_samples,
            "rows": len(dm.train_set) + len(dm.val_set), "table_sizes": list(args.table_sizes), "fp32_epochs": args.fp32_epochs,
            "qat_epochs": args.qat_epochs, "batch_size": args.batch_size, "embedding_bits": args.embedding_bits,
            "embedding_dim": args.embedding_dim, "bottom_mlp": list(args.bottom_mlp), "top_mlp": list(args.top_mlp),
            "start": args.start, "qat_lr_scale": args.qat_lr_scale, "seed": args.seed, "fast": args.fast, "torch": torch.__version__,
            "sparsity": args.sparsity, "sparsity_method": args.sparsity_method, "sparse_epochs": args.sparse_epochs,
            "sparse_lr_scale": args.sparse_lr_scale, "sparsity_skip": args.sparsity_skip,
        },
        "seconds": time.perf_counter() - t0,
    }
    print_table(report)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        write_json(args.report, _strict_json(report))  # atomic: an interrupt leaves the previous report whole
        print(f"report written to {args.report}")
    return report, {"fp32": fp32, "qat": model, "datamodule": dm}


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
