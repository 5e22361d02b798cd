"""Observers: modules that watch tensors during calibration/QAT and turn what they saw into qparams.

An observer is called like an identity module (``y = obs(x)`` returns ``x`` itself) and records
statistics of ``x`` without touching autograd. :meth:`Observer.calculate_qparams` turns the
statistics into ``(scale [C] float32, zero_point [C])`` through
:func:`hwaware.quant.primitives.compute_qparams`, so every observer agrees with the reference
numerics on what a range means.

- :class:`MinMaxObserver`: running min/max per channel (``C`` from :func:`as_channels`).
- :class:`MovingAverageMinMaxObserver`: exponential moving average of per-batch min/max.
- :class:`HistogramObserver`: per-tensor histogram, clipping range by entropy (KL) calibration
  as TensorRT does, so a few outliers do not stretch the scale of the bulk.

Statistics live in registered buffers, so an observer's ``state_dict()`` loads into a *fresh*
observer of the same spec (buffers start empty because the channel count is only known from the
first batch; ``_load_from_state_dict`` resizes them). ``sync_()`` makes every data-parallel rank
hold the same statistics before qparams are computed.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from hwaware.quant.primitives import as_channels, channel_minmax, compute_qparams
from hwaware.quant.spec import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "HistogramObserver",
    "make_observer",
]


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


# ------------------------------------------------------------------------------------------------
# base
# ------------------------------------------------------------------------------------------------
class Observer(nn.Module):
    """Base observer: tracks per-channel ``min_val``/``max_val`` ``[C]`` (float32) and ``observed``.

    ``observed`` (int64 scalar buffer) counts the non-empty batches seen (summed over ranks by
    :meth:`sync_`). Subclasses implement :meth:`_update` (and may add buffers listed in
    ``_resizable_buffers``).

    Args:
        spec: the :class:`QuantSpec` whose granularity decides the channels and whose range
            decides the qparams.
        name: the layer / tensor name, used in every error message (``"top_mlp.0.weight"``).

    Raises:
        TypeError: ``spec`` is not a :class:`QuantSpec` or ``name`` is not a str.
    """

    _resizable_buffers: Tuple[str, ...] = ("min_val", "max_val")

    def __init__(self, spec: QuantSpec, name: str = ""):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"{type(self).__name__} expects a QuantSpec, got {type(spec).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"{type(self).__name__} name must be a str, got {type(name).__name__} {name!r}")
        self.spec = spec
        self.name = name
        # [C] float32; empty until the first batch tells us C
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("observed", torch.zeros((), dtype=torch.int64))
        self._synced_observed: Optional[Tensor] = None  # what every rank held alike at the last sync or load

    # -- public API ------------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        """True once statistics exist (observed a batch, or loaded from a state dict that had)."""
        return self.min_val.numel() > 0

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Record statistics of ``x`` (detached); return ``x`` unchanged (the same object)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{self._label()} expects a Tensor, got {type(x).__name__}")
        if x.numel() == 0:  # an empty batch carries no range information
            return x
        xd = x.detach()
        try:
            x2d = as_channels(xd, self.spec)  # [C, n]
        except ValueError as e:
            raise ValueError(f"{self._label()}: {e}") from None
        mn, mx = channel_minmax(x2d)  # [C], [C] float32
        # min/max propagate NaN and show +-inf, so this check costs no extra pass over x
        if not (bool(torch.isfinite(mn).all()) and bool(torch.isfinite(mx).all())):
            n_nan = int(torch.isnan(xd).sum())
            n_inf = int(torch.isinf(xd).sum())
            raise ValueError(
                f"{self._label()} saw NaN/inf values ({n_nan} NaN, {n_inf} inf in a tensor of shape "
                f"{tuple(x.shape)}); check the inputs and the loss scale of this layer"
            )
        if self.initialized and self.min_val.shape != mn.shape:
            raise ValueError(
                f"{self._label()} tracks {self.min_val.numel()} channels for granularity "
                f"{self.spec.granularity!r}, but a tensor of shape {tuple(x.shape)} has {mn.numel()}"
            )
        self._update(xd, mn, mx)
        self.observed += 1
        return x

    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """``(scale [C] float32, zero_point [C])`` from the statistics, via ``compute_qparams``.

        Raises:
            ValueError: nothing has been observed yet.
        """
        self._require_initialized()
        return compute_qparams(self.min_val, self.max_val, self.spec)

    def sync_(self) -> None:
        """All-reduce the statistics so every rank holds identical ones; a no-op without distributed.

        min via ``ReduceOp.MIN``, max via ``ReduceOp.MAX``, ``observed`` summed over what each rank
        counted since the previous sync. Ranks that saw nothing contribute the identity
        (``+inf``/``-inf``). A collective: call it on every rank; calling it again later adds only
        the batches observed in between.
        """
        if not _dist_ready():
            return
        c = self._sync_channels()
        if c == 0:
            return
        mn, mx = self._local_or_identity(c)
        dist.all_reduce(mn, op=dist.ReduceOp.MIN)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        self.min_val, self.max_val = mn, mx
        self._sync_observed()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, spec={self.spec.short()}, observed={int(self.observed)}"

    # -- for subclasses --------------------------------------------------------------------------
    def _update(self, x: Tensor, mn: Tensor, mx: Tensor) -> None:
        """Fold one batch in. ``x``: the detached input; ``mn``/``mx``: its per-channel [C] min/max."""
        raise NotImplementedError

    def _label(self) -> str:
        return f"observer {self.name!r}" if self.name else f"unnamed {type(self).__name__}"

    def _require_initialized(self) -> None:
        if not self.initialized:
            raise ValueError(
                f"{self._label()} has not observed any data; run calibration batches through it "
                f"(or load a state dict that has) before calculate_qparams()"
            )

    def _sync_channels(self) -> int:
        """Agree on the channel count across ranks (0 if no rank has stats); error if they differ."""
        c = self.min_val.numel()
        # [max C, max of -C'] where uninitialized ranks send C' = huge so they do not set the min
        t = torch.tensor([c, -(c if c > 0 else 2**62)], dtype=torch.int64, device=self.observed.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        c_max, c_min = int(t[0]), -int(t[1])
        if c_max > 0 and c_min != c_max:
            raise ValueError(
                f"{self._label()}: ranks disagree on the number of channels ({c_min} vs {c_max}); "
                f"every rank must observe tensors of the same layout"
            )
        return c_max

    def _local_or_identity(self, c: int) -> Tuple[Tensor, Tensor]:
        """This rank's [c] min/max (copies), or the all-reduce identities if it saw nothing."""
        dev = self.observed.device
        if self.initialized:
            return self.min_val.clone(), self.max_val.clone()
        return (
            torch.full((c,), math.inf, dtype=torch.float32, device=dev),
            torch.full((c,), -math.inf, dtype=torch.float32, device=dev),
        )

    def _sync_observed(self) -> None:
        # incremental: add what every rank counted since the previous sync (or load), so a second
        # sync (the callback syncs at QAT start and again when it freezes the observers) does not
        # count the first one's batches again
        base = torch.zeros_like(self.observed) if self._synced_observed is None else self._synced_observed
        delta = self.observed - base
        dist.all_reduce(delta, op=dist.ReduceOp.SUM)
        self.observed.copy_(base + delta)
        self._synced_observed = self.observed.clone()

    def _mark_synced(self) -> None:
        """What every rank holds alike (after a sync, or loaded from a checkpoint): later syncs add to it."""
        self._synced_observed = self.observed.clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Statistics buffers are sized by the first batch; a fresh observer has empty ones, so
        # take the checkpoint's shape before the default loader copies values in.
        for name in self._resizable_buffers:
            key = prefix + name
            src = state_dict.get(key)
            buf = self._buffers.get(name)
            if isinstance(src, Tensor) and buf is not None and src.shape != buf.shape and self._can_resize(name, src):
                self._buffers[name] = torch.empty(src.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._mark_synced()  # every rank loads the same checkpoint

    def _can_resize(self, name: str, src: Tensor) -> bool:
        return src.dim() == 1


# ------------------------------------------------------------------------------------------------
# min/max
# ------------------------------------------------------------------------------------------------
class MinMaxObserver(Observer):
    """Tracks the running per-channel min and max (``[C]``) of ``as_channels(x, spec)`` over all batches."""

    def _update(self, x: Tensor, mn: Tensor, mx: Tensor) -> None:
        if not self.initialized:
            self.min_val, self.max_val = mn, mx
        else:
            self.min_val = torch.minimum(self.min_val, mn)
            self.max_val = torch.maximum(self.max_val, mx)


class MovingAverageMinMaxObserver(Observer):
    """Tracks an exponential moving average of the per-batch, per-channel min and max (``[C]``).

    The first batch sets them; afterwards ``min = min + c * (batch_min - min)`` (same for max),
    ``c = spec.averaging_constant``.
    """

    def _update(self, x: Tensor, mn: Tensor, mx: Tensor) -> None:
        if not self.initialized:
            self.min_val, self.max_val = mn, mx
        else:
            c = float(self.spec.averaging_constant)
            self.min_val = self.min_val + c * (mn - self.min_val)
            self.max_val = self.max_val + c * (mx - self.max_val)


# ------------------------------------------------------------------------------------------------
# histogram + entropy calibration
# ------------------------------------------------------------------------------------------------
def _rebin(hist: Tensor, old_lo: float, old_hi: float, new_lo: float, new_hi: float) -> Tensor:
    """Redistribute ``hist`` [B] over ``[old_lo, old_hi]`` onto ``B`` bins over ``[new_lo, new_hi]``.

    Mass in each old bin is assumed uniform within it and split by overlap (piecewise-linear
    interpolation of the cumulative counts at the new edges), so the total is preserved.
    ``[new_lo, new_hi]`` must contain ``[old_lo, old_hi]``.
    """
    bins = hist.numel()
    if new_hi <= new_lo:
        return hist.clone()
    if old_hi <= old_lo:  # all old mass sits at the single point old_lo
        out = torch.zeros_like(hist)
        idx = min(int((old_lo - new_lo) / (new_hi - new_lo) * bins), bins - 1)
        out[max(idx, 0)] = hist.sum()
        return out
    edges = torch.linspace(new_lo, new_hi, bins + 1, dtype=torch.float64, device=hist.device)  # [B+1]
    pos = ((edges - old_lo) * (bins / (old_hi - old_lo))).clamp(0.0, float(bins))  # in old-bin units
    i0 = pos.floor().long().clamp(max=bins - 1)
    cdf = torch.cat([hist.new_zeros(1), hist.cumsum(0)])  # [B+1]
    at_edges = cdf[i0] + (pos - i0) * hist[i0]  # cumulative counts at the new edges
    return at_edges.diff().clamp_min(0.0)


def _xlogx(t: np.ndarray) -> np.ndarray:
    return np.where(t > 0, t * np.log(np.maximum(t, np.finfo(np.float64).tiny)), 0.0)


def _window_kl(hist: np.ndarray, a: np.ndarray, b: np.ndarray, num_levels: int) -> np.ndarray:
    """Entropy-calibration divergence of every candidate window ``[a_k, b_k)`` (in bins).

    hist: [B] float64 counts; a, b: [K] int64 with ``b - a >= num_levels``. Returns [K] float64.

    For each window (TensorRT's algorithm, generalised to two-sided windows): P is ``hist[a:b]``
    with the clipped mass ``hist[:a]`` added to its first bin and ``hist[b:]`` to its last; Q is
    ``hist[a:b]`` merged into ``num_levels`` levels (local bin ``j`` is in level
    ``j * num_levels // (b - a)``), each level's mass spread evenly over the bins where P is
    non-zero. P is normalised by the total count, and so is Q: Q lacks the clipped mass, which adds
    ``-log(kept fraction)`` to the divergence. (Normalising Q by its own mass, as TensorRT does,
    scores a window holding one populated bin plus everything clipped onto it as a perfect match:
    on uniform data in [1, 2] it picked the range [0, 1.0].) Zero bins are smoothed: they get
    ``eps`` and non-zero bins shrink by ``1 - eps * n_zero``. The score is ``KL(P || Q)``.

    Q is constant within a level, so the sum over bins collapses to sums over levels of prefix
    sums (counts, non-zero counts, ``h log h``): ``[K, num_levels]`` work instead of ``[K, B]``.
    numpy, not torch: these ops are ~0.5M elements, where torch goes multi-threaded, and on a small
    CPU shared with other jobs each such op took many times longer than it does single-threaded.
    """
    m = num_levels
    total = hist.sum()
    cnt = np.concatenate([[0.0], np.cumsum(hist)])  # [B+1] prefix counts
    nnz = np.concatenate([[0.0], np.cumsum(hist > 0)])  # [B+1] prefix non-zero bins
    hlh = np.concatenate([[0.0], np.cumsum(_xlogx(hist))])  # [B+1] prefix sum of h log h
    eps = min(1e-4, 0.5 / hist.size)

    w = b - a  # [K]
    edges = a[:, None] + (np.arange(m + 1)[None, :] * w[:, None] + (m - 1)) // m  # [K, m+1] level starts
    lvl_mass = np.diff(cnt[edges], axis=1)  # [K, m]  S_k: Q's mass per level
    lvl_nz = np.diff(nnz[edges], axis=1)  # [K, m]  N_k: non-zero bins of P per level
    lvl_plogp = np.diff(hlh[edges], axis=1)  # [K, m]  sum of p log p per level
    # the clipped mass lands on the edge bins of P (levels 0 and m-1)
    left, right = cnt[a], total - cnt[b]  # [K]
    h_first, h_last = hist[a], hist[b - 1]  # [K]
    p_mass = lvl_mass.copy()
    p_mass[:, 0] += left
    p_mass[:, -1] += right
    lvl_nz[:, 0] += (h_first == 0) & (left > 0)
    lvl_nz[:, -1] += (h_last == 0) & (right > 0)
    lvl_plogp[:, 0] += _xlogx(h_first + left) - _xlogx(h_first)
    lvl_plogp[:, -1] += _xlogx(h_last + right) - _xlogx(h_last)

    has_q = lvl_mass > 0  # P > 0 but Q == 0 only on an edge level whose mass was all clipped
    zeros_p = w - lvl_nz.sum(1)  # [K]
    zeros_q = zeros_p + np.where(has_q, 0.0, lvl_nz).sum(1)
    shrink_p, shrink_q = 1.0 - eps * zeros_p, 1.0 - eps * zeros_q  # [K]
    # sum over bins of p' log p' (p' = p / total * shrink_p) ...
    plogp = lvl_plogp - p_mass * (np.log(total) - np.log(shrink_p))[:, None]
    # ... minus sum of p' log q' (q' = S_k / N_k / total * shrink_q, or eps)
    q_level = np.where(has_q, lvl_mass, 1.0) / np.maximum(lvl_nz, 1.0)
    log_q = np.where(has_q, np.log(q_level) + (np.log(shrink_q) - np.log(total))[:, None], math.log(eps))
    per_level = np.where(p_mass > 0, plogp - p_mass * log_q, 0.0)
    return per_level.sum(1) * shrink_p / total


def _hull_slopes(cost: Sequence[float]) -> List[float]:
    """Per-step slopes of the lower convex hull of ``(j, cost[j])``; ``cost`` is non-decreasing.

    ``out[j]`` is the mass per bin of moving from ``j`` to ``j + 1`` along the hull: it looks past
    an isolated outlier bin to the empty stretch behind it, which a one-bin greedy cannot.
    """
    hull: List[int] = []
    for j in range(len(cost)):
        while len(hull) >= 2:
            o, a = hull[-2], hull[-1]
            if (a - o) * (cost[j] - cost[o]) - (cost[a] - cost[o]) * (j - o) > 0:
                break
            hull.pop()
        hull.append(j)
    out: List[float] = []
    for u, v in zip(hull[:-1], hull[1:]):
        out.extend([(cost[v] - cost[u]) / (v - u)] * (v - u))
    return out


def _greedy_windows(hist: Sequence[float], zero_pos: float, num_levels: int) -> Tuple[List[int], List[int]]:
    """Windows ``[a, b)`` from the full range down to ``num_levels`` bins, one bin at a time.

    Each step moves the end that clips less mass per bin (the slope of the lower convex hull of
    the mass clipped from that side, as a function of bins clipped; ties: the end farther from
    zero). No edge moves past ``zero_pos`` (zero's position in bins), so every window contains 0.
    """
    n = len(hist)
    cdf = [0.0]
    for h in hist:
        cdf.append(cdf[-1] + h)
    total = cdf[-1]
    left_steps = int(math.floor(zero_pos))  # a may reach floor(zero_pos)
    right_steps = int(math.floor(n - zero_pos))  # b may reach n - floor(n - zero_pos)
    slope_l = _hull_slopes(cdf[: left_steps + 1])  # clipped mass after k left steps: cdf[k]
    slope_r = _hull_slopes([total - cdf[n - k] for k in range(right_steps + 1)])
    a, b = 0, n
    los, his = [a], [b]
    while b - a > num_levels:
        sl = slope_l[a] if a < left_steps else math.inf
        sr = slope_r[n - b] if n - b < right_steps else math.inf
        if sl < sr or (sl == sr and zero_pos - a >= b - zero_pos):
            a += 1
        else:
            b -= 1
        los.append(a)
        his.append(b)
    return los, his


class HistogramObserver(Observer):
    """Tracks a per-tensor histogram (``histogram [bins]`` float64 counts) and the running min/max.

    Symmetric specs histogram ``|x|`` over ``[0, amax]``; affine specs histogram ``x`` over
    ``[min(min, 0), max(max, 0)]``. When a batch exceeds the range, the range grows to the new
    min/max and the old counts are redistributed proportionally onto the new bins.
    :meth:`calculate_qparams` picks the clipping range by entropy calibration (TensorRT): the
    candidate minimising ``KL(P || Q)`` between the clipped histogram and its ``num_quant_bins``-level
    quantization. Symmetric: thresholds ``T`` = every bin edge from ``num_quant_bins`` to ``bins``,
    range ``(-T, T)``. Affine: windows shrunk greedily one bin at a time from whichever end clips
    less mass per bin (looking past isolated outliers), always containing 0. The chosen range is
    kept in :attr:`last_range`.

    Resolution: no candidate is narrower than ``num_quant_bins`` bins, so once outliers sit more
    than ``bins / num_quant_bins`` times beyond the bulk (16 for symmetric int8 at 2048 bins, 8 for
    affine), the narrowest candidate tends to win; raise ``bins`` for such tensors.

    Args:
        spec: a per-tensor spec.
        name: layer name for error messages.
        bins: histogram resolution.
        num_quant_bins: quantization levels spanned by the range; default from the spec:
            ``qmax + 1`` for symmetric (levels ``0..qmax`` on the ``|x|`` axis, 128 for int8 as in
            TensorRT), ``qmax - qmin + 1`` for affine (256 for uint8).

    Raises:
        ValueError: a spec that is not per-tensor, or ``bins < num_quant_bins``.
    """

    _resizable_buffers = ("min_val", "max_val", "histogram")

    def __init__(self, spec: QuantSpec, name: str = "", bins: int = 2048, num_quant_bins: Optional[int] = None):
        super().__init__(spec, name)
        if spec.granularity != "per_tensor":
            raise ValueError(
                f"{self._label()}: HistogramObserver supports granularity='per_tensor' only, got {spec.granularity!r}"
            )
        if num_quant_bins is None:
            num_quant_bins = spec.qmax + 1 if spec.symmetric else spec.qmax - spec.qmin + 1
        if not isinstance(bins, int) or not isinstance(num_quant_bins, int) or num_quant_bins < 2 or bins < num_quant_bins:
            raise ValueError(
                f"{self._label()}: need int bins >= num_quant_bins >= 2, got bins={bins!r}, num_quant_bins={num_quant_bins!r}"
            )
        self.bins = bins
        self.num_quant_bins = num_quant_bins
        self.register_buffer("histogram", torch.empty(0, dtype=torch.float64))  # [bins] counts
        self.last_range: Optional[Tuple[float, float]] = None
        self._synced_hist: Optional[Tuple[Tensor, Tuple[float, float]]] = None  # (histogram, its range) at the last sync

    def _can_resize(self, name: str, src: Tensor) -> bool:
        if name == "histogram":  # a different bin count is a real mismatch: let the loader report it
            return src.dim() == 1 and src.numel() in (0, self.bins)
        return src.dim() == 1 and src.numel() <= 1

    def _range(self, mn: Tensor, mx: Tensor) -> Tuple[float, float]:
        """Histogram range [lo, hi] (python floats) for data min/max ``mn``/``mx`` ([1] each)."""
        lo, hi = float(mn[0]), float(mx[0])
        if self.spec.symmetric:
            return 0.0, max(abs(lo), abs(hi))
        return min(lo, 0.0), max(hi, 0.0)

    def _update(self, x: Tensor, mn: Tensor, mx: Tensor) -> None:
        if not self.initialized:
            new_min, new_max = mn, mx
            hist = torch.zeros(self.bins, dtype=torch.float64, device=x.device)
        else:
            new_min, new_max = torch.minimum(self.min_val, mn), torch.maximum(self.max_val, mx)
            hist = self.histogram
            old, new = self._range(self.min_val, self.max_val), self._range(new_min, new_max)
            if new != old:
                hist = _rebin(hist, old[0], old[1], new[0], new[1])
        lo, hi = self._range(new_min, new_max)
        v = x.reshape(-1).float()  # [n]
        if self.spec.symmetric:
            v = v.abs()
        scale = self.bins / (hi - lo) if hi > lo else 0.0
        idx = ((v - lo) * scale).floor_().long().clamp_(0, self.bins - 1)
        hist = hist + torch.bincount(idx, minlength=self.bins).to(hist.dtype)
        self.min_val, self.max_val, self.histogram = new_min, new_max, hist

    def sync_(self) -> None:
        """All-reduce min/max, re-bin every rank's histogram onto the common range, sum the histograms.

        Incremental: the histogram every rank held alike after the previous sync (or load) is
        counted once, and each rank adds only what it observed since, so the callback's second
        sync (when it freezes the observers) does not count the calibration batches twice.
        """
        if not _dist_ready():
            return
        if self._sync_channels() == 0:
            return
        mn, mx = self._local_or_identity(1)
        dist.all_reduce(mn, op=dist.ReduceOp.MIN)
        dist.all_reduce(mx, op=dist.ReduceOp.MAX)
        new = self._range(mn, mx)
        zeros = torch.zeros(self.bins, dtype=torch.float64, device=self.observed.device)

        def onto_new(hist: Tensor, rng: Tuple[float, float]) -> Tensor:
            return _rebin(hist, rng[0], rng[1], new[0], new[1]) if rng != new else hist.clone()

        hist = onto_new(self.histogram, self._range(self.min_val, self.max_val)) if self.initialized else zeros
        base = onto_new(*self._synced_hist) if self._synced_hist is not None else zeros
        delta = hist - base
        dist.all_reduce(delta, op=dist.ReduceOp.SUM)
        self.min_val, self.max_val, self.histogram = mn, mx, base + delta
        self._synced_hist = (self.histogram.clone(), new)
        self._sync_observed()

    def _mark_synced(self) -> None:
        super()._mark_synced()
        self._synced_hist = (self.histogram.clone(), self._range(self.min_val, self.max_val)) if self.initialized else None

    @torch.no_grad()
    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """Qparams of the KL-optimal clipping range (stored in :attr:`last_range`)."""
        self._require_initialized()
        lo, hi = self._range(self.min_val, self.max_val)
        if hi > lo:
            hist = self.histogram.detach().cpu().double().numpy()
            m, B = self.num_quant_bins, self.bins
            width = (hi - lo) / B
            if self.spec.symmetric:
                b = np.arange(m, B + 1)  # [K] thresholds, in bins
                a = np.zeros_like(b)
            else:
                los, his = _greedy_windows(hist.tolist(), (0.0 - lo) / width, m)
                a, b = np.asarray(los, dtype=np.int64), np.asarray(his, dtype=np.int64)
            kl = _window_kl(hist, a, b, m)  # [K]
            ties = np.flatnonzero(kl == kl.min())
            # ties go to the widest window (TensorRT keeps the last argmin over growing thresholds;
            # the affine windows shrink as k grows)
            best = int(ties.max()) if self.spec.symmetric else int(ties.min())
            ab, bb = int(a[best]), int(b[best])
            # edges at 0 / B are the observed range itself, without bin-width rounding
            lo_c = lo if ab == 0 else lo + ab * width
            hi_c = hi if bb == B else lo + bb * width
            if self.spec.symmetric:
                lo_c = -hi_c
        else:  # constant tensor: nothing to clip
            lo_c, hi_c = (-hi, hi) if self.spec.symmetric else (lo, hi)
        self.last_range = (lo_c, hi_c)
        dev = self.min_val.device
        return compute_qparams(
            torch.tensor([lo_c], dtype=torch.float32, device=dev),
            torch.tensor([hi_c], dtype=torch.float32, device=dev),
            self.spec,
        )


# ------------------------------------------------------------------------------------------------
# factory
# ------------------------------------------------------------------------------------------------
_OBSERVER_CLASSES = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
}


def make_observer(spec: QuantSpec, name: str = "") -> Observer:
    """The observer ``spec.observer`` names (``minmax`` | ``moving_average`` | ``histogram``).

    Raises:
        TypeError: ``spec`` is not a :class:`QuantSpec`.
        ValueError: ``spec.dynamic`` (a dynamic spec computes its scale per tensor and keeps no
            observer state).
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"make_observer expects a QuantSpec, got {type(spec).__name__}")
    if spec.dynamic:
        raise ValueError(
            f"make_observer({name!r}): spec {spec.short()} is dynamic; its scale is computed from each "
            f"tensor as it arrives and needs no observer"
        )
    return _OBSERVER_CLASSES[spec.observer](spec, name)
