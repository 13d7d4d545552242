"""The Ray Data pipeline: prepared shards (psamf.prepare) -> named, padded torch batches.

    read_manifest(uri)                   manifest.json (psamf.shards); a directory without one is incomplete
    build_datasets(data_cfg)             {"train", "valid", "test"} -> ray.data.Dataset (pruned columns)
    load_datasets(data_cfg, manifest)    the same, with small splits read in the driver (no read tasks)
    read_shards(paths, fs, shuffle)      read_parquet with Ray's footer-reader pool sized to the shard list
    split_config()                       ray.train.DataConfig(datasets_to_split=["train"]) for the TorchTrainer
    iter_batches(shard, data_cfg, B, epoch=, train=)   the batches a training / evaluation loop consumes
    StartedEarly(batches)                fetches the first batch in a thread now (pipeline start-up behind setup)
    PadCollate                           ArrowBatchCollateFn: one Arrow batch -> dict of padded tensors

Where each step runs (docs/ray-operations.md): tokenisation (both tokenizers), id checks and the
optional personality CLS happen offline in `psamf prepare`; no per-row transform is left for Ray Data.
`build_datasets` reads the manifest's shard list with `read_parquet(...).select_columns(...)` (text,
speaker, split stay on disk) and, with `data_cfg.materialize` (default), `materialize()`s each split
once into the object store: on the 2-core bench machine a materialized MOSEI pass streams ~5,000-6,000
samples/s into a Train worker against ~500-800 for re-reading Parquet every epoch, most of which is
per-pass start-up (docs/benchmarks.md). Turn it off when a split does not fit the object store (MOSEI
ragged: train ~1.3 GiB, all splits ~1.8 GiB in Arrow).

Per-epoch randomness happens after that boundary, where the epoch number is known:
  * train block order changes every pass: `randomize_block_order(RandomSeedConfig(seed,
    reseed_after_execution=True))` when materialized, else the seeded file shuffle
    `FileShuffleConfig(seed, reseed_after_execution=True)`; shard rows were already written in a
    seeded random order by prepare;
  * `iter_batches(train=True)` permutes every window of `group_window * batch_size` rows with a
    generator seeded by `(data_cfg.shuffle_seed, epoch, first row index of the window)` — the
    "row permutation" tier of docs/ray-operations.md, run on Ray's collate threads;
  * with `data_cfg.length_grouping` (the default) the window is instead sorted by transcript length
    times a random factor in [1 - length_noise, 1 + length_noise] (random tie-break), cut into batches,
    and the batch order shuffled: batches of similar length, different ones every epoch.
A row meets only rows of its own block (~1,600 MOSEI rows at the default 128 MiB shard size) in a
window; that is the price of not running a global `random_shuffle()` each epoch.
Normalisation (`data_cfg.normalize_features`, off by default as in the reference code) is applied
by `PadCollate` with the manifest's train-split statistics; shards always hold the source values.

Splits across Train workers: **only train is split** (`split_config()`: `streaming_split(n,
equal=True)`: every rank gets the same number of rows — hence of batches with `drop_last=True` — and
together they cover the split minus fewer than `n` rows). **valid and test are not split**: every
rank streams the whole split in shard order (`preserve_order`), evaluates the rows a stable hash of the
sample id gives it (`engine.eval_partition`), and the predictions, labels and ids of all ranks are gathered
(`engine.gather_eval`), so every rank computes the same metrics over the whole split (Corr and F1 need every
prediction, not sums). Each rank forwards only its rows, so evaluation gets faster with more workers; the
in-batch loss terms (ccl, clm, ps, total) are computed on a rank's part of a batch and therefore depend on the
number of ranks, while MAE, Corr, the accuracies and the L1 loss do not.
Evaluate with the unwrapped model (`model.module`) so that no DDP collective runs in forward.

Batches (`iter_batches`) are dicts (B = rows, L_b / L_pb = the batch's longest transcript per
tokenizer rounded up to `data.token_pad_multiple` (at most max_text_len), T_a / T_v = the batch's longest
audio / visual sequence rounded up to `data.frame_pad_multiple`; both 1 by default. With buckets a run sees a
handful of shapes, and since every pad position is masked one forward's predictions do not depend on them). On a GPU the tensors are moved to
the device except `audio_lengths` / `visual_lengths`, which the model reads on the host (the batch's longest
frame count; `psamf.model.HOST_INPUT_KEYS`):

    input_ids, attention_mask, token_type_ids          (B, L_b)  int64
    p_input_ids, p_attention_mask, p_token_type_ids    (B, L_pb) int64
    personality_cls     (B, H_p) float32   only if the shards have it and data_cfg.use_precomputed_personality
    audio               (B, T_a, D_a) float32   valid frames first, zero padded
    audio_lengths       (B,) int64
    visual              (B, T_v, D_v) float32
    visual_lengths      (B,) int64
    label               (B,) float32
    index               (B,) int64     data-set-wide row number (prepare.py); all_gather-able
    sample_id           list[str]      "<video_id>$_$<clip_id>", same order as the rows

Sample ids and Ray (verified on 2.60): `iter_torch_batches` passes a non-tensor value such as a list
of str through, but then the whole batch is no longer a `TensorBatchType`, so Ray skips its device
transfer and memory pinning. Hence `PadCollate` used directly with `iter_torch_batches` returns
tensors only (with `index`; `sample_id` only if `PadCollate(sample_ids=True)`), while `iter_batches`
— which collates whole windows on Ray's prefetch threads and moves tensors to the device itself
(non-blocking) — always adds `sample_id`. Batch order is deterministic for evaluation splits; for
train it depends on which blocks reach a rank first (content per window is seeded).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ray.data.collate_fn import ArrowBatchCollateFn

from psamf.config import ConfigError, DataConfig
from psamf.shards import (BASE_COLUMNS, P_TOKEN_COLUMNS, TOKEN_COLUMNS, IncompleteDatasetError, check_manifest,
                          read_manifest, verify_shards)
from psamf.storage import resolve

if TYPE_CHECKING:
    import ray.data
    import ray.train
    import torch

__all__ = [
    "EVAL_SPLIT_ACROSS_WORKERS",
    "IncompleteDatasetError",
    "read_manifest",
    "build_datasets",
    "load_datasets",
    "read_shards",
    "footer_actors",
    "DRIVER_LOAD_FRACTION",
    "split_config",
    "PadCollate",
    "iter_batches",
    "pin_batch",
    "StartedEarly",
    "train_columns",
    "padding_stats",
]

EVAL_SPLIT_ACROSS_WORKERS = False  # valid/test: every rank streams the whole split (module docstring)
DRIVER_LOAD_FRACTION = 0.2  # of the object store: splits up to this size are read by the driver (load_datasets)
# Ray Data 2.60's Parquet reader lists files through a pool of footer-reading actors, 32 by default
# (RAY_DATA_PARQUET_FOOTER_NUM_ACTORS), each a new worker process, for every read, even of one file; each actor
# takes one batch of FOOTER_FILES_PER_ACTOR files at a time. `read_shards` sizes the pool to the shard list.
FOOTER_ACTORS_ENV = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FOOTER_FILES_PER_ACTOR = 10  # Ray's RAY_DATA_PARQUET_FOOTER_BATCH_SIZE default
FOOTER_MAX_ACTORS = 32  # Ray's default pool size

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Manifest and datasets (the manifest contract itself lives in psamf.shards)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _cached_manifest(uri: str, s3_endpoint: str | None) -> dict:
    return read_manifest(uri, s3_endpoint=s3_endpoint)


def train_columns(manifest: Mapping[str, Any], data_cfg: DataConfig) -> list[str]:
    """The shard columns the pipeline reads (column pruning)."""
    cols = list(BASE_COLUMNS)
    if manifest.get("personality_cls") and data_cfg.use_precomputed_personality:
        cols.append("personality_cls")
    return cols


def build_datasets(data_cfg: DataConfig, splits: Sequence[str] = ("train", "valid", "test"), *,
                   manifest: Mapping[str, Any] | None = None) -> dict[str, "ray.data.Dataset"]:
    """One `ray.data.Dataset` per split over the manifest's shards (never a glob), pruned columns.

    `data_cfg.materialize`: each split is read once, here (blocking), into the object store; train then
    gets a per-pass seeded block order. Otherwise every pass re-reads Parquet, train with a per-pass
    seeded file order. valid/test keep shard order. `manifest` skips reading manifest.json (it must
    describe `data_cfg.uri`; a subset of its shards reads only those). `s3://`: endpoint from
    `data_cfg.s3_endpoint`, else `AWS_ENDPOINT_URL_S3`, else AWS itself; credentials from the standard AWS
    chain, which Ray workers must see too (export before Ray starts, or put them in the runtime_env).
    """
    import ray.data
    from ray.data import FileShuffleConfig

    man = dict(manifest) if manifest is not None else read_manifest(data_cfg.uri, s3_endpoint=data_cfg.s3_endpoint)
    check_manifest(man, data_cfg)
    verify_shards(man, data_cfg.uri, data_cfg.s3_endpoint, splits=splits)
    loc = resolve(data_cfg.uri, data_cfg.s3_endpoint)
    fs, base = loc.storage_filesystem, loc.storage_path.rstrip("/")
    cols = train_columns(man, data_cfg)
    out = {}
    for split in splits:
        paths = [f"{base}/{s['path']}" for s in man["shards"] if s["split"] == split]
        if not paths:
            raise ValueError(f"split {split!r} not in {data_cfg.uri} (has {sorted(man['counts'])})")
        train = split == "train"
        shuffle = FileShuffleConfig(seed=data_cfg.shuffle_seed, reseed_after_execution=True) \
            if train and not data_cfg.materialize else None
        # select_columns right after the read is pushed down into the Parquet reader (2.60 deprecates columns=)
        ds = read_shards(paths, fs, shuffle).select_columns(cols)
        if not train:  # evaluation streams in shard order (deterministic prediction files)
            ds.context.execution_options.preserve_order = True
        if data_cfg.materialize:
            ds = ds.materialize()  # the read runs once, here; epochs iterate object-store blocks
            if train:  # per-pass block order instead of the per-pass file order
                ds = shuffle_block_order(ds, data_cfg.shuffle_seed)
        out[split] = ds
    return out


def footer_actors(n_files: int) -> int:
    """How many footer-reading actors a read of `n_files` Parquet files gets: one per FOOTER_FILES_PER_ACTOR
    files, at least 1 and at most FOOTER_MAX_ACTORS (Ray's own default, which it uses for every read)."""
    return max(1, min(FOOTER_MAX_ACTORS, math.ceil(n_files / FOOTER_FILES_PER_ACTOR)))


def read_shards(paths: Sequence[str], fs: Any, shuffle: Any) -> "ray.data.Dataset":
    """`ray.data.read_parquet` over an explicit shard list, with the footer-reader pool sized to it.

    Ray 2.60 starts RAY_DATA_PARQUET_FOOTER_NUM_ACTORS (default 32) actors to read the footers of the listed
    files, and kills them after the listing, on every execution of the read: a split of 3 shards started 32
    worker processes per read, 11-17 s on the 2-core test machine against about 2 s with one actor
    (docs/benchmarks.md, "Parquet reads: the footer-reader pool"). The read's file indexer reads the variable
    when `read_parquet` runs, in this process, so it is set for the call only. A value the user exported
    wins."""
    import ray.data

    ours = FOOTER_ACTORS_ENV not in os.environ
    if ours:
        os.environ[FOOTER_ACTORS_ENV] = str(footer_actors(len(paths)))
    try:
        return ray.data.read_parquet(list(paths), filesystem=fs, shuffle=shuffle)
    finally:
        if ours:
            del os.environ[FOOTER_ACTORS_ENV]


def shuffle_block_order(ds: "ray.data.Dataset", seed: int) -> "ray.data.Dataset":
    """A materialised train split's blocks in a new seeded order on every pass (module docstring)."""
    from ray.data import RandomSeedConfig

    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def load_datasets(data_cfg: DataConfig, manifest: Mapping[str, Any],
                  splits: Sequence[str] = ("train", "valid", "test")) -> dict[str, "ray.data.Dataset"]:
    """The Ray datasets of a run: `build_datasets`, with a fast path for small splits.

    With `data.materialize` (read each split into the object store once), a split is materialised by
    `build_datasets` with one round of Ray Data read tasks, which costs seconds per split even for a few MiB
    (about 10 s per split on the loaded 2-core test machine: docs/benchmarks.md, "Training throughput"). Splits
    that together fit in DRIVER_LOAD_FRACTION of the object store are instead read here, in the driver, with
    pyarrow (same shard list, same pruned columns) and handed over with `ray.data.from_arrow`: the same
    materialised blocks, no tasks. Train keeps the per-pass randomised block order `build_datasets` gives a
    materialised train split; evaluation splits keep shard order. Larger splits (or `data.materialize=false`)
    go through `build_datasets` unchanged."""
    import pyarrow.parquet as pq
    import ray

    def size(names: Sequence[str]) -> int:
        return sum(int(s.get("arrow_bytes", s.get("bytes", 0))) for s in manifest.get("shards", [])
                   if s.get("split") in names)

    small: tuple[str, ...] = ()
    if data_cfg.materialize:
        store = ray.cluster_resources().get("object_store_memory", 0)
        budget = DRIVER_LOAD_FRACTION * store
        if store and 0 < size(splits) <= budget:
            small = tuple(splits)
        elif store and 0 < size([s for s in splits if s != "train"]) <= budget:
            small = tuple(s for s in splits if s != "train")
    out: dict[str, Any] = {}
    rest = tuple(s for s in splits if s not in small)
    if rest:
        out.update(build_datasets(data_cfg, splits=rest, manifest=manifest))
    if small:
        verify_shards(manifest, data_cfg.uri, data_cfg.s3_endpoint, splits=small)
        loc = resolve(data_cfg.uri, data_cfg.s3_endpoint)
        cols = train_columns(manifest, data_cfg)
        for split in small:
            tables = [pq.read_table(loc.join(s["path"]), columns=cols, filesystem=loc.fs)
                      for s in manifest["shards"] if s["split"] == split]
            if not tables:
                raise ConfigError(f"split {split!r} not in {data_cfg.uri} (has {sorted(manifest.get('counts', {}))})")
            ds = ray.data.from_arrow(tables)
            if split == "train":
                ds = shuffle_block_order(ds, data_cfg.shuffle_seed)
            else:
                ds.context.execution_options.preserve_order = True
            out[split] = ds
        log.info("read %s in the driver into the object store (%.1f MiB)", ", ".join(small), size(small) / 2**20)
    return {s: out[s] for s in splits}


def split_config(eval_splits: Sequence[str] = ("valid", "test"), **kwargs: Any) -> "ray.train.DataConfig":
    """`ray.train.DataConfig` for the TorchTrainer: split train across workers, not valid/test (module doc).

    Train's default ingest options are kept; evaluation splits additionally preserve shard order (Train
    replaces each dataset's execution options, so `build_datasets`' own setting would not reach workers).
    """
    import copy

    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    eval_opts = copy.deepcopy(opts)
    eval_opts.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"],
                                execution_options={s: eval_opts for s in eval_splits}, **kwargs)


# ---------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------


def _column(batch: pa.Table, name: str) -> pa.Array:
    col = batch.column(name)
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _fsl_2d(arr: pa.Array) -> np.ndarray:
    """fixed_size_list<T>[k] (possibly sliced) -> (n, k) numpy view/copy."""
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(len(arr), arr.type.list_size)


def round_up(n: int, multiple: int, cap: int | None = None) -> int:
    """n rounded up to a multiple (the collate's shape buckets), at most `cap` (never below n)."""
    r = -(-n // multiple) * multiple
    return max(n, min(r, cap)) if cap is not None else r


def _frames(arr: pa.Array, lengths: np.ndarray, multiple: int = 1) -> np.ndarray:
    """audio/visual column (ragged list<fixed_size_list> or fixed_shape_tensor) -> (B, T, D), T the batch's
    longest rounded up to `multiple` (at most the stored width of a fixed layout)."""
    B = len(arr)
    t_b = round_up(int(lengths.max()), multiple) if B else 0
    if isinstance(arr.type, pa.BaseExtensionType):  # fixed layout: padded to the data-set max, valid-first
        full = arr.to_numpy_ndarray() if hasattr(arr, "to_numpy_ndarray") else arr.to_numpy()
        return np.array(full[:, :t_b], dtype=np.float32, order="C")  # a writable copy of the batch-max slice
    inner = arr.flatten()  # sliced correctly; (sum len, D) as fixed_size_list
    D = inner.type.list_size
    flat = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, D)
    out = np.zeros((B, t_b, D), np.float32)
    valid = np.arange(t_b)[None, :] < lengths[:, None]  # (B, T_b), valid-first
    out[valid] = flat  # row-major order of `valid` == concatenation order of the frames
    return out


class PadCollate(ArrowBatchCollateFn):
    """Arrow batch -> dict of padded tensors (module docstring lists the keys).

    Pads audio/visual to the batch maximum, trims token ids to the batch's longest transcript per
    tokenizer (both rounded up to the shape buckets, module docstring), optionally z-scores the valid frames. Stateless after construction (numpy constants only),
    so it is safe on Ray's collate thread pool.
    """

    def __init__(self, data_cfg: DataConfig | None = None, *, manifest: Mapping[str, Any] | None = None,
                 use_personality_cls: bool | None = None, normalize: bool | None = None,
                 sample_ids: bool = False, token_pad_multiple: int | None = None,
                 frame_pad_multiple: int | None = None):
        super().__init__()
        # shape buckets: the DataConfig's (default 1: the exact batch maximum), or these arguments
        self.token_multiple = token_pad_multiple or (data_cfg.token_pad_multiple if data_cfg is not None else 1)
        self.frame_multiple = frame_pad_multiple or (data_cfg.frame_pad_multiple if data_cfg is not None else 1)
        self.use_personality_cls = (data_cfg.use_precomputed_personality if data_cfg is not None else True) \
            if use_personality_cls is None else use_personality_cls
        normalize = (data_cfg.normalize_features if data_cfg is not None else False) if normalize is None \
            else normalize
        self.sample_ids = sample_ids
        self.norm: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        if normalize:
            if manifest is None:
                if data_cfg is None:
                    raise ValueError("PadCollate(normalize=True) needs the manifest or a DataConfig")
                manifest = _cached_manifest(data_cfg.uri, data_cfg.s3_endpoint)
            st = manifest["normalization"]
            self.norm = {}
            for m in ("audio", "visual"):
                mean = np.asarray(st[m]["mean"], np.float32)
                std = np.asarray(st[m]["std"], np.float32)
                self.norm[m] = (mean, np.where(std > 1e-6, std, 1.0).astype(np.float32))

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        import torch

        from psamf.model import check_inputs  # here, like torch: importing psamf.data stays torch-free

        out: dict[str, Any] = {}
        for names in (TOKEN_COLUMNS, P_TOKEN_COLUMNS):
            cols = {c: _fsl_2d(_column(batch, c)) for c in names}
            mask = cols[names[1]]
            l_b = max(1, int(mask.sum(axis=1).max())) if len(mask) else 0  # right-padded: real tokens first
            l_b = round_up(l_b, self.token_multiple, cap=mask.shape[1]) if len(mask) else 0
            for c in names:
                out[c] = torch.from_numpy(cols[c][:, :l_b].astype(np.int64))
            if names is TOKEN_COLUMNS:  # host-side counts: the padded share is logged without a device sync
                out["text_tokens"] = (int(mask[:, :l_b].sum()), int(mask.shape[0] * l_b))
        if self.use_personality_cls and "personality_cls" in batch.column_names:
            out["personality_cls"] = torch.from_numpy(
                np.array(_fsl_2d(_column(batch, "personality_cls")), dtype=np.float32, order="C"))
        for m in ("audio", "visual"):
            lengths = _column(batch, f"{m}_len").to_numpy(zero_copy_only=False).astype(np.int64)
            x = _frames(_column(batch, m), lengths, self.frame_multiple)
            if self.norm is not None:
                mean, std = self.norm[m]
                valid = (np.arange(x.shape[1])[None, :] < lengths[:, None])[..., None]
                x = np.where(valid, (x - mean) / std, 0.0).astype(np.float32)
            out[m] = torch.from_numpy(x)
            out[f"{m}_lengths"] = torch.from_numpy(lengths)
        out["label"] = torch.from_numpy(_column(batch, "label").to_numpy(zero_copy_only=False).astype(np.float32))
        out["index"] = torch.from_numpy(_column(batch, "index").to_numpy(zero_copy_only=False).astype(np.int64))
        if self.sample_ids:
            out["sample_id"] = _column(batch, "sample_id").to_pylist()
        check_inputs(out)  # on the host, once per batch: forward no longer checks values (a sync per step on a GPU)
        return out


class _WindowCollate(ArrowBatchCollateFn):
    """A window of rows -> list of collated batches (shuffled / length-grouped per epoch).

    Runs on Ray's collate threads; deterministic per window: the generator is seeded by
    (seed, epoch, first row index of the window), not by call order.
    """

    def __init__(self, collate: PadCollate, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                 group: bool, noise: float = 0.0, pin_memory: bool = False):
        super().__init__()
        self.collate, self.batch_size = collate, batch_size
        self.seed, self.epoch, self.shuffle, self.group, self.noise = seed, epoch, shuffle, group, noise
        self.pin_memory = pin_memory

    def batch_order(self, n: int, first_index: int, text_len: np.ndarray | None) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, self.epoch, max(0, first_index)]) if self.shuffle else None
        bs = self.batch_size
        if self.group and text_len is not None:
            key = np.asarray(text_len, np.float64)
            if rng is not None:  # training: jittered lengths (soft buckets), random tie-break
                if self.noise > 0:
                    key = key * rng.uniform(1.0 - self.noise, 1.0 + self.noise, n)
                tie = rng.random(n)
            else:  # evaluation: strictly by length, stable
                tie = np.arange(n)
            order = np.lexsort((tie, key))
        elif rng is not None:
            order = rng.permutation(n)
        else:
            order = np.arange(n)
        short = np.empty(0, np.int64)
        if rng is not None and n % bs and n > bs:  # the short batch (dropped in training): random rows, not the
            cut = rng.choice(n, n % bs, replace=False)  # longest transcripts that a sorted order leaves at its end
            short, order = order[np.sort(cut)], np.delete(order, cut)
        batches = [order[i: i + bs] for i in range(0, len(order), bs)] + ([short] if short.size else [])
        if rng is not None and len(batches) > 1:
            full = [b for b in batches if len(b) == bs]
            part = [b for b in batches if len(b) < bs]
            batches = [full[i] for i in rng.permutation(len(full))] + part  # a short batch stays last
        return batches

    def __call__(self, window: pa.Table) -> list[dict[str, Any]]:
        n = window.num_rows
        if n == 0:
            return []
        if not self.shuffle and not self.group:  # evaluation: zero-copy slices in shard order
            batches = [self.collate(window.slice(i, self.batch_size)) for i in range(0, n, self.batch_size)]
        else:
            first = int(_column(window, "index")[0].as_py())
            text_len = _column(window, "text_len").to_numpy(zero_copy_only=False) \
                if self.group and "text_len" in window.column_names else None
            batches = [self.collate(window.take(pa.array(rows))) for rows in self.batch_order(n, first, text_len)]
        return [pin_batch(b) for b in batches] if self.pin_memory else batches


def pin_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with its tensors in page-locked memory (on Ray's collate thread), so that the training loop's
    `.to(device, non_blocking=True)` is an asynchronous copy; the host-side keys (`HOST_INPUT_KEYS`) stay put."""
    from psamf.model import HOST_INPUT_KEYS

    return {k: (v.pin_memory() if hasattr(v, "pin_memory") and k not in HOST_INPUT_KEYS else v)
            for k, v in batch.items()}


def _resolve_device(device: Any) -> "torch.device":
    import torch

    if device != "auto":
        return torch.device(device)
    try:
        from ray.train.utils import _in_ray_train_worker

        if _in_ray_train_worker():
            from ray.train.torch import get_device

            return get_device()
    except Exception:  # noqa: BLE001 - outside Ray Train
        pass
    return torch.device("cpu")


def iter_batches(ds_or_shard: "ray.data.Dataset | ray.data.DataIterator", data_cfg: DataConfig, batch_size: int,
                 *, epoch: int, train: bool, drop_last: bool | None = None, device: Any = "auto",
                 manifest: Mapping[str, Any] | None = None, pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Batches for one pass over a dataset or a Train worker's shard (`get_dataset_shard(name)`).

    train=True: rows permuted within windows of `group_window * batch_size` rows, seeded by
    (`data_cfg.shuffle_seed`, `epoch`, window); with `data_cfg.length_grouping` (default), batches of similar
    transcript length (jittered by `data_cfg.length_noise`), in shuffled order. `drop_last` defaults to
    `train`: every DDP rank then runs the same number of full batches (the split is equal), and no batch of
    one row reaches the in-batch contrastive losses. train=False: shard order, no drop (with `length_grouping`,
    sorted within windows for less padding, deterministically). Tensors are moved to `device` ("auto": the Ray
    Train device, else CPU). See the module docstring for the keys.

    The training loop asks for host batches (`device="cpu"`) and moves them itself, so that the labels an
    evaluation reads stay on the host; for a CUDA device it sets `pin_memory=True`: the collate threads then
    put the tensors in page-locked memory and the loop's copies to the GPU are asynchronous.
    """
    from psamf.engine import move_to_device  # frame lengths stay on the host (psamf.model.HOST_INPUT_KEYS)

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if pin_memory:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("iter_batches(pin_memory=True) needs a CUDA device: page-locked batches only speed up "
                             "copies to a GPU, and this process sees none")
    if drop_last is None:
        drop_last = train
    it = ds_or_shard.iterator() if hasattr(ds_or_shard, "iterator") else ds_or_shard
    collate = PadCollate(data_cfg, manifest=manifest, sample_ids=True)
    group = bool(data_cfg.length_grouping)
    window_batches = data_cfg.group_window if (train or group) else 1
    wc = _WindowCollate(collate, batch_size, seed=data_cfg.shuffle_seed, epoch=epoch, shuffle=train, group=group,
                        noise=data_cfg.length_noise, pin_memory=pin_memory)
    dev = _resolve_device(device)
    prefetch = max(1, math.ceil(data_cfg.prefetch_batches / window_batches)) if data_cfg.prefetch_batches else 0
    for window in it.iter_torch_batches(batch_size=batch_size * window_batches, collate_fn=wc,
                                        prefetch_batches=prefetch, drop_last=False, device="cpu"):
        for b in window:
            if drop_last and len(b["sample_id"]) < batch_size:
                continue
            if dev.type != "cpu":
                b = move_to_device(b, dev)
            yield b


class StartedEarly:
    """Iterate `batches` (an `iter_batches` generator) with its first item fetched in a background thread that
    starts now, so that the pipeline's start-up overlaps whatever the caller does before iterating.

    A Train worker's first pass pays for Ray Data's start-up: the streaming-split coordinator's first epoch (a
    barrier across the ranks), the executor, the stats actor, the first window of rows and its collate. That is
    seconds per worker session (docs/benchmarks.md, "The first epoch of a worker session"), while the worker
    builds the model, restores a checkpoint and wraps it for DDP; and 0.1-0.3 s for every later pass, while the
    worker validates the previous epoch. The first `next()` waits for the thread (that wait is data wait, as it
    would have been); after it the same generator continues in the caller's thread, so the thread never runs
    concurrently with the consumer. An exception raised while fetching is raised by the
    first `next()`. `close()` (or the end of iteration) finishes the generator; call it when the batches will
    not be consumed."""

    def __init__(self, batches: Iterator[Any]) -> None:
        import threading

        self._it = iter(batches)
        self._first: list[Any] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="psamf-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first.append(next(self._it))
        except StopIteration:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the consumer's thread
            self._error = e

    def __iter__(self) -> Iterator[Any]:
        self._thread.join()
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        if self._first:
            yield self._first.pop()
            yield from self._it

    def close(self) -> None:
        self._thread.join()
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------------------------
# Measurement helper (benchmarks, tests)
# ---------------------------------------------------------------------------------------------


def padding_stats(batch: Mapping[str, Any]) -> dict[str, int]:
    """Real vs padded token / frame counts of one collated batch."""
    out = {}
    for key, mask_or_len in (("tokens", "attention_mask"), ("p_tokens", "p_attention_mask"),
                             ("audio", "audio_lengths"), ("visual", "visual_lengths")):
        x = batch[mask_or_len]
        if x.dim() == 2:
            real, total = int(x.sum()), x.numel()
        else:
            real, total = int(x.sum()), int(x.numel() * int(x.max()))
        out[f"{key}_real"] = real
        out[f"{key}_padded"] = total - real
    return out
