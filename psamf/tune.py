"""Ray Tune search over PSA-MF's configuration: the search space is data (YAML), one Train V2 run per trial.

    space = SearchSpace.from_yaml("jobs/search/tiny-demo.yaml")
    result = run_search(space, name="demo-search")            # resume=True continues an interrupted search
    print(result.summary)

The search file::

    base: {preset: tiny, overrides: {data.uri: data/shards/mosi-synth, optim.epochs: 3}}   # or config: FILE
    metric: val_mae          # validation only (val_*); test_* is rejected
    mode: min
    num_samples: 16
    search: optuna           # optuna (TPE, seeded) | random | grid
    scheduler: asha          # asha | none; max_t = optim.epochs
    grace_period: 1          # ASHA: epochs before the first cut
    reduction_factor: 2
    workers_per_trial: 1     # Ray Train DDP workers per trial; 0: the trial trains in its own process (below)
    max_concurrent_trials: null  # null: as many as fit the cluster now; on an autoscaling cluster, the most you
                                 # want at once (pending trials make the autoscaler add nodes, up to its maximum)
    seed: 0
    space:
      model.align_layer: {randint: [0, 2]}       # inclusive bounds
      optim.lr_main: {loguniform: [1.0e-4, 1.0e-2]}
      model.sim_mode: {choice: [batch_dissimilarity, per_sample_dissimilarity]}
      loss.w_ps: {uniform: [0.0, 1.0]}
      model.cross_heads: {grid: [1, 2]}         # grid and random search only
      optim.batch_size: 16                      # a fixed value

Why it is built this way:

* **Fail before any trial starts.** Unknown top-level keys, unknown `section.key`s, malformed or impossible
  distributions (low >= high, loguniform <= 0, a value that no combination of the other dimensions makes valid)
  raise `ConfigError` naming the key and the file, and the base config goes through `preflight` (data, storage)
  in the driver, before the Tuner exists.
* **Pruned combinations never train.** A sampled combination the config rejects (align_layer beyond
  text_layers, widths that do not divide into heads) is a zero-epoch trial: the trial function validates it
  with `Config.replace`, writes `trials/<id>/pruned.json` with the config's message and returns without
  reporting. Constraining the sampler instead would need a hand-written rule per constraint that drifts from
  `psamf/config.py`; this way the config stays the single source of truth. OptunaSearch records a trial that
  ends without its metric as PRUNED (so TPE learns nothing false), ASHA ignores it.
* **Test once.** Trials never see the test split: a trial's trainer evaluates its selected checkpoint on
  validation only (`build_trainer(final_splits=("valid",))`) and is not even handed the test split. After the
  search, only the best trial's selected checkpoint is evaluated on test (`metrics.json`).
* **Resumable.** Every trial's Train run is named by its trial id under `<search>/trials/`, so a restored trial
  continues from its own latest Train checkpoint; the Tune experiment lives in `<search>/` itself and
  `Tuner.restore(..., resume_unfinished=True, restart_errored=True)` continues it without rerunning finished
  trials. ASHA counts Tune iterations (one per epoch); a trial restored mid-way restarts that count, so its rung
  comparisons after a resume are approximate (its epochs and checkpoints are not).
* **Sized by the cluster.** `max_concurrent_trials` = how many (workers x cpus_per_worker + 1 driver) fit into
  the cluster's CPUs with one left for Ray Data (and GPUs when `use_gpu`), so a 2-core laptop and a GPU cluster
  both work unedited and Ray Data read tasks never starve (docs/ray-operations.md §2). A head advertising `TRAIN_DRIVER`
  slots runs the trial drivers there with no CPU.
* **Trials in their own process** (`workers_per_trial: 0`). A one-process trial does not need a Ray Train worker
  group: the trial's own actor holds one worker's resources (`run.cpus_per_worker`, a GPU when `run.use_gpu`,
  `run.worker_resources`), trains there (`psamf.train.train_in_trial`: the same loop, checkpoints as in local
  mode) and reports every epoch to Tune itself; Tune reuses the actor for the next trial (`reuse_actors`). Starting
  the controller, the worker actor, the dataset split and a new process was most of a short trial
  (docs/benchmarks.md, "Search throughput"). Ray 2.60 refuses `ray.train.*` inside a Tune function, so Ray
  Train's own local mode cannot do this. Tune restarts a failed trial `run.max_failures` times (there is no Train
  restart inside it) and the trial resumes from its latest checkpoint.

Outputs in `<storage>/<name>/`: `search.yaml` (the resolved search), `trials.parquet` + `trials.csv` (in start
order: each trial records its first start in `trials/<id>/started.json`), `best.yaml`, `metrics.json`,
`plots/*.png`, and per trial `trials/<id>/` (Train run: checkpoints, history.json, tensorboard/ with the trial's
curves and its HParams entry).
"""

from __future__ import annotations

import copy
import datetime as _dt
import itertools
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from psamf.config import Config, ConfigError, parse_overrides, read_yaml_file

__all__ = ["SearchSpace", "SearchResult", "Dimension", "run_search", "load_search", "max_concurrent_trials",
           "SEARCHES", "SCHEDULERS", "TRIAL_STATUSES"]

log = logging.getLogger("psamf.tune")

SEARCHES = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "none")
TRIAL_STATUSES = ("finished", "stopped-early", "pruned", "error", "unfinished")
ENDED = "ended.json"  # in a trial's directory: Tune ended it (written by the console-line callback)
STARTED = "started.json"  # in a trial's directory: when it first started (trials.csv is in that order)
MARKERS = "trials-marked-ended"  # in the search directory: its trials get ENDED markers (searches since 2026-12-02)
DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "grid")
TOP_KEYS = ("base", "metric", "mode", "num_samples", "search", "scheduler", "grace_period", "reduction_factor",
            "workers_per_trial", "max_concurrent_trials", "seed", "space")


# =============================================================================================
# Seams into the rest of psamf (preflight, data, train, engine, runtime, evaluate, storage)
# =============================================================================================


def _preflight(cfg: Config, manifest: Mapping[str, Any] | None = None) -> Any:
    from psamf.preflight import preflight

    return preflight(cfg, check_resources=False, manifest=manifest)


def _load_datasets(cfg: Config, manifest: Mapping[str, Any]) -> dict[str, Any]:
    from psamf.data import load_datasets

    return load_datasets(cfg.data, manifest, ("train", "valid"))


def _build_trainer(pf: Any, datasets: Mapping[str, Any], callbacks: Sequence[Any]) -> Any:
    """A trial's trainer: test is never looked at inside a trial (the selected checkpoint is evaluated on valid
    only; the search's best trial is evaluated on test once, at the end)."""
    from psamf.train import build_trainer

    return build_trainer(pf.cfg, datasets, pf.storage, counts=pf.manifest.get("counts"), callbacks=callbacks,
                         final_splits=("valid",))


def _train_in_trial(pf: Any, datasets: Mapping[str, Any], fault: Mapping[str, Any] | None) -> dict[str, Any]:
    from psamf.train import build_loop_config, train_in_trial

    return train_in_trial(build_loop_config(pf.cfg, pf.storage, counts=pf.manifest.get("counts"),
                                            final_splits=("valid",), fault=fault), datasets)


def _fault_spec() -> dict[str, Any] | None:
    from psamf.train import _fault_spec as spec

    return spec()


def _selectable_metrics(dataset: str) -> list[str]:
    from psamf.engine import selectable_metrics

    return selectable_metrics(dataset)


def _init_ray(cpus: float) -> None:
    from psamf import runtime

    runtime.init_ray(cpus)


def _quiet_tune_console() -> None:
    from psamf import runtime

    runtime.quiet_tune_console()


def _evaluate_test(checkpoint_uri: str, s3_endpoint: str | None) -> dict[str, Any]:
    from psamf.evaluate import evaluate_checkpoint

    return evaluate_checkpoint(checkpoint_uri, splits=("valid", "test"), num_workers=0, s3_endpoint=s3_endpoint)


def _storage(path: str, endpoint: str | None) -> Any:
    from psamf.storage import resolve

    return resolve(path, endpoint)


# =============================================================================================
# The search space (no Ray)
# =============================================================================================


@dataclass(frozen=True)
class Dimension:
    """One `section.key` of the space: `kind` in DISTRIBUTIONS, `args` its list (choices, bounds or grid)."""

    key: str
    kind: str
    args: tuple[Any, ...]

    def candidates(self) -> list[Any]:
        """Values that stand for the dimension when checking combinations: every choice, or both bounds."""
        return list(self.args)

    def tune_domain(self) -> Any:
        from ray import tune

        a = self.args
        return {"choice": lambda: tune.choice(list(a)), "uniform": lambda: tune.uniform(a[0], a[1]),
                "loguniform": lambda: tune.loguniform(a[0], a[1]),
                "randint": lambda: tune.randint(a[0], a[1] + 1),  # YAML bounds are inclusive
                "grid": lambda: tune.grid_search(list(a))}[self.kind]()

    def optuna_distribution(self) -> Any:
        import optuna

        a = self.args
        if self.kind in ("uniform", "loguniform"):
            return optuna.distributions.FloatDistribution(float(a[0]), float(a[1]), log=self.kind == "loguniform")
        if self.kind == "randint":
            return optuna.distributions.IntDistribution(int(a[0]), int(a[1]))
        return optuna.distributions.CategoricalDistribution(list(a))


@dataclass
class SearchSpace:
    """A validated search: the base config (fixed values applied), the dimensions and the search settings."""

    base: Config
    dims: list[Dimension]
    metric: str = "val_mae"
    mode: str = "min"
    num_samples: int = 8
    search: str = "optuna"
    scheduler: str = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    workers_per_trial: int = 1
    max_concurrent_trials: int | None = None  # None: as many as fit the cluster's resources at the start
    seed: int = 0
    source: str = "search"
    raw: dict[str, Any] = field(default_factory=dict)  # the file's content (saved with the search for --resume)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Sequence[str] = ()) -> "SearchSpace":
        """The search file at `path`; `overrides` (`section.key=value`, the command line's) are added to its
        `base.overrides` and win over them, so a shipped file runs on other data or storage without an edit."""
        d = read_yaml_file(path, "search")
        if overrides:
            if not isinstance(d, Mapping) or not isinstance(d.get("base") or {}, Mapping):
                raise ConfigError(f"{path}: top level and base must be mappings")
            base = dict(d.get("base") or {})
            given = base.get("overrides") or {}
            if not isinstance(given, Mapping):
                raise ConfigError(f"{path}: base.overrides must be a mapping of section.key -> value")
            values = parse_overrides(list(overrides))
            searched = sorted(set(values) & {str(k) for k in (d.get("space") or {})})
            if searched:
                raise ConfigError(f"{path}: {searched} are in space: a command-line override would fix a searched "
                                  "key; edit the space instead")
            base["overrides"] = {**given, **values}
            d = {**d, "base": base}
        return cls.from_dict(d, source=str(path), base_dir=Path(path).parent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "search", base_dir: Path | None = None) -> "SearchSpace":
        """Parse and validate everything that can be checked without Ray. Raises ConfigError naming key and file."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: top level must be a mapping")
        unknown = sorted(set(d) - set(TOP_KEYS))
        if unknown:
            raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {', '.join(TOP_KEYS)}")
        base = _base_config(d.get("base") or {}, source, base_dir)
        s = cls(base=base, dims=[], source=source, raw=copy.deepcopy(dict(d)))
        s.metric = _get(d, "metric", str, s.metric, source)
        s.mode = _get(d, "mode", str, s.mode, source)
        s.search = _get(d, "search", str, s.search, source)
        s.scheduler = _get(d, "scheduler", str, s.scheduler, source)
        for name in ("num_samples", "grace_period", "reduction_factor", "workers_per_trial", "seed"):
            setattr(s, name, _get(d, name, int, getattr(s, name), source))
        if d.get("max_concurrent_trials") is not None:
            s.max_concurrent_trials = _get(d, "max_concurrent_trials", int, None, source)
            if s.max_concurrent_trials < 1:
                raise ConfigError(f"{source}: max_concurrent_trials must be >= 1 or null, got {s.max_concurrent_trials}")
        s._check_settings()
        space = d.get("space")
        if not isinstance(space, Mapping) or not space:
            raise ConfigError(f"{source}: 'space' must be a non-empty mapping of section.key -> distribution")
        fixed: dict[str, Any] = {}
        for key, spec in space.items():
            dim = _parse_dimension(str(key), spec, source)
            if dim is None:
                fixed[str(key)] = spec
            else:
                s.dims.append(dim)
        if not s.dims:
            raise ConfigError(f"{source}: 'space' has only fixed values: nothing to search")
        known = {k: v for k, v in s.base.to_dict().items() if isinstance(v, dict)}  # the sections
        for key in [*fixed, *(dm.key for dm in s.dims)]:
            sec, _, fld = key.partition(".")
            if sec not in known or fld not in known[sec] or "." in fld:
                allowed = (f"allowed in {sec}: {sorted(known[sec])}" if sec in known and "." not in fld
                           else f"keys are <section>.<field> with section in {sorted(known)}")
                raise ConfigError(f"{source}: space.{key}: unknown key; {allowed}")
            if key.startswith("run.") or key in ("optim.epochs", "optim.select_metric", "optim.select_mode"):
                raise ConfigError(f"{source}: space.{key} cannot be searched (run.* is set per trial, optim.epochs "
                                  "is the scheduler's max_t, selection follows the search metric)")
        s.base = s.base.replace({**fixed, "optim.select_metric": s.metric, "optim.select_mode": s.mode},
                                source=f"{source} (base + fixed values)")
        if s.search == "grid" and any(dm.kind not in ("grid", "choice") for dm in s.dims):
            bad = [dm.key for dm in s.dims if dm.kind not in ("grid", "choice")]
            raise ConfigError(f"{source}: search: grid needs grid/choice dimensions only; {bad} are distributions")
        if s.search == "optuna" and any(dm.kind == "grid" for dm in s.dims):
            bad = [dm.key for dm in s.dims if dm.kind == "grid"]
            raise ConfigError(f"{source}: {bad}: 'grid' needs search: grid or random (Optuna samples; use choice)")
        _check_combinations(s.base, s.dims, source)
        return s

    def _check_settings(self) -> None:
        src = self.source
        if not self.metric.startswith("val_"):
            raise ConfigError(f"{src}: metric={self.metric!r}: searches score validation metrics only (val_*); "
                              "the test split is evaluated once, on the best trial, after the search")
        allowed = _selectable_metrics(self.base.data.dataset)
        if self.metric not in allowed:
            raise ConfigError(f"{src}: metric={self.metric!r} is not a validation metric of dataset "
                              f"{self.base.data.dataset!r}; choose one of {allowed}")
        _one_of(src, "mode", self.mode, ("min", "max"))
        _one_of(src, "search", self.search, SEARCHES)
        _one_of(src, "scheduler", self.scheduler, SCHEDULERS)
        for name, low in (("num_samples", 1), ("grace_period", 1), ("reduction_factor", 2),
                          ("workers_per_trial", 0)):
            if getattr(self, name) < low:
                raise ConfigError(f"{src}: {name} must be >= {low}, got {getattr(self, name)}")
        if self.scheduler == "asha" and self.grace_period > self.base.optim.epochs:
            raise ConfigError(f"{src}: grace_period ({self.grace_period}) exceeds optim.epochs "
                              f"({self.base.optim.epochs}), ASHA's max_t: nothing would ever be stopped")

    @property
    def max_t(self) -> int:
        return self.base.optim.epochs

    def param_space(self) -> dict[str, Any]:
        return {dm.key: dm.tune_domain() for dm in self.dims}

    def to_saved(self) -> dict[str, Any]:
        """What `search.yaml` in the search directory holds: the file as given, with the base fully resolved
        (so `--resume` needs neither the original file nor the config files it named)."""
        d = copy.deepcopy(self.raw)
        d["base"] = {"config": self.base.to_dict()}
        return d


def _get(d: Mapping[str, Any], key: str, typ: type, default: Any, source: str) -> Any:
    v = d.get(key, default)
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ConfigError(f"{source}: {key} must be an integer, got {v!r}")
    if typ is str and not isinstance(v, str):
        raise ConfigError(f"{source}: {key} must be a string, got {v!r}")
    return v


def _one_of(source: str, key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{source}: {key}={value!r}; choose one of {list(allowed)}")


def _base_config(base: Any, source: str, base_dir: Path | None) -> Config:
    """`base:` -> Config: `preset: NAME` or `config: FILE` (relative to the search file) or `config: {mapping}`
    (a resolved config, as saved in search.yaml), plus `overrides: {section.key: value}`."""
    if not isinstance(base, Mapping):
        raise ConfigError(f"{source}: base must be a mapping (preset/config/overrides)")
    unknown = sorted(set(base) - {"preset", "config", "overrides"})
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) base.{unknown}; allowed: preset, config, overrides")
    if "preset" in base and "config" in base:
        raise ConfigError(f"{source}: base names both a preset and a config file; choose one")
    conf = base.get("config")
    if isinstance(conf, Mapping):
        cfg = Config.from_dict(conf, source=f"{source} base.config")
        cfg.preset = str(conf.get("preset", "custom"))
    elif conf is not None:
        path = Path(str(conf))
        if not path.is_absolute() and base_dir is not None and not path.exists():
            path = base_dir / path
        cfg = Config.from_yaml(path)
    else:
        cfg = Config.from_preset(str(base.get("preset", "tiny")))
    overrides = base.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{source}: base.overrides must be a mapping of section.key -> value")
    return cfg.replace(overrides, source=f"{source} base.overrides")


def _parse_dimension(key: str, spec: Any, source: str) -> Dimension | None:
    """A distribution mapping -> Dimension; anything else is a fixed value (None)."""
    where = f"{source}: space.{key}"
    if not isinstance(spec, Mapping):
        return None
    if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"{where}: expected one of {{{', '.join(k + ': [...]' for k in DISTRIBUTIONS)}}} "
                          f"or a fixed value, got {dict(spec)!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, (list, tuple)) or not args:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        return Dimension(key, kind, tuple(args))
    if len(args) != 2:
        raise ConfigError(f"{where}: {kind} needs [low, high], got {args!r}")
    lo, hi = args
    if kind == "randint":
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (lo, hi)):
            raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
        if lo > hi:
            raise ConfigError(f"{where}: impossible range randint [{lo}, {hi}]: low > high")
        return Dimension(key, kind, (lo, hi))
    try:
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {kind} bounds must be numbers, got {args!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise ConfigError(f"{where}: impossible range {kind} [{lo:g}, {hi:g}]: needs finite low < high")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: impossible range loguniform [{lo:g}, {hi:g}]: bounds must be > 0")
    return Dimension(key, kind, (lo, hi))


def _check_combinations(base: Config, dims: Sequence[Dimension], source: str, tries: int = 256) -> None:
    """Every candidate value of every dimension must be valid together with *some* values of the others.

    A value that is invalid whatever the other dimensions take (a dropout of 1.5, an unknown key, a string for a
    float) is an error now; a value that is invalid only in some combinations (align_layer 3 with text_layers 2)
    is fine: such samples are pruned at run time. The other dimensions range over their candidates (choices,
    bounds), exhaustively when the product is small, else over `tries` seeded random combinations."""
    rng = random.Random(0)
    for i, dm in enumerate(dims):
        others = [d for j, d in enumerate(dims) if j != i]
        for v in dm.candidates():
            last: ConfigError | None = None
            for combo in _combos(others, rng, tries):
                try:
                    base.replace({dm.key: v, **combo}, source=source)
                    last = None
                    break
                except ConfigError as e:
                    last = e
            if last is not None:
                single = None
                try:
                    base.replace({dm.key: v}, source=source)
                except ConfigError as e:
                    single = e
                raise ConfigError(f"{source}: space.{dm.key}: the value {v!r} ({dm.kind} {list(dm.args)}) is "
                                  f"rejected with every combination of the other dimensions: "
                                  f"{single or last}") from None


def _combos(dims: Sequence[Dimension], rng: random.Random, tries: int):
    cands = [d.candidates() for d in dims]
    total = math.prod(len(c) for c in cands) if cands else 1
    if total <= tries:
        for values in itertools.product(*cands):
            yield {d.key: v for d, v in zip(dims, values)}
        return
    for _ in range(tries):
        yield {d.key: rng.choice(c) for d, c in zip(dims, cands)}


def load_search(name: str, storage_path: str = "runs", s3_endpoint: str | None = None) -> SearchSpace:
    """The SearchSpace saved in `<storage_path>/<name>/search.yaml` (for `--resume NAME`)."""
    from psamf.storage import exists, read_bytes

    st = _storage(storage_path, s3_endpoint)
    path = f"{st.run_dir(name)}/search.yaml"
    if not exists(st.fs, path):
        raise ConfigError(f"no search named {name!r} under {st.uri} ({st.run_uri(name)}/search.yaml missing)")
    return SearchSpace.from_dict(yaml.safe_load(read_bytes(st.fs, path)) or {}, source=f"{st.run_uri(name)}/search.yaml")


# =============================================================================================
# The Ray side: trial driver, concurrency, Tuner
# =============================================================================================


def max_concurrent_trials(space: SearchSpace, resources: Mapping[str, float]) -> int:
    """Trials that fit side by side: each holds workers x cpus_per_worker CPUs plus one for its driver (unless
    the cluster advertises TRAIN_DRIVER slots for drivers), one CPU stays free for Ray Data; GPUs when use_gpu.
    A trial that trains in its own process (`workers_per_trial: 0`) holds one worker's resources and no driver."""
    run, in_trial = space.base.run, space.workers_per_trial == 0
    workers = max(1, space.workers_per_trial)  # processes that train: the trial itself when in_trial
    cpu, gpu = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    drivers = None if in_trial else resources.get("TRAIN_DRIVER")
    per_trial = workers * run.cpus_per_worker + (0 if drivers or in_trial else 1)
    k = int((cpu - 1) // per_trial) if per_trial > 0 else space.num_samples
    if drivers:
        k = min(k, int(drivers))
    if run.use_gpu:
        k = min(k, int(gpu // (workers * run.gpus_per_worker)))
    for key, amount in run.worker_resources.items():
        k = min(k, int(float(resources.get(key, 0)) // (workers * amount)))
    return max(1, min(k, space.num_samples))


def _trial_driver(params: dict[str, Any], *, base: dict[str, Any], manifest: dict[str, Any],
                  trials_uri: str, s3_endpoint: str | None, fault: dict[str, Any] | None = None) -> None:
    """One trial = one Train V2 run named by the trial id (a restored trial resumes its own checkpoints). With
    `workers_per_trial: 0` the run trains in this process, without Ray Train (`psamf.train.train_in_trial`): the
    process holds one worker's resources and reports each epoch to Tune itself (no worker group to start)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from psamf.runtime import fit_trainer
    from psamf.storage import exists, write_bytes, write_json

    trial_id = ray.tune.get_context().get_trial_id()
    st = _storage(trials_uri, s3_endpoint)
    run_dir = st.run_dir(trial_id)
    if not exists(st.fs, f"{run_dir}/{STARTED}"):  # its first start (a restored trial keeps it): the table's order
        write_json(st.fs, f"{run_dir}/{STARTED}", {"started_utc": _dt.datetime.now(_dt.timezone.utc).isoformat()})
    base_cfg = Config.from_dict(base, source="search base")
    base_cfg.preset = base.get("preset", "custom")
    try:
        cfg = base_cfg.replace({**params, "run.name": trial_id, "run.storage_path": trials_uri},
                               source=f"trial {trial_id}")
        pf = _preflight(cfg, manifest=manifest)
    except ConfigError as e:
        write_json(st.fs, f"{run_dir}/pruned.json", {"trial_id": trial_id, "params": params, "reason": str(e)})
        return
    write_bytes(st.fs, f"{run_dir}/config.yaml", pf.cfg.to_yaml().encode())
    data = _load_datasets(pf.cfg, pf.manifest)
    if pf.cfg.run.num_workers == 0:  # workers_per_trial: 0, the trial trains in this process
        ret = _train_in_trial(pf, data, fault)
    else:
        result = fit_trainer(_build_trainer(pf, data, [TuneReportCallback()]), pf.cfg.run.controller_poll_s)
        if result.error is not None:
            raise result.error
        ret = result.return_value or {}
    write_json(st.fs, f"{run_dir}/done.json", {
        "trial_id": trial_id, "selected_epoch": ret.get("selected_epoch"), "early_stopped": ret.get("early_stopped"),
        "checkpoint_path": ret.get("checkpoint_path"), "valid": (ret.get("valid") or {}).get("metrics"),
        "device": ret.get("device"), "world_size": ret.get("world_size")})


class _ConsoleLine:
    """A Tune callback: one console line per ended trial (finished, stopped early, pruned, error)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from ray.tune import Callback

        class _Impl(Callback):
            def __init__(self, fs: Any, trials_dir: str, metric: str, mode: str, epochs: int):
                # no stream kept: the Tuner pickles its RunConfig (callbacks included) into the experiment state
                self.fs, self.trials_dir, self.metric, self.mode, self.epochs = fs, trials_dir, metric, mode, epochs

            def _line(self, trial: Any, error: bool) -> None:
                row = _trial_row(self.fs, self.trials_dir, trial.trial_id, dict(trial.config), self.metric,
                                 self.mode, error=error, ended=True, epochs=self.epochs)
                from psamf.storage import write_json

                try:  # Tune ended this trial (an interrupted one never gets here): see _collect
                    write_json(self.fs, f"{self.trials_dir}/{trial.trial_id}/{ENDED}", {"status": row["status"]})
                except OSError as e:
                    log.warning("trial %s: could not write %s: %s", trial.trial_id, ENDED, e)
                v = row.get(f"best_{self.metric}")
                val = f"{self.metric}={v:.4f}" if isinstance(v, float) and math.isfinite(v) else ""
                extra = f" ({row['pruned_reason']})" if row["status"] == "pruned" else ""
                print(f"trial {trial.trial_id}: {row['status']:<13} epochs={row['epochs_run']} {val} "
                      f"{_fmt_params(trial.config)}{extra}", flush=True)

            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self._line(trial, error=False)

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self._line(trial, error=True)

        return _Impl(*args, **kwargs)


def _fmt_params(params: Mapping[str, Any]) -> str:
    return " ".join(f"{k.split('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[-1]}={v}"
                    for k, v in sorted(params.items()))


def _searcher(space: SearchSpace, max_concurrent: int) -> Any:
    """Optuna (TPE, seeded), or Tune's variant generator for grid and random search. Tune ignores
    `max_concurrent_trials` for a generator passed in, so the generator gets the limit itself."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if space.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory ..."
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=space.seed))
    return BasicVariantGenerator(random_state=space.seed, max_concurrent=max_concurrent)


def _scheduler(space: SearchSpace) -> Any:
    if space.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="training_iteration", max_t=space.max_t, grace_period=space.grace_period,
                         reduction_factor=space.reduction_factor)


def _trainable(space: SearchSpace, manifest: Mapping[str, Any], trials_uri: str) -> Any:
    import ray
    from ray import tune

    base = space.base.to_dict()
    base["preset"] = space.base.preset
    endpoint = space.base.run.s3_endpoint or space.base.data.s3_endpoint
    # the testing hook's FAULT_ENV as this process sees it: the trials' processes inherit the environment Ray
    # started with, not this process's later changes
    fn = tune.with_parameters(_trial_driver, base=base, manifest=dict(manifest), trials_uri=trials_uri,
                              s3_endpoint=endpoint, fault=_fault_spec() if space.workers_per_trial == 0 else None)
    return tune.with_resources(fn, _trial_resources(space, ray.cluster_resources()))


def _trial_retries(space: SearchSpace) -> int:
    """Tune's restarts of a failed trial. A trial with a worker group has Ray Train's own restarts inside
    (`run.max_failures`), and Tune restarts it once more; a trial that trains in its own process has only Tune's,
    so it gets `run.max_failures` of them (-1: unlimited). Either way the run resumes from its latest checkpoint."""
    return space.base.run.max_failures if space.workers_per_trial == 0 else 1


def _trial_resources(space: SearchSpace, cluster: Mapping[str, float]) -> dict[str, float]:
    """What a trial's own actor holds: a worker's resources when it trains itself (`workers_per_trial: 0`),
    otherwise one CPU for the driver, or a TRAIN_DRIVER slot and no CPU where the cluster advertises them."""
    if space.workers_per_trial == 0:
        return space.base.run.resources_per_worker()
    return {"CPU": 0, "TRAIN_DRIVER": 1} if cluster.get("TRAIN_DRIVER") else {"CPU": 1}


def _tuner(space: SearchSpace, name: str, st: Any, manifest: Mapping[str, Any], resume: bool, out: Any) -> Any:
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from psamf.runtime import placement_group_reclaimer

    search_uri = st.run_uri(name)
    trainable = _trainable(space, manifest, f"{search_uri}/trials")
    exp_path = search_uri if st.storage_filesystem is None else st.run_dir(name)
    if resume:
        if not tune.Tuner.can_restore(exp_path, storage_filesystem=st.storage_filesystem):
            raise ConfigError(f"search {name!r}: nothing to resume at {search_uri} (no Tune experiment state)")
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, restart_errored=True,
                                  param_space=space.param_space(), storage_filesystem=st.storage_filesystem)
    k = space.max_concurrent_trials or max_concurrent_trials(space, ray.cluster_resources())
    log.info("search %s: %d trial(s), %d at a time, %s search, scheduler %s", name, space.num_samples, k,
             space.search, space.scheduler)
    # Tune's own TensorBoard logger is left out: each trial's tensorboard/ (curves + HParams) is psamf's
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                    search_alg=_searcher(space, k), scheduler=_scheduler(space),
                                    max_concurrent_trials=k if space.search == "optuna" else None,
                                    # a trial that trains in its actor leaves it to the next trial (same
                                    # resources): no process to start, no imports to repeat
                                    reuse_actors=space.workers_per_trial == 0,
                                    trial_dirname_creator=lambda t: t.trial_id,
                                    trial_name_creator=lambda t: t.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=st.storage_path, storage_filesystem=st.storage_filesystem,
                                  failure_config=tune.FailureConfig(max_failures=_trial_retries(space)), verbose=0,
                                  callbacks=[JsonLoggerCallback(), CSVLoggerCallback(),
                                             _ConsoleLine(st.fs, f"{st.run_dir(name)}/trials", space.metric,
                                                          space.mode, space.max_t),
                                             placement_group_reclaimer()]),
    )


# =============================================================================================
# Results: table, best config, test once, plots, TensorBoard
# =============================================================================================


@dataclass
class SearchResult:
    """What `run_search` returns. `rows`: one dict per trial (the content of trials.parquet); `best`: the best
    trial's row (None when no trial trained); `metrics`: metrics.json (the best trial's test evaluation)."""

    name: str
    path: str  # URI of the search directory
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    metrics: dict[str, Any] | None
    paths: dict[str, str]
    summary: str
    interrupted: bool = False  # Ctrl+C ended it: trials unfinished or never started, test not evaluated yet


def _read_json_or_none(fs: Any, path: str) -> Any:
    from psamf.storage import exists, read_json

    try:
        return read_json(fs, path) if exists(fs, path) else None
    except (OSError, ValueError):
        return None


def _trial_row(fs: Any, trials_dir: str, trial_id: str, params: Mapping[str, Any], metric: str, mode: str, *,
               error: bool, ended: bool, epochs: int | None = None) -> dict[str, Any]:
    """One trial's table row from its files: pruned.json, done.json, history.json (the Train run's).

    Status: `finished` when the trial wrote done.json or trained all `epochs` (ASHA stops a trial at its last
    report, `max_t`, before it can write done.json); `stopped-early` when it ended otherwise (a scheduler's cut);
    `unfinished` when the search was interrupted while it ran."""
    run_dir = f"{trials_dir}/{trial_id}"
    pruned = _read_json_or_none(fs, f"{run_dir}/pruned.json")
    done = _read_json_or_none(fs, f"{run_dir}/done.json")
    history = _read_json_or_none(fs, f"{run_dir}/history.json") or []
    if pruned is not None:
        status = "pruned"
    elif error:
        status = "error"
    elif done is not None or (epochs is not None and len(history) >= epochs):
        status = "finished"
    else:  # a trial that ended without recording an epoch was interrupted (Ctrl+C), not cut by the scheduler
        status = "stopped-early" if ended and history else "unfinished"
    started = _read_json_or_none(fs, f"{run_dir}/{STARTED}") or {}
    row: dict[str, Any] = {"trial_id": trial_id, "started_utc": started.get("started_utc"), "status": status,
                           "epochs_run": len(history),
                           "sessions": 1 + max((int(r.get("session", 0)) for r in history), default=-1)
                           if history else 0,
                           "pruned_reason": pruned["reason"] if pruned else None}
    row.update({f"config/{k}": v for k, v in sorted(params.items())})
    best = _best_record(history, metric, mode)
    row["best_epoch"] = best["epoch"] if best else None
    for k, v in sorted((best or {}).items()):
        if k.startswith("val_") and isinstance(v, (int, float)) and not isinstance(v, bool):
            row[f"best_{k}"] = float(v)
    row[f"best_{metric}"] = float(best[metric]) if best and metric in best else None
    return row


def _recorded_params(fs: Any, run_dir: str, keys: Sequence[str]) -> dict[str, Any]:
    """A trial's searched values from its own files: pruned.json's params, else its resolved config.yaml."""
    from psamf.storage import exists, read_bytes

    pruned = _read_json_or_none(fs, f"{run_dir}/pruned.json")
    if pruned is not None:
        return {k: v for k, v in (pruned.get("params") or {}).items() if k in keys}
    try:
        cfg = yaml.safe_load(read_bytes(fs, f"{run_dir}/config.yaml")) if exists(fs, f"{run_dir}/config.yaml") else {}
    except (OSError, ValueError):
        return {}
    out = {}
    for k in keys:
        node: Any = cfg
        for part in k.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out[k] = node
    return out


def _best_record(history: Sequence[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The epoch the trial's own selection rule picks (optim.select_metric = the search metric): best value,
    later epoch on ties, NaN worst."""
    best, key = None, None
    for rec in history:
        v = rec.get(metric)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        k = v if mode == "max" else -v
        if key is None or k >= key:
            best, key = dict(rec), k
    return best


def _columns_to_arrow(rows: Sequence[Mapping[str, Any]]) -> Any:
    """A pyarrow table of the rows; a column mixing types (choice of ints and strings) is stored as text."""
    import pyarrow as pa

    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    cols = {}
    for k in keys:
        vals = [r.get(k) for r in rows]
        kinds = {type(v) for v in vals if v is not None}
        if kinds and not (kinds <= {int, float} or len(kinds) == 1):
            vals = [None if v is None else str(v) for v in vals]
        elif kinds == {int, float}:
            vals = [None if v is None else float(v) for v in vals]
        cols[k] = pa.array(vals)
    return pa.table(cols)


def _write_table(fs: Any, search_dir: str, rows: Sequence[Mapping[str, Any]]) -> None:
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from psamf.storage import write_bytes

    table = _columns_to_arrow(rows)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(fs, f"{search_dir}/trials.parquet", buf.getvalue())
    buf = io.BytesIO()
    pacsv.write_csv(table, buf)
    write_bytes(fs, f"{search_dir}/trials.csv", buf.getvalue())


def _pick_best(rows: Sequence[Mapping[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [r for r in rows if r["status"] in ("finished", "stopped-early")
              and isinstance(r.get(f"best_{metric}"), float) and math.isfinite(r[f"best_{metric}"])]
    if not scored:
        return None
    sign = 1 if mode == "min" else -1
    return dict(min(scored, key=lambda r: sign * r[f"best_{metric}"]))


def _best_config(space: SearchSpace, fs: Any, trials_dir: str, best: Mapping[str, Any], name: str) -> Config:
    """The best trial's resolved config with the base's own run section (workers, storage) and a fresh name."""
    from psamf.storage import read_bytes

    d = yaml.safe_load(read_bytes(fs, f"{trials_dir}/{best['trial_id']}/config.yaml"))
    d["run"] = {**space.base.to_dict()["run"], "name": f"{name}-best"}
    cfg = Config.from_dict({k: v for k, v in d.items() if k != "preset"}, source="best trial config")
    cfg.preset = str(d.get("preset", space.base.preset))
    return cfg


def _test_once(space: SearchSpace, st: Any, search_dir: str, best: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Evaluate the best trial's selected checkpoint on valid and, once, on test; write metrics.json."""
    from psamf.metrics import trivial_baselines
    from psamf.storage import exists, write_json

    trial_dir = f"{search_dir}/trials/{best['trial_id']}"
    ck = f"{trial_dir}/checkpoint_epoch={int(best['best_epoch']):03d}"
    if not exists(st.fs, f"{ck}/model.pt"):
        raise RuntimeError(f"search {name}: the best trial's selected checkpoint {ck} is missing")
    ck_uri = ck if st.uri == st.root else f"{st.uri.rstrip('/')}/{ck[len(st.root.rstrip('/')) + 1:]}"
    endpoint = space.base.run.s3_endpoint or space.base.data.s3_endpoint
    ev = _evaluate_test(ck_uri, endpoint)
    metrics = {
        "search": name, "best_trial": best["trial_id"],
        "params": {k[len("config/"):]: v for k, v in best.items() if k.startswith("config/")},
        "selection": {"rule": "best trial and its checkpoint chosen on validation only; test evaluated once, on "
                              "that checkpoint, after the search", "metric": space.metric, "mode": space.mode,
                      "selected_epoch": best["best_epoch"], "epochs_run": best["epochs_run"],
                      "trial_status": best["status"]},
        "valid": ev["valid"].metrics, "test": ev["test"].metrics,
        "baselines": {"test": trivial_baselines(ev["test"].label, space.base.data.dataset)},
        "checkpoint": ck_uri,
    }
    write_json(st.fs, f"{search_dir}/metrics.json", metrics)
    return metrics


def _write_hparams(fs: Any, trial_dir: str, row: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> None:
    """The trial's tensorboard/: its curves (rewritten from history) plus one HParams session (its
    hyperparameters and best validation metrics), so `tensorboard --logdir <search>` lists every trial."""
    import tempfile

    from torch.utils.tensorboard import SummaryWriter

    from psamf.outputs import write_tensorboard
    from psamf.storage import write_bytes

    tb = write_tensorboard(fs, trial_dir, history)
    hparams = {k[len("config/"):]: (v if isinstance(v, (int, float, str, bool)) else str(v))
               for k, v in row.items() if k.startswith("config/")}
    hparams["status"] = row["status"]
    metrics = {f"hparam/{k[len('best_'):]}": v for k, v in row.items()
               if k.startswith("best_val_") and isinstance(v, float) and math.isfinite(v)}
    metrics["hparam/epochs_run"] = float(row["epochs_run"])
    with tempfile.TemporaryDirectory(prefix="psamf-hp-") as tmp:
        w = SummaryWriter(log_dir=tmp)
        w.add_hparams(hparams, metrics, run_name=tmp)  # run_name=tmp: the session lands in the trial's own run
        w.close()
        for name in sorted(os.listdir(tmp)):
            if os.path.isfile(os.path.join(tmp, name)):
                with open(os.path.join(tmp, name), "rb") as f:
                    write_bytes(fs, f"{tb}/hparams.{name}", f.read())


def _importance(rows: Sequence[Mapping[str, Any]], space: SearchSpace) -> dict[str, float]:
    """Parameter importance: Optuna's (fANOVA) on a study rebuilt from the table; with few trials or if that
    fails, |Spearman rho| per numeric parameter and the between-group share of variance per categorical one."""
    metric = f"best_{space.metric}"
    done = [r for r in rows if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    if len(done) < 2:
        return {}
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        dists = {dm.key: dm.optuna_distribution() for dm in space.dims}
        study = optuna.create_study(direction="minimize" if space.mode == "min" else "maximize")
        for r in done:
            params = {k: r[f"config/{k}"] for k in dists if f"config/{k}" in r}
            study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                      value=r[metric]))
        imp = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(
            seed=space.seed))
        return {k: float(v) for k, v in imp.items()}
    except Exception as e:  # noqa: BLE001 - fANOVA fails on few/degenerate trials; the fallback is documented
        log.info("optuna importance unavailable (%s): rank-correlation fallback", e)
        return _simple_importance(done, space, metric)


def _simple_importance(rows: Sequence[Mapping[str, Any]], space: SearchSpace, metric: str) -> dict[str, float]:
    import numpy as np

    y = np.array([r[metric] for r in rows], float)
    out = {}
    for dm in space.dims:
        x = [r.get(f"config/{dm.key}") for r in rows]
        if dm.kind in ("uniform", "loguniform", "randint"):
            xr, yr = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
            c = np.corrcoef(xr, yr)[0, 1] if np.std(xr) > 0 and np.std(yr) > 0 else 0.0
            out[dm.key] = float(abs(c))
        else:
            groups = {}
            for xi, yi in zip(x, y):
                groups.setdefault(str(xi), []).append(yi)
            tot = float(np.var(y)) * len(y)
            between = sum(len(g) * (np.mean(g) - y.mean()) ** 2 for g in groups.values())
            out[dm.key] = float(between / tot) if tot > 0 else 0.0
    s = sum(out.values())
    return dict(sorted(((k, v / s if s > 0 else 0.0) for k, v in out.items()), key=lambda kv: -kv[1]))


def _plots(fs: Any, search_dir: str, rows: Sequence[Mapping[str, Any]], space: SearchSpace,
           importance: Mapping[str, float]) -> dict[str, str]:
    """metric_over_trials.png, importance.png, metric_vs_params.png (the two most important parameters)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from psamf.storage import write_bytes

    metric = f"best_{space.metric}"
    scored = [(i, r) for i, r in enumerate(rows) if isinstance(r.get(metric), float) and math.isfinite(r[metric])]
    figs: dict[str, Any] = {}
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if scored:
        xs, ys = [i for i, _ in scored], [r[metric] for _, r in scored]
        ax.scatter(xs, ys, c=["C0" if r["status"] == "finished" else "C1" for _, r in scored])
        run = [min(ys[:j + 1]) if space.mode == "min" else max(ys[:j + 1]) for j in range(len(ys))]
        ax.step(xs, run, where="post", color="k", lw=1, label="best so far")
        ax.legend()
    for i, r in enumerate(rows):
        if r["status"] in ("pruned", "error"):
            ax.axvline(i, color="0.85", lw=0.8)
    ax.set(xlabel="trial (start order; grey: pruned/error; orange: stopped early)", ylabel=space.metric,
           title=f"{space.metric} over trials")
    figs["metric_over_trials"] = fig
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * max(1, len(importance))))
    ax.barh(list(importance)[::-1], list(importance.values())[::-1])
    ax.set(xlabel="importance", title="parameter importance" + ("" if importance else " (too few trials)"))
    figs["importance"] = fig
    top = list(importance)[:2] or [dm.key for dm in space.dims[:2]]
    fig, axes = plt.subplots(1, len(top), figsize=(5 * len(top), 3.5), squeeze=False)
    for ax, key in zip(axes[0], top):
        xs = [r.get(f"config/{key}") for _, r in scored]
        if any(isinstance(x, str) or isinstance(x, bool) or x is None for x in xs):
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], [r[metric] for _, r in scored])
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=7)
        else:
            ax.scatter(xs, [r[metric] for _, r in scored])
            if any(dm.key == key and dm.kind == "loguniform" for dm in space.dims):
                ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=space.metric)
    figs["metric_vs_params"] = fig
    paths = {}
    for name, fig in figs.items():
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        write_bytes(fs, f"{search_dir}/plots/{name}.png", buf.getvalue())
        paths[name] = f"{search_dir}/plots/{name}.png"
    return paths


def _summary(rows: Sequence[Mapping[str, Any]], space: SearchSpace, best: Mapping[str, Any] | None,
             metrics: Mapping[str, Any] | None, best_config: str | None, session: str) -> str:
    """What a search prints at its end: the trial table, the status counts followed by `session` (this session's
    time, or that nothing ran), and the best trial with its one test evaluation."""
    counts = {s: sum(r["status"] == s for r in rows) for s in TRIAL_STATUSES}
    text = (_summary_table(rows, space.metric, space.mode, best) + "\n" + f"{len(rows)} trial(s): "
            + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + session)
    if best is not None and metrics is not None:
        text += (f"\nbest: {best['trial_id']} {space.metric}={best[f'best_{space.metric}']:.4f} (epoch "
                 f"{best['best_epoch']}); test (once): mae={metrics['test'].get('mae', float('nan')):.4f} "
                 f"corr={metrics['test'].get('corr', float('nan')):.4f}\nbest config: {best_config}")
    return text


def _summary_table(rows: Sequence[Mapping[str, Any]], metric: str, mode: str,
                   best: Mapping[str, Any] | None) -> str:
    """One line per trial, best first (trials without a finite metric last, by id)."""
    keys = [k for k in (rows[0] if rows else {}) if k.startswith("config/")]
    head = f"{'trial':<12} {'status':<13} {'epochs':>6} {metric:>10}  params"
    lines = [head, "-" * len(head)]

    def order(r: Mapping[str, Any]) -> tuple:
        v = r.get(f"best_{metric}")
        if not (isinstance(v, float) and math.isfinite(v)):
            return (1, 0.0, r["trial_id"])
        return (0, v if mode == "min" else -v, r["trial_id"])

    for r in sorted(rows, key=order):
        v = r.get(f"best_{metric}")
        vs = f"{v:>10.4f}" if isinstance(v, float) and math.isfinite(v) else f"{'-':>10}"
        mark = " *" if best and r["trial_id"] == best["trial_id"] else ""
        lines.append(f"{r['trial_id']:<12} {r['status']:<13} {r['epochs_run']:>6} {vs}  "
                     f"{_fmt_params({k[len('config/'):]: r[k] for k in keys if k in r})}{mark}")
    return "\n".join(lines)


# =============================================================================================
# Entry point
# =============================================================================================


def run_search(space: SearchSpace, *, name: str, storage_path: str | None = None, resume: bool = False,
               out: Any = None) -> SearchResult:
    """Run (or, with `resume`, continue) a search and write every output. See the module docstring.

    `storage_path` defaults to the base config's `run.storage_path`; the search lives in `<storage_path>/<name>`."""
    from psamf.storage import exists, write_bytes

    out = out or sys.stdout
    if not name or "/" in name:
        raise ConfigError(f"search name must be a non-empty name without '/', got {name!r}")
    from psamf.storage import absolute_local, absolute_model_paths

    endpoint = space.base.run.s3_endpoint or space.base.data.s3_endpoint
    # trials run in their own working directories: relative local paths are resolved here, in the driver
    storage_path = absolute_local(storage_path or space.base.run.storage_path)
    space.base = absolute_model_paths(space.base.replace(
        {"run.storage_path": storage_path, "run.num_workers": space.workers_per_trial,
         "data.uri": absolute_local(space.base.data.uri)}, source=space.source))
    st = _storage(storage_path, endpoint)
    search_dir = st.run_dir(name)
    if not resume and exists(st.fs, f"{search_dir}/search.yaml"):
        raise ConfigError(f"a search named {name!r} already exists at {st.run_uri(name)}; resume it "
                          "(psamf tune --resume NAME) or choose another name")
    if resume:
        stored = _ended_search(space, name, st, out)
        if stored is not None:
            return stored
    pf = _preflight(space.base)  # data and storage checked before Ray starts and any trial runs
    _init_ray(max(1, space.workers_per_trial) * pf.cfg.run.cpus_per_worker)  # one trial's workers (or actor)
    space.base = pf.cfg
    if not resume:
        write_bytes(st.fs, f"{search_dir}/search.yaml", yaml.safe_dump(space.to_saved(), sort_keys=False).encode())
        write_bytes(st.fs, f"{search_dir}/{MARKERS}", b"")
    # A pruned trial (a combination the config rejects) ends without reporting the metric, on purpose: Optuna
    # then records it as PRUNED instead of learning a made-up value. Tune's strict check would turn that into an
    # error of the whole search; the metric itself was validated against the data set's metrics above.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune would add its own TensorBoard logger (an `events` file per trial with `ray/tune/*` tags) next to
    # psamf's per-trial tensorboard/ (curves + HParams): one set of curves per trial is what users should see.
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    _quiet_tune_console()
    ended_before = _ended_trials(st.fs, search_dir)
    t0 = time.perf_counter()
    grid = _tuner(space, name, st, pf.manifest, resume, out).fit()
    elapsed = time.perf_counter() - t0
    return _collect(space, name, st, grid, elapsed, out, ended_before)


def _ended_trials(fs: Any, search_dir: str) -> set[str]:
    """Ids of the trials that carry the ENDED marker of `_ConsoleLine` (ended in an earlier session, when called
    before the Tuner runs)."""
    import pyarrow.fs as pafs

    from psamf.storage import exists

    infos = fs.get_file_info(pafs.FileSelector(f"{search_dir}/trials", allow_not_found=True))
    return {i.base_name for i in infos if i.type == pafs.FileType.Directory and exists(fs, f"{i.path}/{ENDED}")}


def _ended_search(space: SearchSpace, name: str, st: Any, out: Any) -> SearchResult | None:
    """A search whose metrics.json exists (written last) has ended: resuming it starts no Ray, trains nothing and
    evaluates test no second time; its stored outputs are read and summarised. None when it has not ended."""
    import io

    import pyarrow.parquet as pq

    from psamf.storage import exists, read_bytes, read_json

    search_dir = st.run_dir(name)
    if not exists(st.fs, f"{search_dir}/metrics.json"):
        return None
    metrics = read_json(st.fs, f"{search_dir}/metrics.json")
    rows = pq.read_table(io.BytesIO(read_bytes(st.fs, f"{search_dir}/trials.parquet"))).to_pylist()
    best = next((r for r in rows if r["trial_id"] == metrics.get("best_trial")), None)
    uri = st.run_uri(name)
    paths = {"trials": f"{uri}/trials.parquet", "csv": f"{uri}/trials.csv", "best_config": f"{uri}/best.yaml",
             "metrics": f"{uri}/metrics.json",
             **{k: f"{uri}/plots/{k}.png" for k in ("metric_over_trials", "importance", "metric_vs_params")
                if exists(st.fs, f"{search_dir}/plots/{k}.png")}}
    summary = _summary(rows, space, best, metrics, paths.get("best_config"),
                       f"\nsearch {name} had already ended: nothing was trained and test was not evaluated again "
                       f"(metrics.json holds its one evaluation)")
    print(summary, file=out, flush=True)
    return SearchResult(name=name, path=uri, rows=rows, best=best, metrics=metrics, paths=paths, summary=summary)


def _result_trial_id(res: Any) -> str:
    """The trial id of a Tune `Result`. Its directory is named by the trial id (`trial_dirname_creator`), but a
    trial restarted by `Tuner.restore` may get a suffixed directory (`<id>_6bd6`) when the old one exists."""
    tid = (res.metrics or {}).get("trial_id") if isinstance(res.metrics, dict) else None
    if tid:
        return str(tid)
    base = os.path.basename(str(res.path).rstrip("/"))
    head, _, tail = base.rpartition("_")
    return head if head and len(tail) == 4 else base  # trial ids end in 5 digits (variants) or are 8 hex chars


def _collect(space: SearchSpace, name: str, st: Any, grid: Any, elapsed: float, out: Any,
             ended_before: set[str] = frozenset()) -> SearchResult:
    """Rows from the ResultGrid and the trials' files, then every search output (metrics.json last)."""
    from psamf.storage import exists, read_json, write_bytes

    search_dir = st.run_dir(name)
    trials_dir = f"{search_dir}/trials"
    rows = []
    keys = [dm.key for dm in space.dims]
    for res in grid:
        trial_id = _result_trial_id(res)
        params = {k: v for k, v in (res.config or {}).items() if k in keys}
        if len(params) < len(keys):  # a trial that ended before a restore can come back from it without its config
            params = {**_recorded_params(st.fs, f"{trials_dir}/{trial_id}", keys), **params}
        rows.append(_trial_row(st.fs, trials_dir, trial_id, params, space.metric, space.mode,
                               error=res.error is not None, ended=True, epochs=space.max_t))
        if res.error is not None:
            rows[-1]["error"] = str(res.error).splitlines()[0][:300]
    # Ctrl+C ends the running trials without Tune's trial-complete event (and Optuna's later trials are never
    # created): a trial without the ENDED marker of `_ConsoleLine` is unfinished, not stopped by the scheduler.
    # Searches started before the marker existed (no MARKERS file) are judged by their trial count only.
    if exists(st.fs, f"{search_dir}/{MARKERS}"):
        for r in rows:
            if r["status"] in ("finished", "stopped-early") and not exists(
                    st.fs, f"{trials_dir}/{r['trial_id']}/{ENDED}"):
                r["status"] = "unfinished"
    rows.sort(key=lambda r: (r["started_utc"] or "~", r["trial_id"]))  # start order (by id where unrecorded)
    _write_table(st.fs, search_dir, rows)
    for r in rows:
        if r["status"] in ("finished", "stopped-early"):
            history = read_json(st.fs, f"{trials_dir}/{r['trial_id']}/history.json")
            _write_hparams(st.fs, f"{trials_dir}/{r['trial_id']}", r, history)
    importance = _importance(rows, space)
    plots = _plots(st.fs, search_dir, rows, space, importance)
    best = _pick_best(rows, space.metric, space.mode)
    paths = {"trials": f"{st.run_uri(name)}/trials.parquet", "csv": f"{st.run_uri(name)}/trials.csv",
             **{k: v for k, v in plots.items()}}
    metrics = None
    interrupted = sum(r["status"] == "unfinished" for r in rows)
    stopped = bool(interrupted or len(grid) < space.num_samples)
    if stopped:  # test is evaluated once, on the best trial of the whole search
        log.warning("search %s was interrupted (%d of %d trial(s) ended): `psamf tune --resume %s` continues it; "
                    "the best trial is tested once the search has ended", name, len(grid) - interrupted,
                    max(len(grid), space.num_samples), name)
        best = None
    if best is not None:
        cfg = _best_config(space, st.fs, trials_dir, best, name)
        write_bytes(st.fs, f"{search_dir}/best.yaml", cfg.to_yaml().encode())
        metrics = _test_once(space, st, search_dir, best, name)
        paths.update(best_config=f"{st.run_uri(name)}/best.yaml", metrics=f"{st.run_uri(name)}/metrics.json")
    hours = max(elapsed, 1e-9) / 3600
    # the rate counts the trials that ended in this session: a resumed search's earlier trials took no time here
    now = sum(r["status"] != "unfinished" and r["trial_id"] not in ended_before for r in rows)
    summary = _summary(rows, space, best, metrics, paths.get("best_config"),
                       f"; {elapsed:.0f} s this session, {now} trial(s) ended in it ({now / hours:.1f} trials/hour)")
    print(summary, file=out, flush=True)
    return SearchResult(name=name, path=st.run_uri(name), rows=rows, best=best, metrics=metrics, paths=paths,
                        summary=summary, interrupted=stopped)

