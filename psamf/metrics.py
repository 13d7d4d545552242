"""Evaluation metrics: the contract of `docs/data-formats.md` (metrics), plus seed summaries and trivial floors.

Public functions
----------------
* `regression_metrics(pred, label)` – MOSI / MOSEI (§7.1, MMSA `metricsTop.__eval_mosei_regression`):
  keys `mae, corr, acc7, acc5, acc2_has0, f1_has0, acc2_non0, f1_non0, n, n_non0`.
* `sims_metrics(pred, label)` – CH-SIMS / SIMS v2 (§7.2, MMSA `__eval_sims_regression`):
  keys `acc2, acc3, acc5, f1, mae, corr, n`.
* `compute_metrics(pred, label, dataset)` – dispatch on the dataset name.
* `summarize_seeds(list_of_metric_dicts)` – `{key: (mean, std)}`, **population** std (ddof=0) as MMSA.
* `format_table(...)` – a readable mean ± std table (accuracies/F1 in % by default; MAE and Corr raw).
* `trivial_baselines(label)` – majority-class accuracies and constant-prediction MAEs (§8 floors).
* `confusion_7class(pred, label, label_range)` – 7×7 counts of the Acc-7 classes (rows label, columns prediction).
* `sentiment_class7(pred, dataset)` / `polarity(pred, dataset)` – per-sample labels of a score, by the same
  conventions as the metrics (`psamf predict` writes them next to each score).

All values are plain Python numbers in [0, 1] for accuracies and F1 (no ×100, no rounding: MMSA rounds to
4 decimals, we leave that to `format_table`).

Numerics. Inputs (numpy arrays, torch tensors of any dtype/device, lists) are flattened and cast to float32 first,
as MMSA's loader and `.numpy()` do, then widened to float64 (exact) for the arithmetic. Every threshold a value is
compared with is also a float32 number, so a label stored as float32(0.1) falls exactly on the SIMS Acc-3 edge
0.1 (neutral), as it does in MMSA's float32 code, instead of just above a float64 0.1 (positive).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from psamf.datasets import names_in_family

__all__ = [
    "REGRESSION_KEYS",
    "SIMS_KEYS",
    "regression_metrics",
    "sims_metrics",
    "compute_metrics",
    "summarize_seeds",
    "format_table",
    "trivial_baselines",
    "CLASSES_7",
    "confusion_7class",
    "sentiment_class7",
    "polarity",
    "POLARITIES",
]

REGRESSION_KEYS = ("mae", "corr", "acc7", "acc5", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0")
SIMS_KEYS = ("acc2", "acc3", "acc5", "f1", "mae", "corr")

# SIMS bin edges (§7.2): lower-exclusive, upper-inclusive. Stored as float32 values (see module docstring).
_SIMS_EDGES_2 = np.asarray([-1.01, 0.0, 1.01], dtype=np.float32).astype(np.float64)
_SIMS_EDGES_3 = np.asarray([-1.01, -0.1, 0.1, 1.01], dtype=np.float32).astype(np.float64)
_SIMS_EDGES_5 = np.asarray([-1.01, -0.7, -0.1, 0.1, 0.7, 1.01], dtype=np.float32).astype(np.float64)

POLARITIES = ("negative", "neutral", "positive")

_REGRESSION_DATASETS = names_in_family("regression")  # psamf.datasets: mosi, mosei, custom
_SIMS_DATASETS = names_in_family("sims")  # sims, simsv2


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _as_float_array(x: Any, name: str) -> np.ndarray:
    """Flatten `x` to a 1-D float64 array holding float32 values. Accepts numpy, torch, lists, scalars."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch (bf16 has no .numpy())
        import torch

        x = x.detach().to(device="cpu", dtype=torch.float32).numpy()
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is reported by _prepare
            a = np.asarray(x, dtype=np.float32).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: cannot be read as numbers ({e})") from None
    return a.astype(np.float64)


def _prepare(pred: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_float_array(pred, "pred")
    t = _as_float_array(label, "label")
    if p.size != t.size:
        raise ValueError(f"pred has {p.size} values but label has {t.size} (after flattening); they must match")
    if p.size == 0:
        raise ValueError("pred and label are empty: metrics need at least one sample")
    for name, a in (("pred", p), ("label", t)):
        bad = ~np.isfinite(a)
        if bad.any():
            n_nan = int(np.isnan(a).sum())
            raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) out of {a.size} "
                             f"({n_nan} NaN, {int(bad.sum()) - n_nan} inf, after the float32 cast)")
    return p, t


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _pearson(p: np.ndarray, t: np.ndarray) -> float:
    """`np.corrcoef(p, t)[0][1]`, but NaN (silently) when either side is constant or n < 2."""
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return math.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.corrcoef(p, t)[0][1])


def _weighted_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn weighted F1 with (y_true, y_pred) in that order (MMSA before cb5e0bd swapped them)."""
    from sklearn.metrics import f1_score

    if y_true.size == 0:
        return math.nan
    # zero_division=0 is the value the default "warn" returns, without the warning
    return float(f1_score(y_true, y_pred, average="weighted", zero_division=0))


def _mult_acc(p: np.ndarray, t: np.ndarray, bound: float) -> float:
    """Acc-7 (bound 3) / Acc-5 (bound 2): clip, then `np.round` (half to even), then exact match."""
    return float(np.mean(np.round(np.clip(p, -bound, bound)) == np.round(np.clip(t, -bound, bound))))


def _bins(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Class i where edges[i] < x <= edges[i+1] (lower-exclusive, upper-inclusive)."""
    return np.searchsorted(edges, x, side="left") - 1


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def regression_metrics(pred: Any, label: Any) -> dict[str, float]:
    """MOSI / MOSEI metrics (docs/data-formats.md). Accuracies and F1 in [0, 1].

    Keys: `mae` (unclipped), `corr` (Pearson, unclipped; NaN for constant inputs), `acc7` (clip ±3),
    `acc5` (clip ±2), `acc2_has0` / `f1_has0` ((p >= 0) vs (t >= 0) over all samples), `acc2_non0` / `f1_non0`
    (samples with t != 0 only; (p > 0) vs (t > 0), so a prediction of exactly 0 is negative), `n`, `n_non0`.
    `acc2_non0` and `f1_non0` are NaN when every label is 0.
    """
    p, t = _prepare(pred, label)

    has0_true, has0_pred = t >= 0, p >= 0
    keep = t != 0  # exact float compare, as MMSA
    non0_true, non0_pred = t[keep] > 0, p[keep] > 0
    n_non0 = int(keep.sum())

    return {
        "mae": float(np.mean(np.abs(p - t))),
        "corr": _pearson(p, t),
        "acc7": _mult_acc(p, t, 3.0),
        "acc5": _mult_acc(p, t, 2.0),
        "acc2_has0": float(np.mean(has0_true == has0_pred)),
        "f1_has0": _weighted_f1(has0_true, has0_pred),
        "acc2_non0": float(np.mean(non0_true == non0_pred)) if n_non0 else math.nan,
        "f1_non0": _weighted_f1(non0_true, non0_pred),
        "n": int(p.size),
        "n_non0": n_non0,
    }


def sims_metrics(pred: Any, label: Any) -> dict[str, float]:
    """CH-SIMS / SIMS v2 metrics (docs/data-formats.md). Accuracies and F1 in [0, 1].

    Both inputs are clipped to [-1, 1] first; MAE and Corr are computed on the clipped values. Bins are
    lower-exclusive / upper-inclusive: Acc-2 {[-1, 0], (0, 1]} (0 is negative, unlike Has0), Acc-3
    {[-1, -0.1], (-0.1, 0.1], (0.1, 1]}, Acc-5 edges -0.7, -0.1, 0.1, 0.7. `f1` is the weighted F1 of the
    Acc-2 bins. Keys: `acc2, acc3, acc5, f1, mae, corr, n`.
    """
    p, t = _prepare(pred, label)
    p, t = np.clip(p, -1.0, 1.0), np.clip(t, -1.0, 1.0)
    p2, t2 = _bins(p, _SIMS_EDGES_2), _bins(t, _SIMS_EDGES_2)
    return {
        "acc2": float(np.mean(p2 == t2)),
        "acc3": float(np.mean(_bins(p, _SIMS_EDGES_3) == _bins(t, _SIMS_EDGES_3))),
        "acc5": float(np.mean(_bins(p, _SIMS_EDGES_5) == _bins(t, _SIMS_EDGES_5))),
        "f1": _weighted_f1(t2, p2),
        "mae": float(np.mean(np.abs(p - t))),
        "corr": _pearson(p, t),
        "n": int(p.size),
    }


def compute_metrics(pred: Any, label: Any, dataset: str) -> dict[str, float]:
    """`regression_metrics` for mosi/mosei/custom, `sims_metrics` for sims/simsv2 (`DataConfig.dataset`)."""
    name = str(dataset).lower()
    if name in _REGRESSION_DATASETS:
        return regression_metrics(pred, label)
    if name in _SIMS_DATASETS:
        return sims_metrics(pred, label)
    raise ValueError(f"unknown dataset {dataset!r} for metrics; choose one of "
                     f"{list(_REGRESSION_DATASETS + _SIMS_DATASETS)}")


# --------------------------------------------------------------------------------------------
# Per-sample labels of a score
# --------------------------------------------------------------------------------------------


def _family(dataset: str) -> str:
    name = str(dataset).lower()
    if name in _REGRESSION_DATASETS:
        return "regression"
    if name in _SIMS_DATASETS:
        return "sims"
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(_REGRESSION_DATASETS + _SIMS_DATASETS)}")


def sentiment_class7(pred: Any, dataset: str = "mosi") -> np.ndarray:
    """The 7-class label (int8 in -3..3) of each score, as Acc-7 counts it: clip, then `np.round` (half to even).

    MOSI / MOSEI / custom: `round(clip(p, -3, 3))`, exactly the classes `regression_metrics`' `acc7` compares.
    CH-SIMS / SIMS v2 scores live on [-1, 1], where rounding would leave three classes: the same seven classes
    are taken on that scale, `round(3 * clip(p, -1, 1))` (steps of 1/3), so the label means the same thing
    whichever corpus the model was trained on."""
    p = _finite_scores(pred)
    return _class7(p, (-1.0, 1.0) if _family(dataset) == "sims" else (-3.0, 3.0)).astype(np.int8)


def _finite_scores(pred: Any) -> np.ndarray:
    p = _as_float_array(pred, "pred")
    bad = np.flatnonzero(~np.isfinite(p))
    if bad.size:
        raise ValueError(f"pred: {bad.size} score(s) not finite (NaN or inf), first at position {int(bad[0])}: "
                         "a score without a class or polarity")
    return p


def _class7(values: np.ndarray, label_range: tuple[float, float]) -> np.ndarray:
    """Acc-7's classes (int64 in -3..3) of `values` on `label_range`: mapped linearly onto [-3, 3] when the range
    is another, clipped to ±3, then `np.round` (half to even)."""
    lo, hi = float(label_range[0]), float(label_range[1])
    if (lo, hi) != (-3.0, 3.0):
        mid, half = (lo + hi) / 2.0, (hi - lo) / 2.0
        values = (values - mid) / half * 3.0
    return np.round(np.clip(values, -3.0, 3.0)).astype(np.int64)


def polarity(pred: Any, dataset: str = "mosi") -> np.ndarray:
    """The polarity of each score: an object array of "negative" / "neutral" / "positive".

    MOSI / MOSEI / custom follow the non-zero convention of `acc2_non0`: a score above 0 is positive, below 0
    negative, and exactly 0 is the neutral class that convention leaves out. CH-SIMS / SIMS v2 use their Acc-3
    bins: [-1, -0.1] negative, (-0.1, 0.1] neutral, (0.1, 1] positive (after clipping to [-1, 1])."""
    p = _finite_scores(pred)
    if _family(dataset) == "sims":
        cls = _bins(np.clip(p, -1.0, 1.0), _SIMS_EDGES_3)  # 0, 1, 2
    else:
        cls = (np.sign(p) + 1).astype(np.int64)  # -1, 0, 1 -> 0, 1, 2
    return np.asarray(POLARITIES, dtype=object)[cls]


# --------------------------------------------------------------------------------------------
# Across seeds
# --------------------------------------------------------------------------------------------


def summarize_seeds(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Mean and **population** standard deviation (ddof=0, as MMSA) of each metric over seeds.

    Every dict must have the same keys. A NaN in any seed makes that key's mean and std NaN (visible, not
    silently dropped). Returns `{key: (mean, std)}` in the first dict's key order.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("summarize_seeds needs at least one metric dict")
    keys = list(runs[0])
    for i, r in enumerate(runs[1:], start=1):
        if set(r) != set(keys):
            missing, extra = sorted(set(keys) - set(r)), sorted(set(r) - set(keys))
            raise ValueError(f"metric dict {i} has different keys than dict 0 (missing {missing}, extra {extra})")
    out: dict[str, tuple[float, float]] = {}
    for k in keys:
        try:
            vals = np.asarray([float(r[k]) for r in runs], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"metric {k!r} is not numeric in every dict") from None
        out[k] = (float(np.mean(vals)), float(np.std(vals, ddof=0)))
    return out


_PERCENT_PREFIXES = ("acc", "f1")


def _is_percent_key(key: str) -> bool:
    return key.startswith(_PERCENT_PREFIXES)


def format_table(
    results: Mapping[str, tuple[float, float]] | Sequence[Mapping[str, float]],
    *,
    percent: bool = True,
    keys: Iterable[str] | None = None,
    digits: int = 2,
    title: str | None = None,
) -> str:
    """A readable `metric  mean ± std` table; returns the text (print it yourself).

    `results` is a `summarize_seeds` result or the list of per-seed metric dicts. With `percent=True`
    (default, MMSA style) accuracies and F1 (keys starting with `acc`/`f1`) are ×100 and shown in %;
    MAE and Corr are always shown unscaled (MMSA also scales MAE; we do not). The std is the population std
    (ddof=0); the header says so and how many seeds were averaged when that is known. `keys` picks and orders
    rows (default: every metric except the counts `n`, `n_non0`).
    """
    n_seeds: int | None = None
    if not isinstance(results, Mapping):
        runs = list(results)
        n_seeds = len(runs)
        results = summarize_seeds(runs)
    rows = list(keys) if keys is not None else [k for k in results if k not in ("n", "n_non0")]
    unknown = [k for k in rows if k not in results]
    if unknown:
        raise KeyError(f"format_table: no such metric(s) {unknown}; have {list(results)}")

    units = ("accuracies/F1 in % (x100), MAE and Corr unscaled" if percent
             else "all values unscaled (accuracies/F1 as fractions)")
    seeds = f"{n_seeds} seed(s), " if n_seeds is not None else ""
    lines = [title] if title else []
    one = n_seeds == 1  # one seed has no spread: "± 0.00" would claim a measured one
    lines.append(f"# 1 seed, no spread to show; {units}" if one else
                 f"# {seeds}mean ± population std (ddof=0); {units}")
    width = max([len("metric")] + [len(k) for k in rows])
    cells = []
    for k in rows:
        mean, std = results[k]
        scale = 100.0 if (percent and _is_percent_key(k)) else 1.0
        d = digits if scale == 100.0 else digits + 2
        cells.append((k, f"{mean * scale:.{d}f}", f"{std * scale:.{d}f}", "%" if scale == 100.0 else ""))
    mw = max([4] + [len(c[1]) for c in cells])
    lines.append(f"{'metric':<{width}}  {'value' if one else 'mean':>{mw}}{'' if one else '   std'}")
    for k, m, s, u in cells:
        lines.append(f"{k:<{width}}  {m:>{mw}}{' ' + u if u else ''}" if one else
                     f"{k:<{width}}  {m:>{mw}} ± {s}{(' ' + u) if u else ''}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Trivial baselines (docs/data-formats.md: sanity floors)
# --------------------------------------------------------------------------------------------


def _majority(classes: np.ndarray) -> float:
    if classes.size == 0:
        return math.nan
    _, counts = np.unique(classes, return_counts=True)
    return float(counts.max() / classes.size)


def trivial_baselines(label: Any, dataset: str = "mosi") -> dict[str, float]:
    """Scores of predictions that ignore the input, as floors a trained model must beat (§8).

    MOSI/MOSEI/custom keys: `acc2_has0`, `acc2_non0`, `acc7`, `acc5` (accuracy of always predicting the most
    frequent class of that metric; each may be a different constant), `mae_zero` (predict 0), `mae_mean`
    (predict the label mean), `mae_median` (predict the median: the best constant for MAE), `n`, `n_non0`.
    SIMS/SIMS v2 keys: `acc2`, `acc3`, `acc5` (majority class of the §7.2 bins, labels clipped to [-1, 1]),
    `mae_zero`, `mae_mean`, `mae_median` (on clipped labels, as `sims_metrics`), `n`.
    """
    t = _as_float_array(label, "label")
    if t.size == 0:
        raise ValueError("label is empty")
    if not np.isfinite(t).all():
        raise ValueError(f"label has {int((~np.isfinite(t)).sum())} non-finite value(s) out of {t.size}")
    name = str(dataset).lower()
    if name in _SIMS_DATASETS:
        c = np.clip(t, -1.0, 1.0)
        return {
            "acc2": _majority(_bins(c, _SIMS_EDGES_2)),
            "acc3": _majority(_bins(c, _SIMS_EDGES_3)),
            "acc5": _majority(_bins(c, _SIMS_EDGES_5)),
            "mae_zero": float(np.mean(np.abs(c))),
            "mae_mean": float(np.mean(np.abs(c - c.mean()))),
            "mae_median": float(np.mean(np.abs(c - np.median(c)))),
            "n": int(c.size),
        }
    if name not in _REGRESSION_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(_REGRESSION_DATASETS + _SIMS_DATASETS)}")
    non0 = t[t != 0]
    return {
        "acc2_has0": _majority(t >= 0),
        "acc2_non0": _majority(non0 > 0),
        "acc7": _majority(np.round(np.clip(t, -3.0, 3.0)) + 0.0),  # + 0.0: -0.0 -> 0.0, one class
        "acc5": _majority(np.round(np.clip(t, -2.0, 2.0)) + 0.0),
        "mae_zero": float(np.mean(np.abs(t))),
        "mae_mean": float(np.mean(np.abs(t - t.mean()))),
        "mae_median": float(np.mean(np.abs(t - np.median(t)))),
        "n": int(t.size),
        "n_non0": int(non0.size),
    }


# --------------------------------------------------------------------------------------------
# Confusion matrix of the 7 sentiment classes
# --------------------------------------------------------------------------------------------

CLASSES_7 = (-3, -2, -1, 0, 1, 2, 3)


def confusion_7class(pred: Any, label: Any, label_range: tuple[float, float] = (-3.0, 3.0)) -> np.ndarray:
    """(7, 7) int64 counts: row = label class, column = predicted class, classes `CLASSES_7`.

    The classes are Acc-7's (clip to ±3, `np.round` half to even), so for MOSI/MOSEI the diagonal over the total
    equals `regression_metrics(...)["acc7"]`. A corpus with another label range (SIMS: [-1, 1]) is scaled
    linearly onto [-3, 3] first, so its plot reads the same way (SIMS has no official 7-class metric)."""
    p, t = _prepare(pred, label)
    pc, tc = _class7(p, label_range) + 3, _class7(t, label_range) + 3
    counts = np.zeros((7, 7), dtype=np.int64)
    np.add.at(counts, (tc, pc), 1)
    return counts
