"""The paper's studies as Tune grids over seeds, with statistics that say which differences are real.

    run_grid(rows, seeds, name=, storage_path=)   every (row, seed) pair is one Ray Tune trial whose driver
                                                  function fits one run (`fit_one`); resumable (`Tuner.restore`)
    train_seeds(cfg, seeds)                       `psamf train --seeds`: the same outputs as the old thread pool
    study_ablations(cfg, seeds) / study_layers(cfg, seeds)   the paper's ablation and layer tables
    compare_to_reference, paired_test             mean ± std over seeds, paired test across seeds, spread flag
    ridge_baseline                                a linear model on the same train split (honesty row)
    chance_levels, terms_at_chance                loss terms that never left their chance level

Why a Tune grid and not a thread pool: Tune schedules trials on whatever the cluster has (a 2-core laptop runs
one at a time, a cluster many), records every trial's state so that an interrupted grid resumes with
`Tuner.restore` (finished trials are not rerun), and each trial's Train run has a stable name
(`<name>-<row>-seed<k>`), so a trial that was interrupted mid-way resumes from its own latest checkpoint.

Why paired statistics: the same seed gives the same initialisation and data order in every row, so the
per-seed difference to the full model removes most of the seed-to-seed noise. With few seeds a t-test has
almost no power (3 seeds: |t| must exceed 4.30 for p < 0.05), so the table reports p as descriptive and flags a
row only when every seed moves the same way *and* the mean difference exceeds the seed spread of both rows.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# =============================================================================================
# 0. Seams: every call into other psamf modules goes through this section (renamed at merge time)
# =============================================================================================
from psamf import metrics as _metrics
from psamf import runtime as _runtime
from psamf import storage as _storage
from psamf.config import ABLATIONS, Config, ConfigError, ablate
from psamf.losses import CHANCE_RTOL, chance_levels, terms_at_chance

GRID_SPEC = "psamf-grid.json"  # in the Tune experiment directory: the rows and seeds of the grid stored there
from psamf.results import TrainResult

summarize_seeds = _metrics.summarize_seeds
format_table = _metrics.format_table
compute_metrics = _metrics.compute_metrics
storage_target = _storage.resolve
write_bytes, write_json, read_json, exists = _storage.write_bytes, _storage.write_json, _storage.read_json, \
    _storage.exists


def _preflight(cfg: Config, *, manifest: Mapping[str, Any] | None = None, check_resources: bool = True) -> Any:
    from psamf.preflight import preflight

    return preflight(cfg, manifest=manifest, check_resources=check_resources)


def _fit_one(pf: Any) -> Any:
    from psamf.train import fit

    return fit(pf, in_trial=True)  # a grid trial: run.num_workers=0 trains in the trial's own process


def _init_ray(cpus: float) -> None:
    _runtime.init_ray(cpus)


def _read_manifest(uri: str, s3_endpoint: str | None) -> dict[str, Any]:
    from psamf.shards import read_manifest

    return read_manifest(uri, s3_endpoint)


log = logging.getLogger("psamf.study")

__all__ = [
    "GridResult", "run_grid", "trial_run_name", "max_concurrent_trials", "train_seeds",
    "Comparison", "paired_test", "compare_to_reference", "power_note",
    "chance_levels", "terms_at_chance", "ridge_baseline",
    "StudyResult", "summarize_study", "format_study_table", "study_ablations", "study_layers",
]

DRIVER_CPU = 1.0  # a trial's driver function (reads small splits with pyarrow, then waits on the Train run)
RAY_DATA_CPU = 1.0  # left free for Ray Data read tasks (docs/ray-operations.md §2: starving them hangs training)
SPREAD_K = 1.0  # flag: |mean paired difference| > SPREAD_K x max(seed std of both rows), every seed same sign
RIDGE_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)


# =============================================================================================
# 1. The grid: (row, seed) pairs as Tune trials
# =============================================================================================


class GridInterrupted(Exception):
    """Ctrl+C (or a stop) ended a grid before every run finished: nothing is summarised. Running the grid again
    continues it (finished runs are kept, unfinished ones resume from their checkpoints)."""

    def __init__(self, name: str, finished: int, total: int):
        super().__init__(f"{name}: interrupted with {finished} of {total} run(s) finished; nothing was summarised "
                         "(finished runs are kept, unfinished ones resume from their latest checkpoints)")
        self.name, self.finished, self.total = name, finished, total


@dataclass
class GridResult:
    """One trial of a grid. `status` is "ok" (metrics.json written), "error" (`error` says why) or "unfinished"
    (it neither finished nor failed: the grid was interrupted)."""

    row: str
    seed: int
    status: str
    run_name: str
    run_dir: str
    metrics: dict[str, Any] | None = None  # metrics.json of the run
    history: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def trial_run_name(name: str, row: str, seed: int) -> str:
    """`<name>-<row>-seed<k>`, or `<name>-seed<k>` for the single unnamed row of `train_seeds`. Stable, so that
    a restored grid (or a rerun with the same name) resumes each run from its own checkpoints."""
    return f"{name}-{row}-seed{seed}" if row else f"{name}-seed{seed}"


def _trial_config(cfg: Config, name: str, row: str, seed: int, storage_path: str) -> Config:
    return cfg.replace({"optim.seed": int(seed), "run.name": trial_run_name(name, row, seed),
                        "run.storage_path": storage_path}, source=f"grid row {row or name!r}, seed {seed}")


def max_concurrent_trials(cfgs: Sequence[Config], n_trials: int, resources: Mapping[str, float]) -> int:
    """How many trials fit side by side: each needs its workers' CPUs (GPUs) plus its driver's CPU (a run with
    `run.num_workers=0` trains in the trial's process: one worker's resources, no driver), and RAY_DATA_CPU
    stays free for Ray Data, so a 2-core machine runs one trial at a time instead of hanging."""
    w = max(max(1, c.run.num_workers) for c in cfgs)
    cpw = max(c.run.cpus_per_worker for c in cfgs)
    driver = DRIVER_CPU if any(c.run.num_workers > 0 for c in cfgs) else 0.0
    k = int((resources.get("CPU", 0) - RAY_DATA_CPU) // (w * cpw + driver))
    if any(c.run.use_gpu for c in cfgs):
        gpw = max(c.run.gpus_per_worker for c in cfgs if c.run.use_gpu)
        k = min(k, int(resources.get("GPU", 0) // (w * gpw)))
    for key in {key for c in cfgs for key in c.run.worker_resources}:
        need = max(c.run.worker_resources.get(key, 0) for c in cfgs)
        k = min(k, int(resources.get(key, 0) // (w * need)))
    return max(1, min(n_trials, k))


class _TrialResources:
    """A grid trial's resources by its row (Tune calls this with the trial's config): the driver's CPU when the
    row's run has a Ray Train worker group (which holds the workers' resources itself), one worker's resources
    when it trains in the trial's own process (`run.num_workers=0`, `psamf.train.train_in_trial`)."""

    def __init__(self, runs: Mapping[str, Any]):
        self.runs = dict(runs)

    def __call__(self, config: Mapping[str, Any]) -> Any:
        from ray.tune import PlacementGroupFactory

        run = self.runs[config["row"]]
        return PlacementGroupFactory([run.resources_per_worker() if run.num_workers == 0 else {"CPU": DRIVER_CPU}])


def _grid_trial(config: dict[str, Any], *, rows: Mapping[str, dict[str, Any]], manifest: Mapping[str, Any],
                name: str, storage_path: str) -> None:
    """The Tune trainable: one Train run for (row, seed). Reports one final result; the run's files hold
    everything else (the driver reads them after the grid, also for trials finished before a restore)."""
    import ray.tune

    row, seed = config["row"], int(config["seed"])
    cfg = _trial_config(Config.from_dict(rows[row], source=f"grid row {row!r}"), name, row, seed, storage_path)
    res = _fit_one(_preflight(cfg, manifest=manifest, check_resources=False))
    final = {f"test_{k}": v for k, v in res.metrics["test"].items() if isinstance(v, (int, float))}
    final.update({f"valid_{k}": v for k, v in res.metrics["valid"].items() if isinstance(v, (int, float))})
    ray.tune.report({"row": row, "seed": seed, "run_dir": res.run_dir, **final})


class _GridLine:
    """A Tune callback: one console line per ended grid trial (run name, valid and test MAE, how many are done),
    so that a grid of runs that each take minutes shows its progress as it goes."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from ray.tune import Callback

        class _Impl(Callback):
            def __init__(self, name: str, total: int):
                # plain values only: the Tuner pickles its RunConfig (callbacks included) into the experiment state
                self.name, self.total, self.ended, self.t0 = name, total, 0, time.time()

            def _line(self, trial: Any, what: str) -> None:
                self.ended += 1
                run = trial_run_name(self.name, trial.config.get("row", ""), int(trial.config.get("seed", 0)))
                print(f"run {run}: {what} ({self.ended}/{self.total} ended, {time.time() - self.t0:.0f} s)",
                      flush=True)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                r = trial.last_result or {}
                vals = " ".join(f"{k}={r[k]:.4f}" for k in ("valid_mae", "test_mae") if isinstance(r.get(k), float))
                self._line(trial, f"finished {vals}".rstrip())

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self._line(trial, "failed (its error follows the grid)")

        return _Impl(*args, **kwargs)


def _check_grid(rows: Sequence[tuple[str, Config]], seeds: Sequence[int]) -> tuple[list[str], list[int]]:
    names = [r for r, _ in rows]
    if not names:
        raise ConfigError("a grid needs at least one row")
    if len(set(names)) != len(names):
        raise ConfigError(f"grid row names must be unique, got {names}")
    for r, cfg in rows:
        if "/" in r or (r == "" and len(names) > 1):
            raise ConfigError(f"grid row name {r!r}: no '/', and empty only for a single row")
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise ConfigError("a grid needs at least one seed")
    return names, seeds


def run_grid(rows: Sequence[tuple[str, Config]], seeds: Sequence[int], *, name: str, storage_path: str,
             resume: bool = False, grid_dir: str | None = None) -> list[GridResult]:
    """Fit every (row, seed) pair as one trial of a `ray.tune.Tuner` grid (no early stopping).

    Runs are `<storage_path>/<name>-<row>-seed<k>` (`optim.seed=k`); the Tune experiment is
    `<storage_path>/<grid_dir or name>`. Every config is checked (`preflight`) before any trial starts.
    `resume=True` restores that experiment: finished trials are kept, unfinished and errored ones rerun and
    their Train runs resume from their latest checkpoints. Returns one GridResult per pair, rows then seeds
    in the order given."""
    import ray
    import ray.tune

    names, seeds = _check_grid(rows, seeds)
    # trials run in their own working directories: relative local paths are resolved here, in the driver
    storage_path = _storage.absolute_local(storage_path)
    rows = [(r, _storage.absolute_model_paths(c.replace({"data.uri": _storage.absolute_local(c.data.uri)},
                                                         source=f"grid row {r!r}"))) for r, c in rows]
    pfs = []
    manifest = None
    for row, cfg in rows:  # data, storage and every run's resume compatibility: before Ray starts
        for s in seeds:
            pfs.append(_preflight(_trial_config(cfg, name, row, s, storage_path), manifest=manifest,
                                  check_resources=False))
            manifest = pfs[-1].manifest
    _init_ray(max(c.run.reserved_cpus() for _, c in rows))
    from psamf.preflight import check_cluster_resources

    for p in pfs:  # then what the cluster must hold
        check_cluster_resources(p.cfg)
    st = storage_target(storage_path, pfs[0].cfg.run.s3_endpoint or pfs[0].cfg.data.s3_endpoint)
    k = max_concurrent_trials([p.cfg for p in pfs], len(pfs), ray.cluster_resources())
    trainable = ray.tune.with_resources(ray.tune.with_parameters(
        _grid_trial, rows={r: c.to_dict() for r, c in rows}, manifest=manifest, name=name,
        storage_path=storage_path), _TrialResources({r: c.run for r, c in rows}))
    exp = grid_dir or name
    exp_uri = f"{st.uri.rstrip('/')}/{exp}"
    spec, spec_path = {"rows": list(names), "seeds": list(seeds)}, st.join(exp, GRID_SPEC)
    same_grid = _storage.exists(st.fs, spec_path) and _storage.read_json(st.fs, spec_path) == spec
    exp_path = exp_uri if st.storage_filesystem is None else f"{st.root}/{exp}"
    stored = resume and ray.tune.Tuner.can_restore(exp_path, storage_filesystem=st.storage_filesystem)
    if stored and same_grid:
        log.info("grid %s: restoring %s", name, exp_uri)
        tuner = ray.tune.Tuner.restore(exp_path, trainable, restart_errored=True,
                                       storage_filesystem=st.storage_filesystem)
    else:
        if stored:
            # Tuner.restore keeps the grid it stored: rows or seeds added or removed would not run (or would crash
            # on a row this invocation does not define). A new grid reuses every finished run by name instead.
            log.info("grid %s: rows or seeds differ from the stored grid (or it predates %s): starting the grid "
                     "anew; finished runs are reused by name and unfinished ones resume from their checkpoints",
                     name, GRID_SPEC)
        elif resume:
            log.info("grid %s: nothing to restore at %s; starting it (finished runs are reused by name)",
                     name, exp_uri)
        tuner = ray.tune.Tuner(
            trainable,
            param_space={"row": ray.tune.grid_search(names), "seed": ray.tune.grid_search(seeds)},
            # runs without workers train in the trial's actor: the next trial may reuse it (no new process to
            # start and no imports to repeat; each run seeds itself and builds its own model and data)
            tune_config=ray.tune.TuneConfig(max_concurrent_trials=k,
                                            reuse_actors=all(c.run.num_workers == 0 for _, c in rows)),
            run_config=ray.tune.RunConfig(name=exp, storage_path=st.storage_path,
                                          storage_filesystem=st.storage_filesystem, verbose=0,
                                          failure_config=ray.tune.FailureConfig(max_failures=0),
                                          callbacks=[_runtime.placement_group_reclaimer(),
                                                     _GridLine(name, len(names) * len(seeds))]))
    log.info("grid %s: %d row(s) x %d seed(s), %d trial(s) at a time", name, len(names), len(seeds), k)
    _storage.write_json(st.fs, spec_path, spec)  # what a later --resume must match to restore this experiment
    _runtime.quiet_tune_console()
    grid = tuner.fit()
    errors = {(r.config["row"], int(r.config["seed"])): r.error for r in grid if r.config}
    results = [_collect(st, name, row, s, errors.get((row, s))) for row in names for s in seeds]
    unfinished = [g for g in results if g.status == "unfinished"]
    if unfinished:  # Ctrl+C: Tune stopped its trials (no error) or never started them (no result)
        log.warning("grid %s: unfinished run(s): %s", name, ", ".join(g.run_name for g in unfinished))
        raise GridInterrupted(name, sum(g.status == "ok" for g in results), len(results))
    return results


def _collect(st: Any, name: str, row: str, seed: int, error: Any) -> GridResult:
    """A trial's outcome from its run directory (metrics.json is written last: it means complete). Without
    metrics.json a trial that raised is an error; one that did not (or has no result) is unfinished."""
    run = trial_run_name(name, row, seed)
    d = st.run_dir(run)
    if exists(st.fs, f"{d}/metrics.json"):
        hist = read_json(st.fs, f"{d}/history.json") if exists(st.fs, f"{d}/history.json") else []
        return GridResult(row, seed, "ok", run, st.run_uri(run), read_json(st.fs, f"{d}/metrics.json"), hist)
    if error is None:
        return GridResult(row, seed, "unfinished", run, st.run_uri(run), error="interrupted before it finished")
    return GridResult(row, seed, "error", run, st.run_uri(run), error=str(error))


# =============================================================================================
# 2. psamf train --seeds
# =============================================================================================


def _numeric(split: Mapping[str, Any], keys: Sequence[str]) -> dict[str, float]:
    return {k: (float(split[k]) if split.get(k) is not None else math.nan) for k in keys}


def train_seeds(cfg: Config, seeds: Sequence[int], *,
                resume: bool = True) -> TrainResult:
    """One run per seed as a Tune grid: runs `<run.name>-seed<k>` with `optim.seed=k` under `run.storage_path`,
    the summary (mean ± population std of valid and test metrics) in `<storage>/<run.name>-seeds.json` and the
    `format_table` text in `.table` — what `psamf.train.train(cfg, seeds=...)` produced with its thread pool.
    The Tune experiment is `<storage>/<run.name>-seeds/`; rerunning the same command resumes it."""
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    grid = run_grid([("", cfg)], seeds, name=cfg.run.name, storage_path=cfg.run.storage_path, resume=resume,
                    grid_dir=f"{cfg.run.name}-seeds")
    failed = [g for g in grid if g.status != "ok"]
    if failed:
        raise RuntimeError("; ".join(f"run {g.run_name} failed: {g.error}" for g in failed))
    results = [TrainResult(run_name=g.run_name, run_dir=g.run_dir, metrics=g.metrics or {}, history=g.history,
                           paths={"metrics": f"{g.run_dir}/metrics.json", "history": f"{g.run_dir}/history.json"})
               for g in grid]
    keys = [k for k in results[0].metrics["test"] if k not in ("n", "n_non0")]
    test = [_numeric(r.metrics["test"], keys) for r in results]
    summary = summarize_seeds(test)
    table = format_table(test, title=f"{cfg.run.name}: test metrics of the validation-selected checkpoint, "
                                     f"seeds {seeds}")
    st = storage_target(cfg.run.storage_path, cfg.run.s3_endpoint or cfg.data.s3_endpoint)
    write_json(st.fs, f"{st.root.rstrip('/')}/{cfg.run.name}-seeds.json", {
        "run_name": cfg.run.name, "seeds": seeds, "runs": [r.run_dir for r in results],
        "std": "population (ddof=0)", "test": {k: {"mean": m, "std": s} for k, (m, s) in summary.items()},
        "valid": {k: {"mean": m, "std": s} for k, (m, s) in
                  summarize_seeds([_numeric(r.metrics["valid"], keys) for r in results]).items()},
    })
    return TrainResult(run_name=cfg.run.name, run_dir=st.uri, metrics={"test": summary},
                       paths={"summary": f"{st.uri.rstrip('/')}/{cfg.run.name}-seeds.json"},
                       seeds=results, summary=summary, table=table)


# =============================================================================================
# 3. Statistics across seeds
# =============================================================================================


def lower_is_better(metric: str) -> bool:
    return metric.startswith("mae")


@dataclass
class Comparison:
    """One metric of one row against the reference row, paired by seed.

    `diff` = mean over common seeds of (row - reference); `t`, `p`: paired t-test (two-sided; NaN with fewer
    than 2 seeds); `flag`: "worse" / "better" when every seed's difference has the same sign and |diff| exceeds
    SPREAD_K x the larger seed std of the two rows; else None."""

    metric: str
    n: int
    diff: float
    diff_std: float  # population std of the per-seed differences
    t: float
    p: float
    flag: str | None


def paired_test(reference: Sequence[float], other: Sequence[float], metric: str) -> Comparison:
    """Compare per-seed values of `other` with `reference` (same seed order)."""
    from scipy import stats

    a, b = np.asarray(reference, np.float64), np.asarray(other, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"{metric}: paired values need the same seeds ({a.size} vs {b.size})")
    n = int(a.size)
    d = b - a
    if n == 0 or not np.isfinite(d).all():
        return Comparison(metric, n, math.nan, math.nan, math.nan, math.nan, None)
    diff, dstd = float(d.mean()), float(d.std())
    if n < 2:
        t = p = math.nan
    elif np.ptp(d) <= 1e-9 * max(1.0, abs(diff)):
        # no spread in the differences beyond float round-off (0.8 - 0.7 and 0.9 - 0.8 differ in the 17th digit):
        # the t statistic is 0 or infinite; scipy would divide by the round-off and warn of precision loss
        t, p = (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    else:
        r = stats.ttest_rel(b, a)
        t, p = float(r.statistic), float(r.pvalue)
    spread = max(float(a.std()), float(b.std()))
    same_sign = bool(np.all(d > 0) or np.all(d < 0))
    flag = None
    if n >= 2 and same_sign and abs(diff) > SPREAD_K * spread:
        flag = "worse" if (diff > 0) == lower_is_better(metric) else "better"
    return Comparison(metric, n, diff, dstd, t, p, flag)


def power_note(n: int, alpha: float = 0.05, power: float = 0.8) -> str:
    """How large a paired effect `n` seeds can detect: the critical |t| and the standardised effect
    (mean difference / std of the differences) needed for `power` (non-central t)."""
    from scipy import optimize, stats

    if n < 2:
        return f"{n} seed: no paired test is possible; use at least 3 seeds."
    df = n - 1
    tc = float(stats.t.ppf(1 - alpha / 2, df))

    def pw(dz: float) -> float:
        nc = dz * math.sqrt(n)
        got = float(stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc))
        return (1.0 if math.isnan(got) else got) - power  # nct gives NaN far in the tail, where power is 1

    dz = float(optimize.brentq(pw, 1e-6, 100.0))
    return (f"{n} seeds: a two-sided paired t-test at alpha={alpha} needs |t| > {tc:.2f}, and {int(power * 100)}% "
            f"power needs a mean difference of {dz:.1f} standard deviations of the per-seed differences. "
            "With this few seeds, p is descriptive; the flag (every seed the same direction and the difference "
            "beyond both rows' seed spread) is the criterion.")


def _seed_values(per_seed: Mapping[int, Mapping[str, float]], seeds: Sequence[int], metric: str) -> list[float]:
    return [float(per_seed[s][metric]) if per_seed[s].get(metric) is not None else math.nan for s in seeds]


def compare_to_reference(per_row: Mapping[str, Mapping[int, Mapping[str, float]]], reference: str,
                         metrics: Sequence[str]) -> dict[str, dict[str, Comparison]]:
    """`per_row[row][seed][metric]` -> `{row: {metric: Comparison}}` for every row but the reference, paired
    on the seeds both rows completed."""
    if reference not in per_row:
        raise ValueError(f"reference row {reference!r} has no completed run")
    ref = per_row[reference]
    out: dict[str, dict[str, Comparison]] = {}
    for row, runs in per_row.items():
        if row == reference:
            continue
        common = [s for s in ref if s in runs]
        out[row] = {m: paired_test(_seed_values(ref, common, m), _seed_values(runs, common, m), m) for m in metrics}
    return out


# =============================================================================================
# 4. Loss terms at chance level
# =============================================================================================


# `chance_levels` and `terms_at_chance` live in psamf.losses, next to the terms they describe (a train run's
# metrics.json records them too); imported above and re-exported here.


# =============================================================================================
# 5. Linear baseline: ridge on bag-of-words + pooled audio/visual
# =============================================================================================


def _pooled(arr: Any, lengths: np.ndarray) -> np.ndarray:
    """audio/visual column (ragged list<fixed_size_list> or fixed_shape_tensor) -> (n, D) mean of valid frames."""
    import pyarrow as pa

    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if isinstance(arr.type, pa.BaseExtensionType):  # fixed layout, padded, valid frames first
        full = np.asarray(arr.to_numpy_ndarray(), np.float64)  # (n, T, D)
        valid = np.arange(full.shape[1])[None, :] < lengths[:, None]
        sums = (full * valid[..., None]).sum(axis=1)
    else:
        inner = arr.flatten()
        flat = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, inner.type.list_size).astype(np.float64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        sums = np.zeros((n, flat.shape[1]))
        nz = lengths > 0
        if nz.any():
            sums[nz] = np.add.reduceat(flat, starts[nz], axis=0)
    return sums / np.maximum(lengths, 1)[:, None]


def _split_table(manifest: Mapping[str, Any], st: Any, split: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = ["input_ids", "attention_mask", "audio", "audio_len", "visual", "visual_len", "label"]
    files = [s["path"] for s in manifest.get("shards", []) if s.get("split") == split]
    if not files:
        raise ConfigError(f"{st.uri}/manifest.json lists no shard of split {split!r}")
    return pa.concat_tables([pq.read_table(f"{st.root}/{p}", columns=cols, filesystem=st.fs) for p in files])


def _features(table: Any, vocab: int) -> tuple[Any, np.ndarray, np.ndarray]:
    """(bag of words as sparse log1p counts, pooled audio+visual (n, D_a + D_v), labels)."""
    from scipy import sparse

    ids = np.asarray(table.column("input_ids").combine_chunks().flatten(), np.int64).reshape(table.num_rows, -1)
    mask = np.asarray(table.column("attention_mask").combine_chunks().flatten()).reshape(ids.shape) > 0
    rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)[mask]
    cols = np.clip(ids[mask], 0, vocab - 1)
    bow = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(ids.shape[0], vocab))
    bow.data = np.log1p(bow.data)  # duplicates were summed on construction
    av = [_pooled(table.column(m), table.column(f"{m}_len").to_numpy().astype(np.int64)) for m in ("audio", "visual")]
    return bow, np.concatenate(av, axis=1), table.column("label").to_numpy().astype(np.float64)


def ridge_baseline(data_uri: str, dataset: str, *, s3_endpoint: str | None = None,
                   alphas: Sequence[float] = RIDGE_ALPHAS) -> dict[str, Any]:
    """A linear model on the same train split the deep model sees, as the table's honesty row.

    Features: log1p bag-of-words counts of the transcript tokens (`input_ids` where `attention_mask`), plus
    the mean over valid frames of the audio and visual features, z-scored with train statistics. Ridge's
    alpha is chosen on the validation MAE; test is evaluated once with that alpha. Also returns
    `train_constant_mae` (mean |y - median(y)| on train), the l1 chance level of `chance_levels`."""
    from scipy import sparse
    from sklearn.linear_model import Ridge

    man = _read_manifest(data_uri, s3_endpoint)
    st = storage_target(data_uri, s3_endpoint)
    tables = {s: _split_table(man, st, s) for s in ("train", "valid", "test")}
    vocab = 1 + max(int(np.max(np.asarray(t.column("input_ids").combine_chunks().flatten()), initial=0))
                    for t in tables.values())
    feats = {s: _features(t, vocab) for s, t in tables.items()}
    mu = feats["train"][1].mean(axis=0)
    sd = feats["train"][1].std(axis=0)
    sd = np.where(sd > 1e-8, sd, 1.0)
    X = {s: sparse.hstack([bow, sparse.csr_matrix((av - mu) / sd)], format="csr") for s, (bow, av, _) in feats.items()}
    y = {s: f[2] for s, f in feats.items()}
    lo, hi = float(y["train"].min()), float(y["train"].max())
    best: tuple[float, float, Any] | None = None
    for a in alphas:
        model = Ridge(alpha=a).fit(X["train"], y["train"])
        mae = float(np.mean(np.abs(np.clip(model.predict(X["valid"]), lo, hi) - y["valid"])))
        if best is None or mae < best[0]:
            best = (mae, a, model)
    assert best is not None
    _, alpha, model = best
    out = {s: compute_metrics(np.clip(model.predict(X[s]), lo, hi), y[s], dataset) for s in ("valid", "test")}
    return {"alpha": alpha, "alphas": list(alphas), "valid": out["valid"], "test": out["test"],
            "features": {"bow_vocab": vocab, "pooled_av": int(feats["train"][1].shape[1])},
            "n": {s: int(v.size) for s, v in y.items()},
            "train_constant_mae": float(np.mean(np.abs(y["train"] - np.median(y["train"]))))}


# =============================================================================================
# 6. Study summary and the paper-shaped table
# =============================================================================================

REGRESSION_COLUMNS = (("MAE", ("mae",)), ("Corr", ("corr",)), ("Acc-7", ("acc7",)),
                      ("Acc-2 (Has0/Non0)", ("acc2_has0", "acc2_non0")), ("F1 (Has0/Non0)", ("f1_has0", "f1_non0")))
SIMS_COLUMNS = (("MAE", ("mae",)), ("Corr", ("corr",)), ("Acc-2", ("acc2",)), ("Acc-3", ("acc3",)),
                ("Acc-5", ("acc5",)), ("F1", ("f1",)))


def _columns(metric_keys: Sequence[str]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return REGRESSION_COLUMNS if "acc7" in metric_keys else SIMS_COLUMNS


def _row_chance(runs: Sequence[GridResult], cfg: Config, train_constant_mae: float | None) -> dict[str, Any]:
    levels = chance_levels(cfg, train_constant_mae)
    per_run = [terms_at_chance(g.history, levels, cfg.optim.batch_size) for g in runs]
    out = {}
    for term, level in levels.items():
        seen = [r[term] for r in per_run if term in r]
        out[term] = {"level": level, "seeds_at_chance": int(sum(seen)), "n": len(seen)}
    return out


def summarize_study(grid: Sequence[GridResult], *, reference: str, cfgs: Mapping[str, Config],
                    train_constant_mae: float | None = None, ridge: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Everything the table shows, as JSON-ready data: per row the test metrics per seed and their mean ±
    population std, the paired comparison with `reference`, the loss terms at chance, plus the trivial
    predictors (metrics.json `baselines`) and the ridge baseline."""
    ok = [g for g in grid if g.status == "ok" and g.metrics]
    if not any(g.row == reference for g in ok):
        raise RuntimeError(f"the reference row {reference!r} has no completed run: "
                           + "; ".join(f"{g.run_name}: {g.error}" for g in grid if g.row == reference))
    first = next(g for g in ok if g.row == reference).metrics
    keys = [c for _, cols in _columns(list(first["test"])) for c in cols]
    per_row: dict[str, dict[int, dict[str, float]]] = {}
    for g in ok:
        per_row.setdefault(g.row, {})[g.seed] = _numeric(g.metrics["test"], keys)
    comps = compare_to_reference(per_row, reference, keys)
    rows: dict[str, Any] = {}
    for row in dict.fromkeys(g.row for g in grid):
        runs = [g for g in ok if g.row == row]
        entry: dict[str, Any] = {"seeds_ok": [g.seed for g in runs],
                                 "failed": {str(g.seed): g.error for g in grid if g.row == row and g.status != "ok"},
                                 "runs": [g.run_dir for g in runs]}
        if runs:
            vals = [per_row[row][g.seed] for g in runs]
            entry["test"] = {k: {"mean": m, "std": s} for k, (m, s) in summarize_seeds(vals).items()}
            entry["per_seed"] = {str(g.seed): per_row[row][g.seed] for g in runs}
            entry["chance"] = _row_chance(runs, cfgs[row], train_constant_mae)
        if row in comps:
            entry["vs_reference"] = {m: vars(c) for m, c in comps[row].items()}
            entry["flags"] = {f: [m for m, c in comps[row].items() if c.flag == f] for f in ("worse", "better")}
        rows[row] = entry
    n_ref = len(per_row[reference])
    return {"reference": reference, "metrics": keys, "seeds": sorted({g.seed for g in grid}), "rows": rows,
            "trivial": first.get("baselines", {}).get("test"), "ridge": dict(ridge) if ridge else None,
            "power": power_note(n_ref), "spread_rule": f"flag when every seed's difference has the same sign and "
            f"|mean difference| > {SPREAD_K:g} x the larger population std over seeds of the two rows",
            "chance_rule": f"a term is at chance when its train value is within {CHANCE_RTOL:g} x its chance level "
                           "(ln B where that level is 0) in every epoch; see psamf.losses.chance_levels"}


def _fmt(metric: str, v: float | None, *, signed: bool = False) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    pct = metric.startswith(("acc", "f1"))
    x = 100 * v if pct else v
    return f"{x:+.2f}" if signed and pct else f"{x:+.3f}" if signed else f"{x:.2f}" if pct else f"{x:.3f}"


def _ms(stat: Mapping[str, Any] | None, m: str, n: int) -> str:
    if not stat or m not in stat:
        return "—"
    if n < 2:  # one seed has no spread to show: a std of 0 would read as a perfectly stable result
        return f"{_fmt(m, stat[m]['mean'])} (n=1)"
    return f"{_fmt(m, stat[m]['mean'])} ± {_fmt(m, stat[m]['std'])}"


def _chance_cell(entry: Mapping[str, Any]) -> str:
    hits = [f"{t} {c['seeds_at_chance']}/{c['n']}" for t, c in (entry.get("chance") or {}).items()
            if c["seeds_at_chance"]]
    return ", ".join(hits) or "none"


def _diff_cell(c: Mapping[str, Any]) -> str:
    cell = f"{_fmt(c['metric'], c['diff'], signed=True)} (p={c['p']:.2g})" if math.isfinite(c["p"]) else \
        _fmt(c["metric"], c["diff"], signed=True)
    return f"**{cell} {c['flag']}**" if c["flag"] else cell


def format_study_table(summary: Mapping[str, Any], title: str = "Study") -> str:
    """Markdown: the paper-shaped table (rows = variants; mean ± std over seeds on test), then the paired
    differences to the reference row with p-values and flags, then the notes that say how to read them."""
    cols = _columns(summary["metrics"])
    ref = summary["reference"]
    head = "| Model | " + " | ".join(c for c, _ in cols) + " | seeds | loss terms at chance |"
    lines = [f"## {title}", "", f"Test metrics of the validation-selected checkpoint, mean ± population std over "
             f"seeds {summary['seeds']}; Acc/F1 in %.", "", head, "|" + "---|" * (len(cols) + 3)]
    for row, e in summary["rows"].items():
        cells = [" / ".join(_ms(e.get("test"), k, len(e["seeds_ok"])) for k in keys) for _, keys in cols]
        name = f"{row or 'run'} (reference)" if row == ref else row
        fail = f" ({len(e['failed'])} failed)" if e["failed"] else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {len(e['seeds_ok'])}{fail} | {_chance_cell(e)} |")
    tb = summary.get("trivial")
    if tb:
        triv = {"mae": f"{_fmt('mae', tb.get('mae_mean'))} (mean), {_fmt('mae', tb.get('mae_median'))} (median)"}
        cells = [" / ".join(triv.get(k) or _fmt(k, tb.get(k)) for k in keys) for _, keys in cols]
        lines.append("| trivial (input-free, majority class / constant) | " + " | ".join(cells) + " | — | — |")
    rg = summary.get("ridge")
    if rg:
        cells = [" / ".join(_fmt(k, rg["test"].get(k)) for k in keys) for _, keys in cols]
        lines.append(f"| ridge (bag-of-words + pooled a/v, alpha={rg['alpha']:g}) | " + " | ".join(cells)
                     + " | — | — |")
    keys = summary["metrics"]
    lines += ["", f"Difference to `{ref}` (row − reference, paired by seed; two-sided paired t-test); **bold** = "
              "beyond the seed spread.", "", "| Model | " + " | ".join(f"Δ{k}" for k in keys) + " | flagged |",
              "|" + "---|" * (len(keys) + 2)]
    for row, e in summary["rows"].items():
        if "vs_reference" not in e:
            continue
        fl = "; ".join(f"{f}: {', '.join(ms)}" for f, ms in e["flags"].items() if ms) or "no"
        lines.append(f"| {row} | " + " | ".join(_diff_cell(e["vs_reference"][k]) for k in keys) + f" | {fl} |")
    if rg and "test" in summary["rows"][ref]:
        rt = summary["rows"][ref]["test"]
        lines.append("| ridge (one fit, not paired) | " + " | ".join(
            _fmt(k, rg["test"].get(k) - rt[k]["mean"] if rg["test"].get(k) is not None and
                 rt[k]["mean"] is not None else None, signed=True) for k in keys) + " | — |")
    lines += ["", f"- Power: {summary['power']}", f"- Flag rule: {summary['spread_rule']}.",
              f"- Loss terms at chance: {summary['chance_rule']}."]
    return "\n".join(lines) + "\n"


# =============================================================================================
# 7. The studies
# =============================================================================================


@dataclass
class StudyResult:
    name: str
    summary: dict[str, Any]
    table: str
    grid: list[GridResult]
    paths: dict[str, str]


def run_study(rows: Sequence[tuple[str, Config]], reference: str, seeds: Sequence[int], *, name: str,
              title: str, storage_path: str | None = None, resume: bool = False,
              out: Any = None) -> StudyResult:
    """Grid, ridge baseline, summary; writes `<storage>/<name>/study.md` and `study.json` (last) and prints
    the table."""
    cfg = dict(rows)[reference]
    storage_path = storage_path or cfg.run.storage_path
    grid = run_grid(rows, seeds, name=name, storage_path=storage_path, resume=resume)
    ridge = ridge_baseline(cfg.data.uri, cfg.data.dataset, s3_endpoint=cfg.data.s3_endpoint)
    summary = summarize_study(grid, reference=reference, cfgs=dict(rows),
                              train_constant_mae=ridge["train_constant_mae"], ridge=ridge)
    summary["name"] = name
    table = format_study_table(summary, title=title)
    st = storage_target(storage_path, cfg.run.s3_endpoint or cfg.data.s3_endpoint)
    d = f"{st.root.rstrip('/')}/{name}"
    write_bytes(st.fs, f"{d}/study.md", table.encode())
    write_json(st.fs, f"{d}/study.json", summary)  # last: every run ended (finished, or failed: see "failed")
    print(table, file=out or sys.stdout)  # resolved at call time: sys.stdout may have been replaced
    base = f"{st.uri.rstrip('/')}/{name}"
    failed = [g for g in grid if g.status == "error"]
    if failed:  # the table covers the finished runs and says which failed; the command still fails
        raise RuntimeError(f"{len(failed)} of {len(grid)} run(s) failed, and the table at {base}/study.md leaves "
                           f"them out: " + "; ".join(f"{g.run_name}: {g.error}" for g in failed)
                           + ". --resume runs them again")
    return StudyResult(name, summary, table, grid, {"table": f"{base}/study.md", "summary": f"{base}/study.json"})


def select_rows(rows: Sequence[tuple[str, Config]], only: Sequence[str] | None, reference: str,
                kind: str) -> list[tuple[str, Config]]:
    """The rows named in `only` (all when None), in the study's order. The reference row must be among them: every
    other row is compared with it. An unknown or missing name raises ConfigError naming the allowed rows."""
    if only is None:
        return list(rows)
    names = [r for r, _ in rows]
    unknown = [r for r in only if r not in names]
    if unknown:
        raise ConfigError(f"study {kind}: unknown row(s) {unknown}; the rows are {names}")
    if reference not in only:
        raise ConfigError(f"study {kind}: the rows must include the reference row {reference!r}, which every other "
                          f"row is compared with (got {list(only)})")
    keep = set(only)
    return [(r, c) for r, c in rows if r in keep]


def study_ablations(cfg: Config, seeds: Sequence[int], *, name: str = "ablations",
                    only: Sequence[str] | None = None, **kw: Any) -> StudyResult:
    """The paper's ablation table: the full model and each of `ABLATIONS` (or the rows named in `only`, which must
    include "full"), every row on every seed."""
    rows = select_rows([("full", cfg)] + [(a, ablate(cfg, a)) for a in ABLATIONS], only, "full", "ablations")
    return run_study(rows, "full", seeds, name=name, title=f"{name}: ablations ({cfg.data.dataset})", **kw)


def study_layers(cfg: Config, seeds: Sequence[int], *, name: str = "layers",
                 only: Sequence[str] | None = None, **kw: Any) -> StudyResult:
    """The paper's layer study: personality-sentiment alignment at every text hidden-state index
    0..model.text_layers (0 = embeddings); the reference row is the config's own `model.align_layer`. `only`
    names a subset of the rows (align<i>), the reference among them."""
    if not cfg.model.use_personality:
        raise ConfigError("study layers: model.use_personality=false has no alignment whose layer could move")
    ref = f"align{cfg.model.align_layer}"
    rows = select_rows([(f"align{i}", cfg.replace({"model.align_layer": i}, source=f"layer study, align_layer={i}"))
                        for i in range(cfg.model.text_layers + 1)], only, ref, "layers")
    return run_study(rows, ref, seeds, name=name, title=f"{name}: alignment layer ({cfg.data.dataset})", **kw)


STUDIES: dict[str, Callable[..., StudyResult]] = {"ablations": study_ablations, "layers": study_layers}
