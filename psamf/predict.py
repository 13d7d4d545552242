"""Batch prediction: score a prepared shard set, or a small custom manifest, with a trained model on Ray Data.

    predict(source, out, shards=URI | manifest=CSV, ...) -> PredictionReport

`source` names the model: a run name (a directory under `storage_path`, default `runs`), a run directory (its
validation-selected checkpoint) or a checkpoint directory, local or `s3://` (`resolve_source`; resolved once,
here, so every actor loads the same checkpoint even while the run is still writing new ones).

Inputs go through the code that training and evaluation use, never a copy of it:

* `shards`: a prepared shard set (`psamf prepare`); its manifest is checked against the checkpoint's config
  (`psamf.preflight.check_prediction_inputs`: data set, tokenizers, text length, vocabularies, and feature
  widths, which must be the model's), and the split is read by `psamf.data.load_datasets`.
* `manifest`: the `custom` layout (`id, text, audio_path, visual_path`, `label` optional) is read by
  `psamf.sources.read_custom(for_prediction=True)` and prepared with `psamf.prepare.prepare` (same
  validation, same tokenizers and text length as the checkpoint's shards) into a temporary shard set, which
  is then read as above. Meant for small batches of new clips: the temporary shards live on the driver's
  disk (splits small enough are handed to Ray from the driver's memory, see `load_datasets`). When the
  checkpoint was trained on precomputed CLS_p, that pass computes the input's CLS_p with the same encoder.
* Either way the input's CLS_p must come from the encoder the checkpoint was trained on (read from its training
  shards' manifest; `psamf.preflight.check_personality_source`): a mismatch is refused, naming both encoders.

Inference is one `map_batches` over the dataset with an actor pool (`actors` x `BatchPredictor`, each loading
the model once; one GPU each when the cluster has GPUs). Each actor collates its Arrow batch with
`psamf.data.PadCollate`, the collate of training and evaluation (same trimming and padding, same
normalisation: with `data.normalize_features` the statistics of the model's own training shards), and runs the
model's forward without gradients. Predictions do not depend on how rows are grouped into batches beyond float
round-off: padding is masked everywhere in the model.

Output (`OUTPUT_SCHEMA`), one row per input sample: `id` (the sample id as prepare normalises it,
"<video>$_$<clip>"), `score` (float32), `class7` (int8, -3..3: `psamf.metrics.sentiment_class7`), `polarity`
("negative" / "neutral" / "positive": `psamf.metrics.polarity`), `label` (float32; null for a manifest
without labels). `out` ending in `.parquet` is one file, rows in input order, written atomically
(`psamf.storage.write_bytes`; an existing file only with `overwrite`); anything else is a directory written by
Ray Data's `write_parquet` (an empty or new directory only), with `_predictions.json` (row count, files,
checkpoint) written last: a directory without it is incomplete. Before anything is written, the row count must
be the input's and every id must occur exactly once.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from psamf.config import Config, ConfigError

__all__ = ["OUTPUT_SCHEMA", "SUMMARY_NAME", "PredictionReport", "BatchPredictor", "NonFiniteScoreError",
           "resolve_source", "checkpoint_config_at", "predict_dataset", "predict"]

log = logging.getLogger("psamf.predict")

OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("score", pa.float32()), ("class7", pa.int8()),
                           ("polarity", pa.string()), ("label", pa.float32())])
SUMMARY_NAME = "_predictions.json"  # written last into an output directory


@dataclass
class PredictionReport:
    """What `predict` did: where, how many rows, from which checkpoint, how fast."""

    out: str
    rows: int
    checkpoint: str
    input: str
    seconds: float  # wall time of the whole call (Ray already running)
    files: list[str] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def resolve_source(source: str, *, storage_path: str | None = None, s3_endpoint: str | None = None) -> str:
    """The URI of the checkpoint directory `source` means: a run name (under `storage_path`), a run directory
    (its validation-selected checkpoint, found inside that directory) or a checkpoint directory."""
    from psamf.checkpoint import resolve_checkpoint
    from psamf.config import RunConfig
    from psamf.storage import exists, resolve

    uri = source
    is_name = "://" not in source and "/" not in source and not os.path.exists(source)
    if is_name:
        st = resolve(storage_path or RunConfig().storage_path, s3_endpoint)
        if not exists(st.fs, st.run_dir(source)):
            raise ConfigError(f"no run named {source!r} under {st.uri} (give --storage-path, a run directory or a "
                              "checkpoint directory)")
        uri = st.run_uri(source)
    fs, path = resolve_checkpoint(uri, s3_endpoint=s3_endpoint)
    root = resolve(uri, s3_endpoint).root
    return uri if path.rstrip("/") == root.rstrip("/") else f"{uri.rstrip('/')}/{path.rsplit('/', 1)[-1]}"


def checkpoint_config_at(checkpoint: str, *, s3_endpoint: str | None = None,
                         overrides: Sequence[str] = ()) -> Config:
    """The config a checkpoint directory carries (only config.yaml is read, not the weights)."""
    import yaml

    from psamf.storage import read_bytes, resolve

    st = resolve(checkpoint, s3_endpoint)
    path = st.join("config.yaml")
    try:
        raw = yaml.safe_load(read_bytes(st.fs, path)) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{checkpoint}/config.yaml: cannot read the checkpoint's config ({e})") from None
    return Config.from_dict(raw, source=f"{checkpoint}/config.yaml").override(list(overrides))


def _assigned_cpus() -> int:
    """Whole CPUs Ray assigned to this actor (0 outside a Ray worker: the driver keeps torch's default)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
        return 0
    return int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))


class NonFiniteScoreError(ValueError):
    """The model gave a NaN or inf score (raised in a prediction actor, reported by `predict` in one line)."""


class BatchPredictor:
    """The `map_batches` callable: loads the model once per actor, scores one Arrow batch per call.

    Arrow in, Arrow out: the rows reach `PadCollate` as Ray Data holds them (no numpy round-trip of the
    ragged frame columns), and the output is already the file's schema."""

    def __init__(self, checkpoint: str, *, s3_endpoint: str | None = None, overrides: Sequence[str] = (),
                 normalization: Mapping[str, Any] | None = None, labelled: bool = True):
        import torch

        from psamf.checkpoint import load_model
        from psamf.data import PadCollate

        device = "cuda" if torch.cuda.is_available() else "cpu"
        threads = _assigned_cpus()
        if threads:  # torch's intra-op threads = the CPUs Ray gave this actor (Ray's OMP_NUM_THREADS may say 1)
            torch.set_num_threads(threads)
        self.model, self.cfg = load_model(checkpoint, s3_endpoint=s3_endpoint, overrides=overrides, device=device)
        self.device = torch.device(device)
        manifest = {"normalization": dict(normalization)} if normalization else None
        self.collate = PadCollate(self.cfg.data, manifest=manifest, sample_ids=True)
        self.labelled = labelled

    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        from psamf.metrics import polarity, sentiment_class7
        from psamf.model import model_inputs

        batch = self.collate(table)
        with torch.inference_mode():
            out = self.model(**{k: v.to(self.device) for k, v in model_inputs(batch).items()})
        score = out.prediction.float().cpu().numpy().astype(np.float32).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(score))
        if bad.size:  # inputs are checked finite before this: a diverged or damaged model
            ids = ", ".join(repr(batch["sample_id"][i]) for i in bad[:5])
            raise NonFiniteScoreError(f"the model scored {bad.size} of {len(score)} sample(s) in a batch as NaN or inf "
                                      f"(ids {ids}{', ...' if bad.size > 5 else ''}): the checkpoint's weights are "
                                      "not finite or the model diverged; nothing was written")
        dataset = self.cfg.data.dataset
        label = batch["label"].numpy().astype(np.float32) if self.labelled else None
        return pa.table({
            "id": pa.array(batch["sample_id"], pa.string()),
            "score": pa.array(score, pa.float32()),
            "class7": pa.array(sentiment_class7(score, dataset), pa.int8()),
            "polarity": pa.array(list(polarity(score, dataset)), pa.string()),
            "label": pa.array(label, pa.float32()) if label is not None else pa.nulls(len(score), pa.float32()),
            "index": pa.array(batch["index"].numpy(), pa.int64()),
        })


def _raised_in_actor(e: BaseException, kind: type[Exception]) -> Exception | None:
    """The `kind` exception an actor raised behind `e`, or None. Ray Data re-raises it on the driver as a
    `RayTaskError(UserCodeException)` that keeps the actor's error only as traceback text: its last
    `module.Kind: message` line is rebuilt."""
    tag = f"{kind.__module__}.{kind.__name__}: "
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, kind):
            return x
        lines = [ln for ln in str(x).splitlines() if ln.startswith(tag)]
        if lines:
            return kind(lines[-1][len(tag):])
        x = getattr(x, "cause", None) or x.__cause__ or x.__context__
    return None


def predict_dataset(ds: Any, checkpoint: str, *, batch_size: int = 64, actors: int = 1, use_gpu: bool = False,
                    cpus_per_actor: float = 1, s3_endpoint: str | None = None, overrides: Sequence[str] = (),
                    normalization: Mapping[str, Any] | None = None, labelled: bool = True) -> Any:
    """`ds` (rows in the shard schema) -> a lazy `ray.data.Dataset` of predictions (OUTPUT_SCHEMA + `index`)."""
    import ray.data

    if batch_size < 1 or actors < 1 or cpus_per_actor <= 0:
        raise ConfigError(f"--batch-size and --actors must be >= 1 and --cpus-per-actor > 0, got {batch_size}, "
                          f"{actors} and {cpus_per_actor}")
    resources: dict[str, float] = {"num_cpus": cpus_per_actor}
    if use_gpu:
        resources["num_gpus"] = 1
    return ds.map_batches(
        BatchPredictor, batch_size=batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs={"checkpoint": checkpoint, "s3_endpoint": s3_endpoint, "overrides": list(overrides),
                               "normalization": normalization, "labelled": labelled},
        **resources)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class _Training:
    """What prediction needs from the checkpoint's training shards (`data.uri` of its config.yaml)."""

    normalization: dict[str, Any] | None  # their feature statistics when the model normalises its inputs
    personality: str | None  # the encoder of the CLS_p the model was trained on (`personality_source`); None: unknown
    precomputed: bool  # that CLS_p came precomputed in the shards (a manifest input then gets it computed too)


def _training_facts(cfg: Config, trained_cfg: Config, converted: bool = False) -> _Training:
    """Read from the training shards' manifest. `cfg`: the checkpoint's config with the command line's data.*
    overrides (where the training shards are now); `trained_cfg`: the config as trained (how it read them)."""
    from psamf.preflight import personality_source
    from psamf.shards import read_manifest

    try:
        man = read_manifest(cfg.data.uri, cfg.data.s3_endpoint)
    except ConfigError as e:
        if cfg.data.normalize_features:
            raise ConfigError(f"the checkpoint normalises its inputs (data.normalize_features=true) with the "
                              f"statistics of its training shards, data.uri={cfg.data.uri!r}, which cannot be read: "
                              f"{e}") from None
        if cfg.model.use_personality and not converted:  # a converted checkpoint names no shards it trained on
            log.warning("the checkpoint's training shards (data.uri=%s) cannot be read (%s): which personality "
                        "encoder its CLS_p came from is not checked against the input", cfg.data.uri, e)
        return _Training(None, None, False)
    if cfg.data.normalize_features and "normalization" not in man:
        raise ConfigError(f"the checkpoint normalises its inputs (data.normalize_features=true), but its training "
                          f"shards at {cfg.data.uri} record no normalisation statistics")
    source = personality_source(trained_cfg.replace({"data.uri": cfg.data.uri}, source="psamf predict"), man)
    precomputed = bool(source and man.get("personality_cls") and trained_cfg.data.use_precomputed_personality)
    return _Training(man.get("normalization") if cfg.data.normalize_features else None, source, precomputed)


def _personality_encoder_for(cfg: Config, trained: _Training) -> Any:
    """The ModelConfig that makes `prepare` precompute a manifest input's CLS_p with the encoder the checkpoint was
    trained on (None when it was not trained on precomputed CLS_p, or that encoder cannot be named again)."""
    from psamf.prepare import describe_personality_model
    from psamf.storage import same_model_name

    if not (trained.precomputed and cfg.data.use_precomputed_personality):
        return None
    described = trained.personality.startswith(("random-init ", "in-memory ", "an unrecorded "))
    for name in (None,) if described else (None, trained.personality):  # the seeded random-init one, or a name
        mc = dataclasses.replace(cfg.model, personality_model=name)
        if same_model_name(describe_personality_model(mc), trained.personality):
            return mc
    return None  # "in-memory ..." or an unrecorded encoder: check_personality_source refuses the input


def _prepare_manifest(path: str, cfg: Config, out_dir: str, trained: _Training, ray_cpus: int) -> tuple[str, bool]:
    """A custom manifest -> a temporary shard set in `out_dir`, through prepare's own validation and
    tokenisation with the checkpoint's tokenizers and text length, and, when the checkpoint was trained on
    precomputed CLS_p, that CLS_p computed with the same encoder. Returns (split, labelled)."""
    from psamf.prepare import prepare
    from psamf.sources import PREDICT_SPLIT, read_custom

    raw = read_custom(path, cfg.data.dataset, for_prediction=True)
    for fld, dim, name in (("audio_path", raw.audio_dim, "audio_dim"), ("visual_path", raw.visual_dim, "visual_dim")):
        if dim != getattr(cfg.model, name):
            raise ConfigError(f"{path}: field {fld!r}: the feature files have width {dim}, but the checkpoint's "
                              f"model takes model.{name}={getattr(cfg.model, name)}")
    encoder = _personality_encoder_for(cfg, trained)
    if encoder is not None:  # prepare's CLS_p pass runs on Ray: start it as large as the prediction will need
        from psamf import runtime

        runtime.init_ray(ray_cpus)
    prepare(raw, out_dir, tokenizer=cfg.data.tokenizer, personality_tokenizer=cfg.data.personality_tokenizer,
            max_text_len=cfg.data.max_text_len, require_train=False, personality_model=encoder)
    return PREDICT_SPLIT, raw.labelled


def _check_input(cfg: Config, uri: str, split: str, s3_endpoint: str | None,
                 trained: _Training) -> tuple[Config, dict[str, Any]]:
    """(config reading `uri`, its manifest), after the prediction preflight (no Ray needed yet)."""
    from psamf.preflight import check_personality_source, check_prediction_inputs
    from psamf.shards import read_manifest

    cfg = cfg.replace({"data.uri": uri, "data.s3_endpoint": s3_endpoint or cfg.data.s3_endpoint},
                      source="psamf predict")
    man = read_manifest(uri, cfg.data.s3_endpoint)
    check_prediction_inputs(cfg, man, split)
    check_personality_source(cfg, man, trained.personality)
    return cfg, man


# ---------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------


def _check_complete(ids: Sequence[str], expected: int) -> None:
    if len(ids) != expected:
        raise RuntimeError(f"predicted {len(ids)} rows but the input has {expected}")
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"{len(ids) - len(set(ids))} sample id(s) predicted more than once")


def _write_file(preds: Any, out: str, s3_endpoint: str | None, expected: int) -> list[str]:
    """All predictions, in input order, as one Parquet file written in one atomic step."""
    import ray

    from psamf.storage import resolve, write_bytes

    tables = [t for t in ray.get(preds.to_arrow_refs()) if t.num_rows]
    table = pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.append(pa.field("index", pa.int64())).empty_table()
    table = table.sort_by("index").drop_columns(["index"]).cast(OUTPUT_SCHEMA)
    _check_complete(table.column("id").to_pylist(), expected)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    st = resolve(out, s3_endpoint)
    write_bytes(st.fs, st.root, buf.getvalue())
    return [out]


def _is_file_output(out: str) -> bool:
    return out.rstrip("/").endswith(".parquet")


def _check_output(out: str, s3_endpoint: str | None, overwrite: bool = False) -> None:
    """An output directory must be new or empty, an output file new unless `overwrite` (checked before Ray
    starts: earlier predictions are never replaced by accident)."""
    import pyarrow.fs as pafs

    from psamf.storage import resolve

    st = resolve(out, s3_endpoint)
    if _is_file_output(out):
        kind = st.fs.get_file_info(st.root).type
        if kind == pafs.FileType.Directory:
            raise ConfigError(f"--out {out}: is a directory; a .parquet --out names one file (give a directory name "
                              "without .parquet for a directory output)")
        if not overwrite and kind != pafs.FileType.NotFound:
            raise ConfigError(f"--out {out}: exists; name a new file, or pass --overwrite to replace it (the new "
                              "file replaces it in one step, once every prediction is made)")
        return
    if st.fs.get_file_info(pafs.FileSelector(st.root, allow_not_found=True)):
        raise ConfigError(f"--out {out}: the directory is not empty; predictions go into a new or empty directory "
                          "(or name a .parquet file)")


def _write_dir(preds: Any, out: str, s3_endpoint: str | None, expected: int, summary: dict[str, Any]) -> list[str]:
    """Ray Data's write_parquet into a new or empty directory, then `_predictions.json` (last)."""
    import pyarrow.fs as pafs
    import ray

    from psamf.storage import resolve, write_json

    st = resolve(out, s3_endpoint)
    done = preds.materialize()  # predictions only (five small columns): checked before anything is written
    _check_complete([i for t in ray.get(done.select_columns(["id"]).to_arrow_refs())
                     for i in t.column("id").to_pylist()], expected)
    done.drop_columns(["index"]).write_parquet(st.storage_path, filesystem=st.storage_filesystem)
    files = sorted(i.base_name for i in st.fs.get_file_info(pafs.FileSelector(st.root))
                   if i.base_name.endswith(".parquet"))
    write_json(st.fs, st.join(SUMMARY_NAME), dict(summary, rows=expected, files=files,
                                                   columns=[f.name for f in OUTPUT_SCHEMA]))
    return [f"{out.rstrip('/')}/{f}" for f in files]


# ---------------------------------------------------------------------------------------------
# The whole command
# ---------------------------------------------------------------------------------------------


def predict(source: str, out: str, *, shards: str | None = None, split: str | None = None,
            manifest: str | None = None,
            batch_size: int = 64, actors: int = 1, use_gpu: bool | None = None, cpus_per_actor: float = 1,
            s3_endpoint: str | None = None, storage_path: str | None = None,
            overrides: Sequence[str] = (), overwrite: bool = False) -> PredictionReport:
    """Score `shards` (one split, default test) or `manifest` (whole) with the model `source` names; write `out`.
    See the module docstring. `use_gpu=None`: one GPU per actor when the Ray cluster has GPUs. Raises ConfigError
    (bad input, naming the field and file) or ValueError (a bad manifest row, from the reader and prepare)."""
    import ray

    from psamf import runtime
    from psamf.data import load_datasets

    if (shards is None) == (manifest is None):
        raise ConfigError("give exactly one input: --shards URI or --manifest CSV")
    if manifest is not None and split is not None:
        raise ConfigError(f"--split {split}: a split is chosen from --shards only; a --manifest is scored whole "
                          f"(its split column, if any, is ignored)")
    split = split or "test"
    fixed = [o for o in overrides if not o.split("=", 1)[0].startswith(("data.", "run."))]
    if fixed:
        raise ConfigError(f"overrides {fixed}: only data.* and run.* keys can change for prediction (the model, its "
                          "loss and optimiser are the checkpoint's)")
    t0 = time.perf_counter()
    ck = resolve_source(source, storage_path=storage_path, s3_endpoint=s3_endpoint)
    from psamf.checkpoint import is_converted
    from psamf.storage import resolve

    trained_cfg = checkpoint_config_at(ck, s3_endpoint=s3_endpoint)
    cfg = trained_cfg.override(list(overrides))
    ck_st = resolve(ck, s3_endpoint)
    trained = _training_facts(cfg, trained_cfg, is_converted(ck_st.fs, ck_st.root))
    what = manifest if manifest is not None else f"{shards} (split {split})"
    _check_output(out, s3_endpoint, overwrite)
    with tempfile.TemporaryDirectory(prefix="psamf-predict-") as tmp:
        labelled, uri = True, shards
        if manifest is not None:  # everything that can refuse the input runs before Ray starts
            uri = os.path.join(tmp, "shards")
            split, labelled = _prepare_manifest(manifest, cfg, uri, trained, math.ceil(actors * cpus_per_actor))
        cfg, man = _check_input(cfg, str(uri), split, s3_endpoint, trained)
        n = int(man["counts"][split])
        runtime.init_ray(math.ceil(actors * cpus_per_actor))
        if use_gpu is None:
            use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        ds = load_datasets(cfg.data, man, (split,))[split]
        preds = predict_dataset(ds, ck, batch_size=batch_size, actors=actors, use_gpu=use_gpu,
                                cpus_per_actor=cpus_per_actor, s3_endpoint=s3_endpoint, overrides=overrides,
                                normalization=trained.normalization, labelled=labelled)
        try:
            if _is_file_output(out):
                files = _write_file(preds, out, s3_endpoint, n)
            else:
                files = _write_dir(preds, out, s3_endpoint, n, {"checkpoint": ck, "input": what})
        except Exception as e:  # Ray wraps an actor's error twice: report a NaN score as itself, in one line
            cause = _raised_in_actor(e, NonFiniteScoreError)
            if cause is None:
                raise
            raise NonFiniteScoreError(f"{ck}: {cause}") from None
    report = PredictionReport(out=out, rows=n, checkpoint=ck, input=what, seconds=time.perf_counter() - t0,
                              files=files)
    log.info("predicted %d samples from %s with %s -> %s (%.1f samples/s)", n, what, ck, out, report.samples_per_s)
    return report
