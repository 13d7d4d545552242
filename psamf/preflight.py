"""Every check that can fail before a Ray worker starts, with one exception type (`ConfigError`, exit status 2).

    preflight(cfg) -> Preflight(cfg, manifest, storage)

It compares the config with the prepared shards' manifest (data set identity, tokenizers and vocabularies,
text length, personality CLS width, split sizes against batch size x workers), takes the feature dims from the
manifest (they are data facts: a differing config value is replaced, with a log line), checks that a re-used
run name resumes a compatible run, and that the cluster can run the workers without starving Ray Data of CPUs
(docs/ray-operations.md §2). Nothing is written before it passes.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Mapping

import yaml

from psamf import runtime, shards
from psamf.config import Config, ConfigError
from psamf.engine import LOSS_TERMS, selectable_metrics
from psamf.storage import exists, read_bytes, resolve

__all__ = ["Preflight", "preflight", "read_manifest", "check_resume_compatible", "check_cluster_resources",
           "check_placeholders", "PLACEHOLDERS", "check_prediction_inputs", "personality_source",
           "check_personality_source"]

# the capitals the job configs and cluster files ship with (jobs/configs/*.yaml): a value holding one was not set
PLACEHOLDERS = re.compile(r"YOUR-[A-Z0-9-]+|PATH-OR-HUB")

log = logging.getLogger("psamf.preflight")


@dataclass
class Preflight:
    cfg: Config  # with the manifest's feature dims
    manifest: dict[str, Any]
    storage: Any  # psamf.storage.Location of run.storage_path


def read_manifest(uri: str, endpoint: str | None) -> dict[str, Any]:
    """The shards' manifest (`psamf.shards.read_manifest`); every failure is a `ShardError` (a ConfigError) that
    names the file."""
    return shards.read_manifest(uri, endpoint)


def _check_selection(cfg: Config) -> None:
    o = cfg.optim
    valid_keys = selectable_metrics(cfg.data.dataset)
    if o.select_metric not in valid_keys:
        raise ConfigError(f"optim.select_metric={o.select_metric!r} is not a validation metric of "
                          f"data.dataset={cfg.data.dataset!r}; choose one of {valid_keys}")
    lower_better = o.select_metric in ("val_loss", "val_mae") or o.select_metric in (f"val_{t}" for t in LOSS_TERMS)
    if (o.select_mode == "max") == lower_better:
        log.warning("optim.select_mode=%s with select_metric=%s: is that intended?", o.select_mode, o.select_metric)
    if o.select_metric in {f"val_{t}" for t in LOSS_TERMS if t != "l1"} and cfg.run.num_workers > 1:
        log.warning("optim.select_metric=%s is an in-batch loss term: each of the %d workers computes it on its "
                    "part of every validation batch, so its value, and the epoch it selects, depend on "
                    "run.num_workers (val_loss, val_mae and the accuracies do not)", o.select_metric,
                    cfg.run.num_workers)


def check_placeholders(cfg: Config, source: str | None = None) -> None:
    """Refuse a config that still holds a placeholder of the shipped job configs (`s3://YOUR-BUCKET/...`,
    `PATH-OR-HUB`), naming every key to set. Called before Ray starts: such a run could only fail later, after
    an embedded Ray has started, with a credentials error that names no key."""
    found = [f"{sec}.{k}={v!r}" for sec, fields in cfg.to_dict().items() if isinstance(fields, dict)
             for k, v in fields.items() if isinstance(v, str) and PLACEHOLDERS.search(v)]
    if found:
        where = source or getattr(cfg, "source", None) or "the config"
        raise ConfigError(f"{where}: placeholder value(s) not replaced: {', '.join(found)}; set "
                          f"{', '.join(f.split('=', 1)[0] for f in found)} in the file or as key=value on the command "
                          "line (model.personality_model=null trains without the pretrained personality BERT)")


_TEXT_LEN_SAID: set[tuple[str, int, int]] = set()


def _model_from_manifest(cfg: Config, man: Mapping[str, Any]) -> dict[str, Any]:
    """The config as a dict with the manifest's feature dims and text length (data facts fixed by `psamf
    prepare`: the manifest is authoritative, so `psamf train --preset tiny data.uri=...` works on shards of any
    text length the model's position table holds)."""
    d = cfg.to_dict()
    L = ((man.get("tokenizers") or {}).get("text") or {}).get("max_len")
    if L is not None and int(L) != d["data"]["max_text_len"]:
        said = (d["data"]["uri"], d["data"]["max_text_len"], int(L))
        if said not in _TEXT_LEN_SAID:  # once per process and data set: a study preflights every run
            _TEXT_LEN_SAID.add(said)
            log.info("data.max_text_len: %d -> %d (from the shards' manifest)", d["data"]["max_text_len"], int(L))
        d["data"]["max_text_len"] = int(L)
    dims = man.get("feature_dims") or {}
    for key, name in (("audio", "audio_dim"), ("visual", "visual_dim")):
        if key in dims and int(dims[key]) != d["model"][name]:
            log.info("model.%s: %d -> %d (from the shards' manifest)", name, d["model"][name], int(dims[key]))
            d["model"][name] = int(dims[key])
    return d


def _check_model_fits_shards(cfg: Config, man: Mapping[str, Any]) -> None:
    """Vocabularies, text length and the precomputed personality CLS width against the model."""
    m = cfg.model
    toks = man.get("tokenizers") or {}
    for key, vocab_field, pretrained in (("text", "vocab_size", m.text_model),
                                         ("personality", "personality_vocab_size", m.personality_model)):
        t = toks.get(key)
        if not t or (key == "personality" and not m.use_personality):
            continue
        vs, model_vs = t.get("vocab_size"), getattr(m, vocab_field)
        if vs is not None and int(vs) > model_vs and not pretrained:
            raise ConfigError(f"model.{vocab_field}={model_vs} is smaller than the {key} tokenizer's vocabulary "
                              f"({vs} tokens, {t.get('name')}): token ids would index past the embedding table; "
                              f"set model.{vocab_field}={vs}")
        L = t.get("max_len")
        if L is not None and int(L) > m.max_position_embeddings and key == "text":
            raise ConfigError(f"the shards' text length ({L}) exceeds model.max_position_embeddings "
                              f"({m.max_position_embeddings})")
    pc = man.get("personality_cls")
    if pc and cfg.data.use_precomputed_personality and m.use_personality and not m.personality_model:
        width = int(pc.get("dim", m.hidden_size))
        if width != m.hidden_size and m.personality_tokens:
            raise ConfigError(f"the shards' precomputed personality_cls has width {width} but "
                              f"model.personality_tokens needs model.hidden_size ({m.hidden_size}); set "
                              "data.use_precomputed_personality=false or re-run prepare with this model")


def _warn_unused_personality_model(cfg: Config, man: Mapping[str, Any]) -> None:
    """Training on precomputed CLS_p of another encoder than `model.personality_model`: the shards' CLS_p is what
    the model learns from (and what prediction will require), the named encoder only fills the checkpoint."""
    from psamf.storage import same_model_name

    pc, m = man.get("personality_cls"), cfg.model
    if pc and pc.get("model") and cfg.data.use_precomputed_personality and m.use_personality and m.personality_model \
            and not same_model_name(str(pc["model"]), m.personality_model):
        log.warning("model.personality_model=%s, but the shards at %s hold personality_cls precomputed with %s: "
                    "training reads the shards' CLS_p, and prediction inputs will need CLS_p from %s too "
                    "(data.use_precomputed_personality=false computes it with model.personality_model instead)",
                    m.personality_model, cfg.data.uri, pc["model"], pc["model"])


def check_prediction_inputs(cfg: Config, man: Mapping[str, Any], split: str) -> None:
    """Shards to be scored by a trained model (`psamf predict`): the checks training preflight makes, except
    that the model is fixed, so the shards' feature widths must be the model's (training would adopt them).

    `cfg` is the checkpoint's config with `data.uri` pointing at the shards. Raises ConfigError naming the
    field and the shards."""
    shards.check_manifest(man, cfg.data)
    _check_model_fits_shards(cfg, man)
    dims = man.get("feature_dims") or {}
    for key, name in (("audio", "audio_dim"), ("visual", "visual_dim")):
        if key in dims and int(dims[key]) != getattr(cfg.model, name):
            raise ConfigError(f"the shards at {cfg.data.uri} have {key} features of width {dims[key]}, but the "
                              f"checkpoint's model was trained with model.{name}={getattr(cfg.model, name)}")
    counts = man.get("counts") or {}
    if int(counts.get(split, 0)) <= 0:
        raise ConfigError(f"the shards at {cfg.data.uri} have no {split!r} split (splits: {counts})")


def personality_source(cfg: Config, man: Mapping[str, Any]) -> str | None:
    """The encoder whose CLS_p a model with config `cfg` reads from the shards of manifest `man`: the one that
    precomputed the shards' `personality_cls` (when they have it and `data.use_precomputed_personality`), else the
    model's own frozen encoder (`model.personality_model`, or the seeded random-init one). None: personality off."""
    from psamf.prepare import describe_personality_model

    if not cfg.model.use_personality:
        return None
    pc = man.get("personality_cls")
    if pc and cfg.data.use_precomputed_personality:
        return str(pc.get("model") or "an unrecorded encoder")
    return describe_personality_model(cfg.model)


def check_personality_source(cfg: Config, man: Mapping[str, Any], trained: str | None) -> None:
    """A trained model must read CLS_p from the encoder it was trained with (`trained`: `personality_source` of
    its training config and shards; None: unknown, nothing to compare). Otherwise its predictions would be made
    from a personality vector it never saw, silently: refused, naming both encoders and what to do."""
    from psamf.storage import same_model_name

    now = personality_source(cfg, man)
    if trained is None or now is None or same_model_name(trained, now):
        return
    if man.get("personality_cls") and cfg.data.use_precomputed_personality:
        got = f"the shards at {cfg.data.uri} hold personality_cls precomputed with {now!r}"
    else:
        got = (f"the shards at {cfg.data.uri} hold no precomputed personality_cls (or data.use_precomputed_personality"
               f"=false), so the model's own encoder would compute it: {now!r}")
    raise ConfigError(f"personality_cls: the checkpoint was trained on CLS_p from {trained!r}, but {got}; "
                      f"re-run `psamf prepare --personality-model {trained}` on this input (or, when the shards hold "
                      "CLS_p and the checkpoint's model.personality_model is its training encoder, set "
                      "data.use_precomputed_personality=false)")


def _check_splits(cfg: Config, man: Mapping[str, Any]) -> None:
    counts = man.get("counts") or {}
    for s in ("train", "valid", "test"):
        if int(counts.get(s, 0)) <= 0:
            raise ConfigError(f"the shards at {cfg.data.uri} have no {s!r} split ({counts})")
    workers = max(1, cfg.run.num_workers)
    if int(counts["train"]) < cfg.optim.batch_size * workers:
        raise ConfigError(f"train split has {counts['train']} samples: fewer than optim.batch_size "
                          f"({cfg.optim.batch_size}) x run.num_workers ({workers}); no full batch per worker")


def _check_bucket(cfg: Config, storage: Any) -> None:
    """An object-store run.storage_path must name an existing bucket: Ray's first write would otherwise create it
    (pyarrow's S3 filesystem does) or fail deep in a worker. Buckets are never created implicitly (`aws s3`)."""
    import pyarrow.fs as pafs

    if "://" not in cfg.run.storage_path or cfg.run.storage_path.startswith("file://"):
        return
    bucket = storage.root.lstrip("/").split("/", 1)[0]
    try:
        info = storage.fs.get_file_info(bucket)
    except OSError as e:
        raise ConfigError(f"run.storage_path={cfg.run.storage_path!r}: cannot access bucket {bucket!r}: {e}") from None
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"run.storage_path={cfg.run.storage_path!r}: bucket {bucket!r} does not exist (psamf never "
                          "creates buckets; create it or fix the path)")


def _has_checkpoint(storage: Any, name: str) -> bool:
    import pyarrow.fs as pafs

    sel = pafs.FileSelector(storage.run_dir(name), allow_not_found=True)
    return any(re.fullmatch(r"checkpoint_epoch=\d+", i.base_name) for i in storage.fs.get_file_info(sel))


DATA_RECORD = "data.json"  # in a run directory: which prepared data set (data_version) the run started on


def data_record(cfg: Config, man: Mapping[str, Any]) -> dict[str, Any]:
    """What a run records of its data set when it starts (`DATA_RECORD`), for the resume check."""
    return {"uri": cfg.data.uri, "data_version": man.get("data_version"), "created_utc": man.get("created_utc"),
            "counts": man.get("counts")}


def _check_same_data(cfg: Config, storage: Any, man: Mapping[str, Any]) -> None:
    """A resumed run must train on the data set it started on: `psamf prepare` into the same directory gives the
    data set a new data_version, and resuming would continue on other samples, select the epoch on two different
    validation sets and test on a third test set."""
    path = f"{storage.run_dir(cfg.run.name)}/{DATA_RECORD}"
    if not exists(storage.fs, path):  # a run from before the record existed: nothing to compare
        return
    from psamf.storage import read_json

    old = read_json(storage.fs, path)
    old = old if isinstance(old, dict) else {}
    was, now = old.get("data_version"), man.get("data_version")
    if was and now and was != now:
        raise ConfigError(f"run.name={cfg.run.name!r} started on the data set at {old.get('uri')} with data_version "
                          f"{was} (prepared {old.get('created_utc')}); {cfg.data.uri} now holds data_version {now} "
                          f"(prepared {man.get('created_utc')}): it was prepared again. Resuming would train on "
                          "other data; choose a new run.name")


def _check_run_name(cfg: Config, man: Mapping[str, Any] | None = None) -> Any:
    """The resolved storage; a re-used run name must resume a compatible run, on the same data set. A run directory
    without any checkpoint is a run that never finished an epoch: it does not hold its name (its config.yaml is
    replaced)."""
    storage = resolve(cfg.run.storage_path, cfg.run.s3_endpoint or cfg.data.s3_endpoint)
    _check_bucket(cfg, storage)
    old_cfg_path = f"{storage.run_dir(cfg.run.name)}/config.yaml"
    try:
        if exists(storage.fs, old_cfg_path) and not _has_checkpoint(storage, cfg.run.name):
            log.info("run %s has no checkpoint (it never finished an epoch): starting it afresh", cfg.run.name)
        elif exists(storage.fs, old_cfg_path):
            old = Config.from_dict(yaml.safe_load(read_bytes(storage.fs, old_cfg_path)) or {}, source=old_cfg_path)
            check_resume_compatible(old, cfg)
            if man is not None:
                _check_same_data(cfg, storage, man)
    except OSError as e:
        raise ConfigError(f"run.storage_path={cfg.run.storage_path!r}: cannot access {storage.run_uri(cfg.run.name)}"
                          f": {e}") from None
    return storage


def preflight(cfg: Config, *, check_resources: bool = True, manifest: Mapping[str, Any] | None = None) -> Preflight:
    """Every check that can fail before any Ray worker starts. Returns the config with the manifest's feature
    dims. Raises ConfigError with a message naming the field."""
    check_placeholders(cfg)
    _check_selection(cfg)
    man = dict(manifest) if manifest is not None else read_manifest(cfg.data.uri, cfg.data.s3_endpoint)
    new = Config.from_dict(_model_from_manifest(cfg, man), source="config (with manifest dims)")
    new.preset = cfg.preset
    shards.check_manifest(man, new.data)
    _check_model_fits_shards(new, man)
    _warn_unused_personality_model(new, man)
    _check_splits(new, man)
    storage = _check_run_name(new, man)
    if check_resources:
        check_cluster_resources(new)
    return Preflight(cfg=new, manifest=man, storage=storage)


# optim fields a resumed run may change: how long it trains, when it stops, and how fast each step runs.
# Every other optim field is the run's recipe: the learning rates, weight decays and plateau schedule come back
# from the checkpoint's optimiser and scheduler states (a new value would be silently ignored), and a new batch
# size, accumulation or clipping would change the run half-way while its config.yaml claimed one recipe.
RESUMABLE_OPTIM = ("epochs", "early_stop_patience", "amp", "compile")


def check_resume_compatible(old: Config, new: Config) -> None:
    """A re-used run name resumes: the model, loss, data and training recipe must be those of the checkpoints
    (of `optim`, only `RESUMABLE_OPTIM` may change)."""
    diffs = []
    od, nd = old.to_dict(), new.to_dict()
    for sec in ("model", "loss"):
        diffs += [f"{sec}.{k}: {od[sec][k]!r} -> {nd[sec][k]!r}" for k in nd[sec] if od[sec].get(k) != nd[sec][k]]
    for k in ("uri", "dataset", "tokenizer", "personality_tokenizer", "max_text_len"):
        if od["data"].get(k) != nd["data"][k]:
            diffs.append(f"data.{k}: {od['data'].get(k)!r} -> {nd['data'][k]!r}")
    for k in nd["optim"]:
        if k not in RESUMABLE_OPTIM and k in od["optim"] and od["optim"][k] != nd["optim"][k]:
            diffs.append(f"optim.{k}: {od['optim'][k]!r} -> {nd['optim'][k]!r}")
    if diffs:
        raise ConfigError(f"run.name={new.run.name!r} already exists under {new.run.storage_path} with a different "
                          f"configuration; re-using a name resumes that run. Differences: {'; '.join(diffs)}. "
                          "Choose a new run.name (for psamf study, whose runs are named <name>-<row>-seed<k>: a new "
                          "--name), or delete the old run directory.")


def check_cluster_resources(cfg: Config) -> None:
    import ray

    if not ray.is_initialized():
        return
    res = ray.cluster_resources()
    need_cpu = cfg.run.reserved_cpus()
    if cfg.run.use_gpu and res.get("GPU", 0) < max(1, cfg.run.num_workers) * cfg.run.gpus_per_worker:
        msg = (f"run.use_gpu=true with {cfg.run.num_workers} worker(s) x {cfg.run.gpus_per_worker} GPU, but the "
               f"cluster has {res.get('GPU', 0)} GPU(s)")
        if runtime.embedded():
            raise ConfigError(msg + " (embedded local Ray: set run.use_gpu=false)")
        log.warning("%s: waiting for the autoscaler", msg)
    if res.get("CPU", 0) < need_cpu + 1:
        msg = (f"the workers reserve {need_cpu:g} CPU(s) and the cluster has {res.get('CPU', 0):g}: Ray Data read "
               "tasks would starve (docs/ray-operations.md §2); lower run.cpus_per_worker or run.num_workers")
        if runtime.embedded():
            raise ConfigError(msg)
        log.warning("%s (unless the autoscaler adds nodes)", msg)
    for key, amount in cfg.run.worker_resources.items():
        need = max(1, cfg.run.num_workers) * amount
        if res.get(key, 0) < need:
            msg = (f"run.worker_resources needs {need:g} {key!r} for {max(1, cfg.run.num_workers)} worker(s), and the "
                   f"cluster has {res.get(key, 0):g}")
            if runtime.embedded():
                raise ConfigError(msg + " (embedded local Ray: no node has it; drop run.worker_resources)")
            log.warning("%s: waiting for the autoscaler", msg)

