"""Prepare a corpus for training: a `RawDataset` (psamf.sources) -> Parquet shards + `manifest.json`, atomically.

What happens, in order (nothing is written before step 3):

1. **Validate** the whole source in memory: equal list lengths per split, no empty transcript,
   finite labels inside the data set's range, unique sample ids across splits, 2-D frames of the
   declared feature width, no zero-length sequence, no NaN/inf left in the frames. Every failure is a
   `ValueError` naming the field, the split, the sample id and the source files.
2. **Tokenise** every transcript with both HF fast tokenizers (sentiment, personality), right-padded
   and truncated to `max_text_len` — the collate never tokenises. Optionally compute the frozen
   personality encoder's CLS once per utterance with a Ray Data `map_batches` pass.
3. **Write** shards into a new version folder `<out>/v-<id>/` (a `.psamf-prepare` marker first), then
   **swap**: write `manifest.json`, which names the new shards (`v-<id>/train-00000.parquet`), in one
   atomic step (local: write + rename; object stores: one PUT). Readers see the old data set whole until
   then and the new one whole after. Only then are the files the old manifest recorded removed, and the
   marked version folders of prepares killed before their swap. Nothing else is ever deleted: a
   directory that holds other files and no manifest is refused unless `allow_nonempty`, a missing S3
   bucket is refused (never created). Concurrent prepares into the same `<out>` are not supported.

Shards: `<out>/v-<id>/<split>-00000.parquet`, `<split>-00001.parquet`, ... (the manifest lists them relative
to `<out>` and readers use that list, never a glob; data sets of older psamf versions have them flat in `<out>`,
and read the same way). One row per utterance; train rows are written in a seeded
random order (so shards and read windows do not hold one video's utterances together), valid and
test in source order. `index` is a data-set-wide int64 row number in source order (train, then
valid, then test), stable across layouts and re-runs of the same source.

Columns (Arrow types; L = max_text_len, D_a/D_v feature widths, T_a/T_v data-set max lengths):

    index            int64
    sample_id        string                   "<video_id>$_$<clip_id>"
    split            string
    text             string                   the transcript as given
    speaker          string (nullable)
    label            float32
    input_ids, attention_mask, token_type_ids            fixed_size_list<int32>[L]  sentiment tokenizer
    p_input_ids, p_attention_mask, p_token_type_ids      fixed_size_list<int32>[L]  personality tokenizer
    text_len, p_text_len                     int32    real tokens incl. [CLS]/[SEP] (after truncation)
    audio            ragged: list<fixed_size_list<float32>[D_a]>  (only the valid frames)
                     fixed:  arrow.fixed_shape_tensor<float32>[T_a, D_a]  (valid-first, zero-padded)
    audio_len        int32
    visual, visual_len                       as audio
    personality_cls  fixed_size_list<float32>[H_p]   only when computed

Feature values are stored exactly as the source gives them (float32; the readers have already zeroed
NaN/inf and counted it in `repairs`). Normalisation is *not* applied here: the manifest carries the
train-split per-feature mean/std and `psamf.data.PadCollate` applies them at read time when
`DataConfig.normalize_features` is set (so the same shards serve both choices).

Layout: `ragged` by default. Measured on MOSEI-sized synthetic data (docs/benchmarks.md, "Data:
prepare and streaming"): the same bytes on disk as `fixed` (zstd removes the zero padding) but 2.6x
less Arrow in memory / in the object store, and 2-3x the samples/s into a Train worker, because the
collate pads to the batch maximum anyway. Shards default to ~128 MiB of Arrow (`target_shard_mb`), in
row groups of ~32 MiB (`row_group_mb`; Ray 2.60 bin-packs row groups into ~128 MiB read units).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import signal
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from psamf import sources
from psamf.datasets import NAMES as DATASETS
from psamf.shards import (MANIFEST_NAME, PREPARE_MARKER, SCHEMA_VERSION, SHARD_PATTERN, VERSION_PREFIX,
                          looks_like_shard)
from psamf.sources import SOURCE_FORMATS as FORMATS
from psamf.sources import SPLITS, RawDataset, RawSplit
from psamf.progress import Progress, note
from psamf.storage import resolve, write_bytes

log = logging.getLogger(__name__)

LAYOUTS = ("ragged", "fixed")
DEFAULT_LAYOUT = "ragged"  # measured: docs/benchmarks.md, "Data: prepare and streaming"
DEFAULT_TARGET_SHARD_MB = 128.0  # in-memory (uncompressed) Arrow size per shard; 64–512 MiB suit Ray Data
DEFAULT_ROW_GROUP_MB = 32.0  # Ray 2.60 bin-packs row groups into ~128 MiB read units; smaller groups let it balance

__all__ = [
    "LAYOUTS",
    "DEFAULT_LAYOUT",
    "prepare",
    "check_output",
    "describe_repairs",
    "read_manifest_version",
    "validate",
]


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _source_desc(raw: RawDataset) -> str:
    """The source for messages: its first file (the pickle, or the custom manifest) and how many others.

    A custom manifest lists one feature file per sample and modality (hundreds): naming them all would bury
    the one line that matters."""
    files = list(raw.source_files)
    if not files:
        return f"{raw.name} (in-memory RawDataset)"
    if len(files) <= 2:
        return f"{raw.name} ({', '.join(files)})"
    return f"{raw.name} ({files[0]} and {len(files) - 1} feature files it lists)"


def describe_repairs(repairs: Mapping[str, int], source: str) -> str:
    """One line saying what the reader repaired (zeroed NaN/inf values, ...); also recorded in the manifest."""
    done = {k: int(v) for k, v in (repairs or {}).items() if v}
    if not done:
        return f"prepare: no repairs were needed ({source})"
    what = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(done.items()))
    return f"prepare: repairs made while reading {source}: {what} (recorded in manifest.json 'repairs')"


def _split_order(raw: RawDataset) -> list[str]:
    """Canonical splits first (train, valid, test), then any others in insertion order."""
    return [s for s in SPLITS if s in raw.splits] + [s for s in raw.splits if s not in SPLITS]


# ---------------------------------------------------------------------------------------------
# Validation (before anything is written)
# ---------------------------------------------------------------------------------------------


def validate(raw: RawDataset, *, require_train: bool = True) -> None:
    """Raise `ValueError` naming field, split, sample id and source for the first problem found.

    `require_train=False` (samples to score, `psamf predict --manifest`): no train split is needed, since the
    scoring side takes its normalisation statistics from the model's own training shards."""
    src = _source_desc(raw)

    def fail(field: str, split: str, sid: object, problem: str) -> None:
        raise ValueError(f"{field}: {problem} (split={split!r}, sample_id={sid!r}, source={src})")

    if not isinstance(raw, RawDataset):
        raise TypeError(f"expected a psamf.sources.RawDataset, got {type(raw).__name__}")
    if require_train and ("train" not in raw.splits or len(raw.splits["train"]) == 0):
        raise ValueError(f"splits: a non-empty 'train' split is required (normalisation statistics come from "
                         f"it); got {sorted(raw.splits)} (source={src})")
    lo, hi = (float(raw.label_range[0]), float(raw.label_range[1]))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise ValueError(f"label_range: must be finite with lo <= hi, got {raw.label_range} (source={src})")
    for name, dim in (("audio_dim", raw.audio_dim), ("visual_dim", raw.visual_dim)):
        if not (isinstance(dim, (int, np.integer)) and dim >= 1):
            raise ValueError(f"{name}: must be an integer >= 1, got {dim!r} (source={src})")
    seen: dict[str, str] = {}
    for split in _split_order(raw):
        sp = raw.splits[split]
        n = len(sp.ids)
        label = np.asarray(sp.label)
        for field, seq in (("text", sp.text), ("label", label), ("audio", sp.audio), ("visual", sp.visual),
                           ("speaker", sp.speaker)):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{field}: {len(seq)} entries but {n} ids (split={split!r}, source={src})")
        if label.ndim != 1:
            raise ValueError(f"label: expected shape ({n},), got {label.shape} (split={split!r}, source={src})")
        for i, sid in enumerate(sp.ids):
            if not isinstance(sid, str) or not sid:
                fail("sample_id", split, sid, "must be a non-empty string")
            if sid in seen:
                fail("sample_id", split, sid, f"duplicate (also in split {seen[sid]!r})")
            seen[sid] = split
            t = sp.text[i]
            if not isinstance(t, str) or not t.strip():
                fail("text", split, sid, f"empty transcript {t!r}")
            y = float(label[i])
            if not math.isfinite(y):
                fail("label", split, sid, f"not finite ({y})")
            if not lo <= y <= hi:
                fail("label", split, sid, f"{y} outside the label range [{lo}, {hi}]")
            if sp.speaker is not None and sp.speaker[i] is not None and not isinstance(sp.speaker[i], str):
                fail("speaker", split, sid, f"must be a string or None, got {type(sp.speaker[i]).__name__}")
            for field, x, dim in (("audio", sp.audio[i], raw.audio_dim), ("visual", sp.visual[i], raw.visual_dim)):
                x = np.asarray(x)
                if x.ndim != 2:
                    fail(field, split, sid, f"expected (frames, {dim}) frames, got shape {x.shape}")
                if x.shape[1] != dim:
                    fail(field, split, sid, f"feature dim {x.shape[1]} != declared {field}_dim {dim}")
                if x.shape[0] == 0:
                    fail(field, split, sid, "zero length (no valid frames)")
                if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
                    fail(field, split, sid, f"non-numeric dtype {x.dtype}")
                if not np.isfinite(x).all():
                    fail(field, split, sid, "contains NaN/inf (readers must zero and count them in repairs)")


# ---------------------------------------------------------------------------------------------
# Tokenisation and statistics
# ---------------------------------------------------------------------------------------------


def _tokenize(tok, texts: Sequence[str], max_len: int) -> dict[str, np.ndarray]:
    tok.padding_side = "right"  # the collate trims to the batch's longest transcript: pad at the end
    enc = tok(list(texts), max_length=max_len, padding="max_length", truncation=True,
              return_attention_mask=True, return_token_type_ids=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32).reshape(len(texts), max_len)
    mask = np.asarray(enc["attention_mask"], dtype=np.int32).reshape(len(texts), max_len)
    tt = np.asarray(enc["token_type_ids"], dtype=np.int32).reshape(len(texts), max_len)
    full = tok(list(texts), truncation=False, add_special_tokens=True)["input_ids"]
    n_full = np.fromiter((len(x) for x in full), dtype=np.int64, count=len(texts))
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": tt,
            "len": mask.sum(axis=1).astype(np.int32), "full_len": n_full}


def _label_stats(y: np.ndarray) -> dict[str, float | int]:
    y = np.asarray(y, dtype=np.float64)
    if y.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None, "n_zero": 0}
    return {"n": int(y.size), "mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()),
            "max": float(y.max()), "n_zero": int((y == 0).sum())}


def _feature_stats(frames: Sequence[np.ndarray], dim: int) -> dict[str, Any]:
    """Per-feature mean / population std over every valid frame (two passes, float64)."""
    n = sum(int(f.shape[0]) for f in frames)
    s = np.zeros(dim, np.float64)
    for f in frames:
        s += f.sum(axis=0, dtype=np.float64)
    mean = s / max(n, 1)
    ss = np.zeros(dim, np.float64)
    for f in frames:
        d = f.astype(np.float64) - mean
        ss += (d * d).sum(axis=0)
    std = np.sqrt(ss / max(n, 1))
    return {"mean": mean.tolist(), "std": std.tolist(), "n_frames": n}


def _count_frames_bytes(frames: Sequence[np.ndarray]) -> int:
    return sum(int(f.shape[0]) * int(f.shape[1]) for f in frames) * 4


# ---------------------------------------------------------------------------------------------
# Personality CLS: one Ray Data map_batches pass over the personality tokens
# ---------------------------------------------------------------------------------------------


class _PersonalityCLS:
    """Ray Data callable class: personality token ids -> frozen encoder's CLS (float32)."""

    def __init__(self, model: Any, use_gpu: bool = False):
        import torch

        from psamf.config import ModelConfig

        if isinstance(model, ModelConfig):
            from psamf.model import load_personality_encoder

            model = load_personality_encoder(model)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model.eval().to(self.device)
        self.model.requires_grad_(False)

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        import torch

        n = batch.num_rows
        cols = {}
        for c in ("p_input_ids", "p_attention_mask", "p_token_type_ids"):
            arr = batch.column(c).combine_chunks()
            cols[c] = arr.flatten().to_numpy().reshape(n, arr.type.list_size)
        lb = max(1, int(cols["p_attention_mask"].sum(axis=1).max()))  # trimming padding leaves CLS unchanged
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.from_numpy(cols["p_input_ids"][:, :lb].astype(np.int64)).to(self.device),
                attention_mask=torch.from_numpy(cols["p_attention_mask"][:, :lb].astype(np.int64)).to(self.device),
                token_type_ids=torch.from_numpy(cols["p_token_type_ids"][:, :lb].astype(np.int64)).to(self.device),
            ).last_hidden_state[:, 0]
        return {"index": batch.column("index").to_numpy(),
                "personality_cls": out.float().cpu().numpy().astype(np.float32)}


def describe_personality_model(model: Any) -> str:
    from psamf.config import ModelConfig

    if isinstance(model, ModelConfig):
        if model.personality_model:
            return str(model.personality_model)
        from psamf.model import PERSONALITY_INIT_SEED

        return (f"random-init BertModel(layers={model.personality_layers}, hidden={model.hidden_size}, "
                f"vocab={model.personality_vocab_size}, seed={PERSONALITY_INIT_SEED})")
    name = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    return name or f"in-memory {type(model).__name__}"


def compute_personality_cls(index: np.ndarray, p_tokens: Mapping[str, np.ndarray], model: Any, *,
                            batch_size: int = 64, use_gpu: bool | None = None) -> np.ndarray:
    """CLS of the frozen personality encoder for each row, in the order of `index`: (N, H_p) float32.

    `model` is a `psamf.config.ModelConfig` (loaded in the Ray worker via
    `psamf.model.load_personality_encoder`) or an already built HF BertModel-like module (tests).
    Runs as one Ray Data `map_batches` pass (one actor; a GPU when the cluster has one).
    """
    import ray

    from psamf.runtime import init_ray

    init_ray(0)  # the embedded local Ray (loopback, its own token) unless RAY_ADDRESS is set
    n = len(index)
    L = p_tokens["p_input_ids"].shape[1]
    tbl = pa.table({"index": pa.array(index, pa.int64())} | {
        c: pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(p_tokens[c]).reshape(-1)), L)
        for c in ("p_input_ids", "p_attention_mask", "p_token_type_ids")})
    if use_gpu is None:
        use_gpu = bool(ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1)
    n_blocks = max(1, min(64, math.ceil(n / (batch_size * 8))))
    step = math.ceil(n / n_blocks)
    ds = ray.data.from_arrow([tbl.slice(i, step) for i in range(0, n, step)])
    ds = ds.map_batches(_PersonalityCLS, fn_constructor_args=(model, use_gpu), batch_size=batch_size,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1),
                        num_gpus=1 if use_gpu else 0)
    out: np.ndarray | None = None
    pos = {int(v): i for i, v in enumerate(index)}
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        cls = np.asarray(b["personality_cls"], dtype=np.float32)
        if out is None:
            out = np.zeros((n, cls.shape[1]), np.float32)
        for j, ix in enumerate(b["index"]):
            out[pos[int(ix)]] = cls[j]
    assert out is not None
    return out


# ---------------------------------------------------------------------------------------------
# Shard tables
# ---------------------------------------------------------------------------------------------


def _fsl(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), width)


def _frames_column(frames: Sequence[np.ndarray], dim: int, layout: str, t_max: int) -> pa.Array:
    if layout == "ragged":
        lens = np.fromiter((f.shape[0] for f in frames), dtype=np.int64, count=len(frames))
        offsets = np.zeros(len(frames) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        flat = np.concatenate([np.asarray(f, np.float32) for f in frames]).reshape(-1)
        offs_type = pa.int32() if offsets[-1] < 2**31 - 1 else pa.int64()
        inner = _fsl(flat, dim)
        if offs_type == pa.int32():
            return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), inner)
        return pa.LargeListArray.from_arrays(pa.array(offsets), inner)
    padded = np.zeros((len(frames), t_max, dim), np.float32)
    for i, f in enumerate(frames):
        padded[i, : f.shape[0]] = f
    return pa.FixedShapeTensorArray.from_numpy_ndarray(padded)


def _build_table(split: str, sp: RawSplit, rows: np.ndarray, index: np.ndarray, tokens: Mapping[str, np.ndarray],
                 p_tokens: Mapping[str, np.ndarray], cls: np.ndarray | None, *, layout: str,
                 audio_dim: int, visual_dim: int, t_max: Mapping[str, int], max_text_len: int) -> pa.Table:
    L = max_text_len
    audio = [np.asarray(sp.audio[r], np.float32) for r in rows]
    visual = [np.asarray(sp.visual[r], np.float32) for r in rows]
    cols: dict[str, pa.Array] = {
        "index": pa.array(index[rows], pa.int64()),
        "sample_id": pa.array([sp.ids[r] for r in rows], pa.string()),
        "split": pa.array([split] * len(rows), pa.string()),
        "text": pa.array([sp.text[r] for r in rows], pa.string()),
        "speaker": pa.array([sp.speaker[r] for r in rows] if sp.speaker is not None else [None] * len(rows),
                            pa.string()),
        "label": pa.array(np.asarray(sp.label, np.float32)[rows], pa.float32()),
    }
    for prefix, tk in (("", tokens), ("p_", p_tokens)):
        for c in ("input_ids", "attention_mask", "token_type_ids"):
            cols[prefix + c] = _fsl(tk[c][rows], L)
    cols["text_len"] = pa.array(tokens["len"][rows], pa.int32())
    cols["p_text_len"] = pa.array(p_tokens["len"][rows], pa.int32())
    cols["audio"] = _frames_column(audio, audio_dim, layout, t_max["audio"])
    cols["audio_len"] = pa.array([f.shape[0] for f in audio], pa.int32())
    cols["visual"] = _frames_column(visual, visual_dim, layout, t_max["visual"])
    cols["visual_len"] = pa.array([f.shape[0] for f in visual], pa.int32())
    if cls is not None:
        cols["personality_cls"] = _fsl(cls[rows].astype(np.float32), cls.shape[1])
    return pa.table(cols)


def _write_shard(fs, path: str, table: pa.Table, compression: str = "zstd", row_group_rows: int | None = None) -> int:
    """Write one Parquet file through fsspec; returns its size in bytes."""
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, compression=compression, row_group_size=max(1, row_group_rows or table.num_rows),
                       use_dictionary=["split", "speaker"], write_statistics=["index", "label", "text_len",
                                                                              "audio_len", "visual_len"])
    try:
        return int(fs.size(path))
    except Exception:  # noqa: BLE001 - size is informational
        return -1


def _write_shards(fs, root: str, version: str, raw: RawDataset, splits: Sequence[str], rows_per_shard: int,
                  row_group_rows: int, index: Mapping[str, np.ndarray], tokens: Mapping[str, Any],
                  p_tokens: Mapping[str, Any], cls: Mapping[str, np.ndarray | None], *, layout: str,
                  t_max: Mapping[str, int], max_text_len: int, compression: str, shuffle_seed: int,
                  progress: bool) -> tuple[list[dict], pa.Schema]:
    """Every shard into `<root>/<version>/`; returns the manifest's shard entries (paths relative to root)."""
    rng = np.random.default_rng(shuffle_seed)
    shards: list[dict] = []
    schema = None
    n_shards = sum(math.ceil(len(raw.splits[s]) / rows_per_shard) for s in splits)
    with Progress("prepare: writing shards", n_shards, unit="shard", enabled=progress) as bar:
        for s in splits:
            sp = raw.splits[s]
            order = rng.permutation(len(sp)) if s == "train" else np.arange(len(sp))
            for k, lo in enumerate(range(0, len(sp), rows_per_shard)):
                rows = order[lo: lo + rows_per_shard]
                table = _build_table(s, sp, rows, index[s], tokens[s], p_tokens[s], cls[s], layout=layout,
                                     audio_dim=raw.audio_dim, visual_dim=raw.visual_dim, t_max=t_max,
                                     max_text_len=max_text_len)
                name = f"{version}/{SHARD_PATTERN.format(split=s, n=k)}"
                size = _write_shard(fs, _join(root, name), table, compression, row_group_rows)
                shards.append({"path": name, "split": s, "rows": int(table.num_rows), "bytes": size,
                               "arrow_bytes": int(table.nbytes)})
                schema = table.schema
                bar.update(1)
    assert schema is not None
    return shards, schema


def read_manifest_version(fs, root: str) -> str | None:
    """The `data_version` the manifest at `root` names (None: none, unreadable, or the older flat layout)."""
    try:
        with fs.open(_join(root, MANIFEST_NAME), "rb") as f:
            v = json.loads(f.read()).get("data_version")
    except Exception:  # noqa: BLE001 - only used to decide what this run may clean up
        return None
    return v if isinstance(v, str) else None


# ---------------------------------------------------------------------------------------------
# Commit (the atomic part)
# ---------------------------------------------------------------------------------------------


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


FAULT_ENV = "PSAMF_PREPARE_FAULT"  # testing hook: "before-manifest" -> SIGKILL self after the shards, before the swap


def _fault(point: str) -> None:
    """Die like a killed process (no cleanup, no finally) at `point` when FAULT_ENV names it (fault tests)."""
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


def _is_local_fs(fs: Any) -> bool:
    proto = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in proto or "local" in proto


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _is_psamf_leftover(fs: Any, entry: Mapping[str, Any]) -> bool:
    """A `v-<id>/` directory holding PREPARE_MARKER: written by a prepare that never got to its manifest."""
    name = _basename(entry["name"])
    return (entry.get("type") == "directory" and name.startswith(VERSION_PREFIX)
            and fs.exists(_join(entry["name"].rstrip("/"), PREPARE_MARKER)))


def check_output(out_uri: str, *, s3_endpoint: str | None = None, storage_options: Mapping[str, Any] | None = None,
                 allow_nonempty: bool = False) -> dict | None:
    """Refuse an output that prepare must not write to; return the manifest of the data set it replaces.

    Called before anything is read or written (the CLI calls it before reading the source, so a wrong
    `--out` fails in a second). Raises `ValueError` naming `out_uri` when:
    * `s3://bucket/...` names a bucket that does not exist (psamf never creates buckets, as `aws s3 cp`);
    * `out_uri` is a regular file;
    * `manifest.json` there is not a psamf shard manifest (prepare would overwrite someone's file);
    * the directory holds files that are not a psamf data set, unless `allow_nonempty` (prepare then
      writes beside them; it never deletes what it did not write, with or without the flag).
    """
    loc = resolve(out_uri, s3_endpoint)
    fs, root = loc.fsspec(storage_options)
    fs.invalidate_cache()
    if out_uri.startswith(("s3://", "s3a://")):
        bucket = root.split("/", 1)[0]
        try:  # not fs.exists: it answers False when the endpoint cannot be reached at all
            ok = bool(fs.info(bucket))
        except FileNotFoundError:
            ok = False
        except PermissionError as e:
            raise ValueError(f"--out {out_uri}: cannot access bucket {bucket!r} ({e})") from None
        if not ok:
            raise ValueError(f"--out {out_uri}: bucket {bucket!r} does not exist; psamf never creates buckets. "
                             f"Create it first (aws s3 mb s3://{bucket}) or fix the URI")
    if fs.isfile(root):
        raise ValueError(f"--out {out_uri}: is a regular file, not a directory; give a directory (prepare "
                         "writes manifest.json and v-<id>/ shard folders into it)")
    if not fs.isdir(root):
        return None
    entries = fs.ls(root, detail=True)
    names = {_basename(e["name"]) for e in entries}
    if MANIFEST_NAME in names:
        man_path = _join(root, MANIFEST_NAME)
        try:
            with fs.open(man_path, "rb") as f:
                man = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise ValueError(f"{loc.uri.rstrip('/')}/{MANIFEST_NAME}: not a psamf shard manifest ({e}); prepare "
                             "would overwrite it. Move it away or choose another --out") from None
        if not (isinstance(man, dict) and "schema_version" in man and isinstance(man.get("shards"), list)):
            raise ValueError(f"{loc.uri.rstrip('/')}/{MANIFEST_NAME}: not a psamf shard manifest (no "
                             "schema_version / shards); prepare would overwrite it. Move it away or choose "
                             "another --out")
        return man
    foreign = sorted(_basename(e["name"]) for e in entries if not _is_psamf_leftover(fs, e))
    if foreign and not allow_nonempty:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ValueError(f"--out {out_uri}: directory is not empty and is not a psamf data set (no {MANIFEST_NAME}; "
                         f"holds {shown}). Choose an empty directory, or pass --allow-nonempty to write beside "
                         "these files (prepare never deletes files it did not write)")
    return None


def _remove_files(fs, root: str, paths: Sequence[str]) -> None:
    """Delete the listed files under `root` (missing ones are fine), then their now-empty version folders."""
    dirs = set()
    for rel in paths:
        full = _join(root, rel)
        try:
            fs.rm(full)
        except FileNotFoundError:
            pass
        if "/" in rel:
            dirs.add(_join(root, rel.rsplit("/", 1)[0]))
    if _is_local_fs(fs):
        for d in sorted(dirs, reverse=True):
            try:
                fs.rmdir(d)
            except OSError:  # not empty: something we did not write is in it; leave it
                pass


def _previous_files(previous: Mapping[str, Any] | None) -> list[str]:
    """What the replaced manifest recorded: its shards and, for versioned layouts, its marker file."""
    if not previous:
        return []
    files = [str(s["path"]) for s in previous.get("shards", []) if isinstance(s, Mapping) and s.get("path")]
    files = [f for f in files if ".." not in f.split("/") and not f.startswith("/")]  # never outside <out>
    version = previous.get("data_version")
    if isinstance(version, str) and version.startswith(VERSION_PREFIX) and "/" not in version:
        files.append(f"{version}/{PREPARE_MARKER}")
    return files


def _leftover_files(fs, root: str, keep: str, only: str | None = None) -> list[str]:
    """Shards and markers in marked `v-<id>/` folders other than `keep` (or only in `only`): prepares killed
    before their swap, or this run's own folder when it fails."""
    out: list[str] = []
    for e in fs.ls(root, detail=True):
        name = _basename(e["name"])
        if name == keep or (only is not None and name != only) or not _is_psamf_leftover(fs, e):
            continue
        for f in fs.ls(e["name"], detail=False):
            fname = _basename(f)
            if looks_like_shard(fname) or fname == PREPARE_MARKER:
                out.append(f"{name}/{fname}")
    return sorted(out, key=lambda p: p.endswith(PREPARE_MARKER))  # the marker last: it proves ownership


def _commit(fs, root: str, version: str, manifest: dict, previous: Mapping[str, Any] | None) -> None:
    """The swap: `manifest.json` (naming the new `v-<id>/` shards) in one atomic write, then the clean-up.

    Before the write, readers see the old data set whole; after it, the new one whole. Only then are the
    files the old manifest recorded removed, and leftovers of killed prepares (marked `v-<id>/` folders).
    """
    fs.invalidate_cache()
    _fault("before-manifest")
    # last, atomically: local rename / one PUT on object stores (psamf.storage.write_bytes)
    write_bytes(fs, _join(root, MANIFEST_NAME), json.dumps(manifest, indent=1, sort_keys=False).encode())
    fs.invalidate_cache()
    keep = {s["path"] for s in manifest["shards"]} | {f"{version}/{PREPARE_MARKER}"}
    stale = [p for p in _previous_files(previous) + _leftover_files(fs, root, version) if p not in keep]
    _remove_files(fs, root, stale)
    fs.invalidate_cache()


# ---------------------------------------------------------------------------------------------
# prepare()
# ---------------------------------------------------------------------------------------------


def prepare(
    source: RawDataset | Mapping[str, Any],
    out_uri: str,
    *,
    tokenizer: str,
    personality_tokenizer: str,
    max_text_len: int = 50,
    personality_model: Any = None,
    layout: str = DEFAULT_LAYOUT,
    rows_per_shard: int | None = None,
    target_shard_mb: float = DEFAULT_TARGET_SHARD_MB,
    row_group_mb: float = DEFAULT_ROW_GROUP_MB,
    storage_options: Mapping[str, Any] | None = None,
    s3_endpoint: str | None = None,
    shuffle_seed: int = 0,
    compression: str = "zstd",
    personality_batch_size: int = 64,
    allow_nonempty: bool = False,
    progress: bool = False,
    require_train: bool = True,
) -> dict:
    """Validate, tokenise, (optionally) compute personality CLS, write shards + manifest. Returns the manifest.

    Args:
        source: a `RawDataset`, or a mapping of `read_source` arguments
            (`{"format": "mmsa", "input": path, "dataset": "mosi", "labels": None}`).
        out_uri: local directory, `s3://bucket/prefix`, `gs://...` (any fsspec URI).
        tokenizer / personality_tokenizer: HF names, local paths or `psamf:tiny`.
        max_text_len: token length of both tokenizations (truncate + right-pad).
        personality_model: None (no `personality_cls` column), a `psamf.config.ModelConfig`
            (encoder built by `psamf.model.load_personality_encoder` inside the Ray worker), or a
            HF BertModel-like module.
        layout: "ragged" (valid frames only) or "fixed" (zero-padded to the data-set max length).
        rows_per_shard: rows per Parquet file; default from `target_shard_mb`.
        target_shard_mb: target in-memory (uncompressed Arrow) size of a shard when `rows_per_shard`
            is not given.
        row_group_mb: target in-memory size of a Parquet row group (capped at the shard).
        storage_options: fsspec options (e.g. `{"endpoint_url": ...}` for S3-compatible stores).
        s3_endpoint: S3 endpoint when not in `storage_options` (else `AWS_ENDPOINT_URL_S3`).
        shuffle_seed: seed of the random row order of the train shards.
        allow_nonempty: write into a directory that holds files which are not a psamf data set (they are
            left alone; see `check_output`).
        progress: show progress on stderr (a bar on a terminal, periodic lines otherwise; `psamf.progress`).
        require_train: False for samples to score (`psamf predict --manifest`): no train split is needed, and
            the manifest's normalisation statistics then come from the first split (recorded by name).
    """
    from psamf import __version__
    from psamf.tokenizers import load_tokenizer

    t0 = time.perf_counter()
    _check_args(layout, max_text_len, rows_per_shard, target_shard_mb, row_group_mb)
    previous = check_output(out_uri, s3_endpoint=s3_endpoint, storage_options=storage_options,
                            allow_nonempty=allow_nonempty)
    raw = source if isinstance(source, RawDataset) else _read_source_args(dict(source))
    timings: dict[str, float] = {}
    lap = [t0]

    def mark(name: str) -> None:
        now = time.perf_counter()
        timings[name] = round(now - lap[0], 3)
        lap[0] = now
        note(f"prepare: {name} done ({timings[name]:.1f} s)", enabled=progress)

    mark("read")
    note(describe_repairs(raw.repairs, _source_desc(raw)), enabled=progress)
    validate(raw, require_train=require_train)
    mark("validate")
    splits = [s for s in _split_order(raw) if len(raw.splits[s]) > 0]

    tok = load_tokenizer(tokenizer)
    ptok = tok if personality_tokenizer == tokenizer else load_tokenizer(personality_tokenizer)
    tokens, p_tokens, index = _tokenize_splits(raw, splits, tok, ptok, max_text_len)
    mark("tokenize")
    t_max = {"audio": max(int(f.shape[0]) for s in splits for f in raw.splits[s].audio),
             "visual": max(int(f.shape[0]) for s in splits for f in raw.splits[s].visual)}
    norm = _normalization(raw)
    mark("statistics")
    cls: dict[str, np.ndarray | None] = {s: None for s in splits}
    personality_meta = None
    if personality_model is not None:
        cls, personality_meta = _personality_pass(raw, splits, index, p_tokens, personality_model,
                                                  personality_tokenizer, personality_batch_size)
        mark("personality_cls")
    L = int(max_text_len)
    rows_per_shard, row_group_rows = _shard_plan(raw, splits, layout, t_max, L, personality_meta, rows_per_shard,
                                                 target_shard_mb, row_group_mb)

    fs, root = resolve(out_uri, s3_endpoint).fsspec(storage_options)
    version = f"{VERSION_PREFIX}{uuid.uuid4().hex[:12]}"
    vdir = _join(root, version)
    try:
        if _is_local_fs(fs):
            fs.makedirs(vdir, exist_ok=True)  # object stores have no folders: nothing to create (never a bucket)
        write_bytes(fs, _join(vdir, PREPARE_MARKER), json.dumps(
            {"psamf_version": __version__, "purpose": "written by psamf prepare; this folder holds its shards"}
        ).encode())
        shards, schema = _write_shards(fs, root, version, raw, splits, rows_per_shard, row_group_rows, index,
                                       tokens, p_tokens, cls, layout=layout, t_max=t_max, max_text_len=L,
                                       compression=compression, shuffle_seed=shuffle_seed, progress=progress)
        manifest = _manifest(raw, splits, index, t_max, L, layout, tokenizer, tok, tokens, personality_tokenizer,
                             ptok, p_tokens, personality_meta, norm, shuffle_seed, rows_per_shard, row_group_rows,
                             compression, schema, version, shards, timings)
        mark("write")
        manifest["prepare_seconds"] = round(time.perf_counter() - t0, 3)  # excludes the commit below
        _commit(fs, root, version, manifest, previous)
    except BaseException:
        fs.invalidate_cache()
        if read_manifest_version(fs, root) != version:
            try:  # best effort: remove this run's own version folder (only what it wrote)
                _remove_files(fs, root, _leftover_files(fs, root, keep="", only=version))
            except Exception:  # noqa: BLE001
                pass
        raise
    log.info("prepared %s: %s rows in %d shards -> %s (%.1f s)", raw.name,
             sum(manifest["counts"].values()), len(shards), out_uri, manifest["prepare_seconds"])
    return manifest


def _check_args(layout: str, max_text_len: int, rows_per_shard: int | None, target_shard_mb: float,
                row_group_mb: float) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 3 <= int(max_text_len) <= 512:
        raise ValueError(f"max_text_len must be in [3, 512] ([CLS], at least one token, [SEP]), got {max_text_len}")
    if rows_per_shard is not None and rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if target_shard_mb <= 0 or row_group_mb <= 0:
        raise ValueError(f"target_shard_mb and row_group_mb must be > 0, got {target_shard_mb}, {row_group_mb}")


def _tokenize_splits(raw: RawDataset, splits: Sequence[str], tok: Any, ptok: Any, max_text_len: int):
    """Both tokenizations of every split, and the data-set-wide row index in source order."""
    tokens, p_tokens, index = {}, {}, {}
    start = 0
    for s in splits:
        sp = raw.splits[s]
        tokens[s] = _tokenize(tok, sp.text, max_text_len)
        p_tokens[s] = tokens[s] if ptok is tok else _tokenize(ptok, sp.text, max_text_len)
        for t, what in ((tok, tokens[s]), (ptok, p_tokens[s])):
            empty = np.flatnonzero(what["full_len"] <= t.num_special_tokens_to_add())
            if empty.size:  # a transcript of characters the tokenizer drops (zero-width spaces, control codes)
                i = int(empty[0])
                raise ValueError(f"text: no tokens after tokenisation with {getattr(t, 'name_or_path', '?')!r} "
                                 f"(only [CLS] [SEP]; {empty.size} such transcript(s)), transcript {sp.text[i]!r} "
                                 f"(split={s!r}, sample_id={sp.ids[i]!r}, source={_source_desc(raw)})")
        index[s] = np.arange(start, start + len(sp), dtype=np.int64)
        start += len(sp)
    return tokens, p_tokens, index


def _normalization(raw: RawDataset) -> dict[str, Any]:
    """Train-split feature statistics, stored in the manifest and applied at read time when asked for (a data
    set without a train split, only made for scoring: its first split's, named in "split")."""
    name = "train" if len(raw.splits.get("train") or ()) else _split_order(raw)[0]
    train = raw.splits[name]
    return {
        "split": name,
        "applied": "read time, by psamf.data.PadCollate when DataConfig.normalize_features (valid frames only)",
        "audio": _feature_stats([np.asarray(f, np.float32) for f in train.audio], raw.audio_dim),
        "visual": _feature_stats([np.asarray(f, np.float32) for f in train.visual], raw.visual_dim),
    }


def _personality_pass(raw: RawDataset, splits: Sequence[str], index: Mapping[str, np.ndarray],
                      p_tokens: Mapping[str, Mapping[str, np.ndarray]], personality_model: Any,
                      personality_tokenizer: str, batch_size: int):
    """The frozen personality encoder's CLS for every row (one Ray Data pass), split back per split."""
    all_index = np.concatenate([index[s] for s in splits])
    all_p = {"p_" + c: np.concatenate([p_tokens[s][c] for s in splits])
             for c in ("input_ids", "attention_mask", "token_type_ids")}
    t_cls = time.perf_counter()
    all_cls = compute_personality_cls(all_index, all_p, personality_model, batch_size=batch_size)
    cls, off = {}, 0
    for s in splits:
        cls[s] = all_cls[off: off + len(raw.splits[s])]
        off += len(raw.splits[s])
    meta = {"dim": int(all_cls.shape[1]), "model": describe_personality_model(personality_model),
            "tokenizer": personality_tokenizer, "mode": "eval (dropout off)",
            "seconds": round(time.perf_counter() - t_cls, 3)}
    return cls, meta


def _shard_plan(raw: RawDataset, splits: Sequence[str], layout: str, t_max: Mapping[str, int], L: int,
                personality_meta: Mapping[str, Any] | None, rows_per_shard: int | None, target_shard_mb: float,
                row_group_mb: float) -> tuple[int, int]:
    """Rows per shard and per row group from the estimated in-memory (Arrow) size of a row."""
    fixed_row_bytes = 6 * L * 4 + 64
    n_total = sum(len(raw.splits[s]) for s in splits)
    if layout == "ragged":
        frame_bytes = sum(_count_frames_bytes(raw.splits[s].audio) + _count_frames_bytes(raw.splits[s].visual)
                          for s in splits)
    else:
        frame_bytes = n_total * (t_max["audio"] * raw.audio_dim + t_max["visual"] * raw.visual_dim) * 4
    row_bytes = frame_bytes / n_total + fixed_row_bytes + (4 * personality_meta["dim"] if personality_meta else 0)
    if rows_per_shard is None:
        rows_per_shard = max(1, int(target_shard_mb * 2**20 // row_bytes))
    return rows_per_shard, max(1, min(rows_per_shard, int(row_group_mb * 2**20 // row_bytes)))


def _manifest(raw, splits, index, t_max, L, layout, tokenizer, tok, tokens, personality_tokenizer, ptok, p_tokens,
              personality_meta, norm, shuffle_seed, rows_per_shard, row_group_rows, compression, schema, version,
              shards, timings) -> dict[str, Any]:
    """The manifest of a prepared data set (docs/data-formats.md §10)."""
    from psamf import __version__
    from psamf.tokenizers import vocab_sha256

    return {
        "schema_version": SCHEMA_VERSION,
        "psamf_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": raw.name,
        "layout": layout,
        "padding_side": {"text": "right", "audio": "right", "visual": "right"},
        "frames": "valid-first" + (" (ragged: valid frames only)" if layout == "ragged" else
                                   " (zero-padded to max_lengths)"),
        "source_padding_side": dict(raw.padding_side),
        "splits": splits,
        "counts": {s: len(raw.splits[s]) for s in splits},
        "index_range": {s: [int(index[s][0]), int(index[s][-1]) + 1] for s in splits},
        "feature_dims": {"audio": int(raw.audio_dim), "visual": int(raw.visual_dim)},
        "max_lengths": {"audio": t_max["audio"], "visual": t_max["visual"], "text": L},
        "label_range": [float(raw.label_range[0]), float(raw.label_range[1])],
        "label_stats": {s: _label_stats(raw.splits[s].label) for s in splits},
        "tokenizers": {
            "text": _tok_meta(tokenizer, tok, vocab_sha256, tokens, splits, L),
            "personality": _tok_meta(personality_tokenizer, ptok, vocab_sha256, p_tokens, splits, L),
        },
        "personality_cls": personality_meta,
        "normalization": norm,
        "source_files": dict(raw.source_files),
        "repairs": dict(raw.repairs),
        "train_row_order": {"shuffled": True, "seed": int(shuffle_seed)},
        "rows_per_shard": int(rows_per_shard),
        "row_group_rows": int(row_group_rows),
        "compression": compression,
        "columns": {f.name: str(f.type) for f in schema},
        "data_version": version,
        "shards": shards,
        "prepare_seconds": None,
        "timings_seconds": timings,
    }


def _read_source_args(args: dict[str, Any]) -> RawDataset:
    """`prepare(source={"format", "input", "dataset", "labels"})`: the CLI's names for `sources.read_source`."""
    return sources.read_source(args["format"], args["input"], label_csv=args.get("labels"),
                               name=args.get("dataset"))


def _tok_meta(name: str, tok, sha_fn, toks: Mapping[str, Mapping[str, np.ndarray]], splits: list[str],
              L: int) -> dict:
    full = np.concatenate([toks[s]["full_len"] for s in splits])
    return {"name": name, "vocab_sha256": sha_fn(tok), "vocab_size": len(tok.get_vocab()), "max_len": L,
            "max_observed": int(full.max()), "n_truncated": int((full > L).sum()),
            "pad_token_id": int(tok.pad_token_id) if tok.pad_token_id is not None else 0}


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
