"""The shard contract between the writer (`psamf prepare`) and the readers (`psamf.data`, preflight).

Both sides import these names from here, so the reader never imports the writer:

    MANIFEST_NAME, SCHEMA_VERSION      `<dir>/manifest.json`, written last; its presence = a complete data set
    SHARD_PATTERN                      `<split>-NNNNN.parquet`
    VERSION_PREFIX, PREPARE_MARKER     `v-<id>/` holds one version's shards (and the marker, written first);
                                       the manifest's shard paths name it (`v-<id>/train-00000.parquet`), so
                                       readers join `<dir>/<path>` for both this layout and the older flat one
    TOKEN_COLUMNS, P_TOKEN_COLUMNS     the token columns of the two tokenizers
    BASE_COLUMNS                       what a training / evaluation loop reads (text, speaker, split stay on disk)
    read_manifest(uri, s3_endpoint)    the manifest, or `ShardError` naming the file
    check_manifest(manifest, data_cfg) the one comparison of manifest facts with `DataConfig`
    verify_shards(manifest, uri, ...)  every listed shard exists and its feature widths are the manifest's

Column types and the manifest's fields are described in docs/data-formats.md and in `psamf.prepare`.
Every problem with a shard directory is a `ShardError` (a `ConfigError`): the user fixes it by re-running
`psamf prepare` or by changing the config, never by reading a traceback.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from psamf import datasets
from psamf.config import ConfigError
from psamf.storage import resolve, same_model_name

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "SHARD_PATTERN",
    "TMP_PREFIX",
    "VERSION_PREFIX",
    "PREPARE_MARKER",
    "TOKEN_COLUMNS",
    "P_TOKEN_COLUMNS",
    "BASE_COLUMNS",
    "ShardError",
    "IncompleteDatasetError",
    "read_manifest",
    "check_manifest",
    "verify_shards",
    "looks_like_shard",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TMP_PREFIX = "_tmp-"  # older psamf wrote shards under `_tmp-<uuid>/` first; kept for readers of old notes
VERSION_PREFIX = "v-"  # `<dir>/v-<id>/` holds one prepared version's shards; manifest.json names it
PREPARE_MARKER = ".psamf-prepare"  # written first into every version directory: proof that psamf created it
SHARD_PATTERN = "{split}-{n:05d}.parquet"

TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
P_TOKEN_COLUMNS = ("p_input_ids", "p_attention_mask", "p_token_type_ids")
BASE_COLUMNS = ("index", "sample_id", "label", *TOKEN_COLUMNS, *P_TOKEN_COLUMNS, "text_len",
                "audio", "audio_len", "visual", "visual_len")


class ShardError(ConfigError):
    """A prepared shard directory cannot be used: missing or unreadable manifest, wrong schema version, or
    facts that contradict the config. The message names the file or the config field."""


class IncompleteDatasetError(ShardError, FileNotFoundError):
    """The shard directory has no manifest.json: prepare never finished (or is running) there.

    Also a FileNotFoundError, for callers that treat "nothing there" separately."""


def looks_like_shard(name: str) -> bool:
    """Whether a file name matches SHARD_PATTERN (`<split>-NNNNN.parquet`); prepare's commit deletes these."""
    if not name.endswith(".parquet"):
        return False
    split, _, num = name[: -len(".parquet")].rpartition("-")
    return bool(split) and len(num) == 5 and num.isdigit()


def read_manifest(uri: str, s3_endpoint: str | None = None, *,
                  storage_options: Mapping[str, Any] | None = None) -> dict:
    """The `manifest.json` of a prepared shard directory (local, `s3://`, `gs://`).

    Raises `IncompleteDatasetError` when it is missing (shards without a manifest are an interrupted or
    running `psamf prepare` and must not be read), `ShardError` when it cannot be read, is not JSON, or has
    another schema version. Read through fsspec (`Location.fsspec`) with its listing cache dropped, so a
    manifest that prepare just replaced is seen.
    """
    fs, root = resolve(uri, s3_endpoint).fsspec(storage_options)
    path = f"{root}/{MANIFEST_NAME}"
    where = f"{uri.rstrip('/')}/{MANIFEST_NAME}"
    fs.invalidate_cache()
    try:
        with fs.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if not fs.exists(root):  # a typo in the path, not an interrupted prepare
            raise IncompleteDatasetError(f"{uri}: no such directory: a prepared data set is the directory `psamf "
                                         "prepare --out` wrote (check data.uri / --shards)") from None
        raise IncompleteDatasetError(
            f"{uri}: no {MANIFEST_NAME} — not a complete prepared data set (psamf prepare was interrupted, is "
            f"still running, or never ran here). Re-run `psamf prepare --out {uri} ...`.") from None
    except OSError as e:
        raise ShardError(f"{where}: cannot read the shard manifest: {e}") from None
    try:
        man = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{where}: not valid JSON ({e}); re-run psamf prepare") from None
    if not isinstance(man, dict):
        raise ShardError(f"{where}: expected a JSON object, got {type(man).__name__}; re-run psamf prepare")
    if man.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{where}: schema_version {man.get('schema_version')!r}, this psamf reads "
                         f"{SCHEMA_VERSION}; re-run psamf prepare")
    return man


def _same_metrics(a: str, b: str) -> bool:
    try:
        return datasets.get(a).metric_family == datasets.get(b).metric_family
    except ValueError:  # an unknown name: not the same
        return False


def check_manifest(manifest: Mapping[str, Any], data_cfg: Any) -> None:
    """The config's data section must describe the shards it reads: data set, tokenizers, text length.

    The one place these facts are compared (preflight before any worker starts, `psamf.data.build_datasets`
    when datasets are built directly). Raises `ShardError` naming the field. Model-side checks (feature dims,
    vocabulary sizes, personality width) belong to preflight, which knows the model.
    """
    uri = data_cfg.uri
    mds = manifest.get("dataset")
    # data.dataset=custom reads any corpus scored with its metrics (MOSI/MOSEI's), never SIMS shards
    if mds and mds != data_cfg.dataset and not (data_cfg.dataset == "custom" and _same_metrics(mds, "custom")):
        raise ShardError(f"data.dataset={data_cfg.dataset!r} but the shards at {uri} hold {mds!r}: "
                         "the metrics (and the preset's dims) would be the wrong ones")
    toks = manifest.get("tokenizers") or {}
    for key, field_name in (("text", "tokenizer"), ("personality", "personality_tokenizer")):
        t = toks.get(key) or {}
        want = getattr(data_cfg, field_name)
        if t.get("name") and not same_model_name(t["name"], want):
            raise ShardError(f"data.{field_name}={want!r} but the shards were tokenised with {t['name']!r}; set "
                             f"data.{field_name}={t['name']} or re-run `psamf prepare`")
    max_len = (toks.get("text") or {}).get("max_len")
    if max_len is not None and data_cfg.max_text_len != int(max_len):
        raise ShardError(f"data.max_text_len={data_cfg.max_text_len} but the shards at {uri} hold {max_len} "
                         "tokens per transcript; set data.max_text_len or re-run `psamf prepare`")


def _frame_width(arrow_type: Any) -> int | None:
    """Feature width of an audio/visual column: ragged list<fixed_size_list[D]> or fixed tensor [T, D]."""
    import pyarrow as pa

    shape = getattr(arrow_type, "shape", None)  # arrow.fixed_shape_tensor (a canonical extension type)
    if shape:
        return int(shape[-1])
    inner = getattr(arrow_type, "value_type", None)
    return int(inner.list_size) if isinstance(inner, pa.FixedSizeListType) else None


def verify_shards(manifest: Mapping[str, Any], uri: str, s3_endpoint: str | None = None, *,
                  splits: Any = None, storage_options: Mapping[str, Any] | None = None) -> None:
    """Every shard the manifest lists (for `splits`, default all) exists, and its audio/visual widths are the
    manifest's `feature_dims`. Reads only Parquet footers. Raises `ShardError` naming the shard and field.

    Why here and before any worker starts: a missing shard or a width that disagrees otherwise surfaces as a
    FileNotFoundError or a broadcast error deep inside a Ray Data task, naming neither file nor field."""
    import pyarrow.parquet as pq

    fs, root = resolve(uri, s3_endpoint).fsspec(storage_options)
    dims = manifest.get("feature_dims") or {}
    base = uri.rstrip("/")
    for s in manifest.get("shards", []):
        if splits is not None and s.get("split") not in splits:
            continue
        where = f"{base}/{s['path']}"
        try:
            with fs.open(f"{root}/{s['path']}", "rb") as f:
                schema = pq.read_schema(f)
        except FileNotFoundError:
            raise ShardError(f"{where}: listed in {MANIFEST_NAME} but missing; the data set is damaged, re-run "
                             "`psamf prepare`") from None
        except (OSError, ValueError) as e:  # pyarrow raises ArrowInvalid (a ValueError) for a non-Parquet file
            raise ShardError(f"{where}: not a readable Parquet shard ({e}); re-run `psamf prepare`") from None
        for modality in ("audio", "visual"):
            if modality not in schema.names or modality not in dims:
                continue
            width = _frame_width(schema.field(modality).type)
            if width is not None and width != int(dims[modality]):
                raise ShardError(f"{where}: column {modality!r} has feature width {width}, but {MANIFEST_NAME} "
                                 f"says feature_dims.{modality}={dims[modality]}; the manifest does not belong "
                                 "to these shards, re-run `psamf prepare`")
