"""Readers that turn the supported corpora into one canonical in-memory form, `RawDataset`.

Formats (see docs/data-formats.md): MMSA pickles, MulT "noalign" pickles + label CSV
(joined by id), and custom manifests pointing at per-sample .npy/.npz features.

Contract with `psamf.prepare` (which tokenises and writes shards):
  * every split is a `RawSplit` whose arrays have one entry per utterance;
  * `audio[i]` / `visual[i]` hold only the *valid* frames, time first: shape (len_i, D), float32,
    with NaN/±inf already zeroed (and counted in `RawDataset.repairs`);
  * `ids` are normalised to "<video_id>$_$<clip_id>";
  * labels are float32 in the dataset's range.

Readers
-------
`read_mmsa(pkl_path, name=None)`
    MMSA ``unaligned_50.pkl`` / ``unaligned_39.pkl`` / ``sims_unaligned.pkl`` (and ``aligned_50.pkl``).
    Uses the stored ``audio_lengths`` / ``vision_lengths``. The padding side is detected from the zero rows: for
    every sample shorter than the padded length, the frames after ``len`` (valid-first, padding on the
    **right**) or before ``T - len`` (padding on the **left**) must be all zero; the side that fits more samples
    wins (ties / no evidence: right, MMSA-FET's default) and is recorded in `RawDataset.padding_side`. Files
    without ``*_lengths`` (aligned files) get their lengths from the zero rows as for MulT below.
`read_mult(pkl_path, label_csv, name=None)`
    MulT ``*_data_noalign.pkl`` + THUIAR-style ``label.csv``. Rows are joined **by id**: ``id[:,0]`` is
    ``"<video>_<clip>"`` (bytes are decoded as UTF-8), split on the **last** underscore and matched against
    ``(video_id, str(clip_id))`` of the CSV (columns read by name, values as text so ``0001`` stays ``0001``).
    Every pickle id must be found (else `ValueError` listing the first unmatched ids); duplicates on either side
    are errors. Lengths come from the padding: the all-zero frames counted from the padded side (left by
    default, MulT's convention; detected like MMSA). A genuine all-zero frame at the padded edge is
    indistinguishable from padding and is dropped. The split comes from the pickle's split keys; a CSV ``mode``
    column, if present, must agree. Labels come from ``labels[:, 0, 0]`` (the 7-column CMU-SDK variant keeps
    column 0), the text from the CSV.
`read_custom(manifest_path)`
    A CSV or Parquet manifest with columns ``id, split, text, label, audio_path, visual_path`` and optionally
    ``speaker``. Paths are resolved against the manifest's directory; ``.npy`` files hold one array, ``.npz``
    files an array under the key ``features``; arrays are time first ``(len, D)``. An id without ``$_$`` is
    normalised to ``"<speaker>$_$<id>"`` (``"<id>$_$<id>"`` without a speaker).
`read_custom(manifest_path, for_prediction=True)`
    The same manifest for `psamf predict`: ``split`` and ``label`` are optional, every row lands in one split.

Common rules: NaN and ±inf are set to 0 (not `np.nan_to_num`'s ±max-finite) and counted; a sample with no valid
frame becomes one zero frame (counted as ``<modality>_zero_length_repaired``); labels outside the dataset's range,
non-finite labels, duplicate ids, missing keys/columns and feature dims that differ between samples or splits are
errors. Every error is a `ValueError` naming the field and the file. Every source file's SHA-256 is recorded in
`RawDataset.source_files`; a file that looks like a published MMSA release but has another hash triggers a loud
`ChecksumMismatchWarning` (a warning, not an error: synthetic and re-extracted files legitimately differ).
Pickles are loaded with `safe_load_pickle`, which admits only what numpy arrays need.
"""

from __future__ import annotations

import _compat_pickle
import hashlib
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from psamf import datasets

SPLITS = ("train", "valid", "test")

log = logging.getLogger(__name__)

__all__ = [
    "SPLITS",
    "RawSplit",
    "RawDataset",
    "PUBLISHED_SHA256",
    "ChecksumMismatchWarning",
    "UnsafePickleError",
    "safe_load_pickle",
    "sha256_file",
    "normalize_id",
    "read_mmsa",
    "read_mult",
    "read_custom",
    "read_source",
    "SOURCE_FORMATS",
    "PREDICT_SPLIT",
]


@dataclass
class RawSplit:
    ids: list[str]
    text: list[str]
    label: np.ndarray  # (N,) float32
    audio: list[np.ndarray]  # N arrays (len_i, D_a) float32, valid frames only
    visual: list[np.ndarray]  # N arrays (len_i, D_v) float32, valid frames only
    speaker: list[str] | None = None  # speaker / video id when known (used by synth and custom corpora)
    unimodal_labels: dict[str, np.ndarray] | None = None  # SIMS: "T", "A", "V" -> (N,) float32

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class RawDataset:
    name: str  # mosi | mosei | sims | simsv2 | custom
    splits: dict[str, RawSplit]
    audio_dim: int
    visual_dim: int
    label_range: tuple[float, float]
    source_files: dict[str, str] = field(default_factory=dict)  # path -> SHA-256
    repairs: dict[str, int] = field(default_factory=dict)  # e.g. {"audio_nonfinite_values_zeroed": 12}
    padding_side: dict[str, str] = field(default_factory=dict)  # per modality, as detected in the source
    labelled: bool = True  # False: a prediction manifest without labels (its label arrays hold 0.0 placeholders)


# ------------------------------------------------------------------------------------------------
# Checksums
# ------------------------------------------------------------------------------------------------

#: MMSA README (docs/data-formats.md)
PUBLISHED_SHA256: dict[str, str] = {
    "MOSI/Processed/unaligned_50.pkl": "78e0f8b5ef8ff71558e7307848fc1fa929ecb078203f565ab22b9daab2e02524",
    "MOSI/Processed/aligned_50.pkl": "d3994fd25681f9c7ad6e9c6596a6fe9b4beb85ff7d478ba978b124139002e5f9",
    "MOSEI/Processed/unaligned_50.pkl": "ad8b23d50557045e7d47959ce6c5b955d8d983f2979c7d9b7b9226f6dd6fec1f",
    "MOSEI/Processed/aligned_50.pkl": "45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791",
    "SIMS/Processed/unaligned_39.pkl": "c9e20c13ec0454d98bb9c1e520e490c75146bfa2dfeeea78d84de047dbdd442f",
}



class ChecksumMismatchWarning(UserWarning):
    """A file named like a published MMSA release does not have the published SHA-256."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _published_key(path: Path, name: str | None) -> str | None:
    """The PUBLISHED_SHA256 key `path` claims to be: by its last three components (``MOSI/Processed/x.pkl``,
    case-insensitive), else by its basename plus the dataset name."""
    by_lower = {k.lower(): k for k in PUBLISHED_SHA256}
    tail = "/".join(path.parts[-3:]).lower()
    if tail in by_lower:
        return by_lower[tail]
    mmsa_dir = datasets.CORPORA[name].mmsa_dir if name in datasets.CORPORA else None
    if mmsa_dir:
        key = f"{mmsa_dir}/Processed/{path.name}".lower()
        return by_lower.get(key)
    return None


def _check_published(path: Path, digest: str, name: str | None) -> None:
    key = _published_key(path, name)
    if key is None:
        return
    if digest == PUBLISHED_SHA256[key]:
        log.info("%s matches the published SHA-256 of %s", path, key)
        return
    msg = (
        f"!!! {path}: SHA-256 {digest} differs from the published {key} ({PUBLISHED_SHA256[key]}). "
        "This is not the released file: a corrupted or partial download, a re-extraction, or synthetic data. "
        "Results will not be comparable with published numbers."
    )
    log.warning(msg)
    warnings.warn(msg, ChecksumMismatchWarning, stacklevel=3)


# ------------------------------------------------------------------------------------------------
# Restricted unpickling
# ------------------------------------------------------------------------------------------------


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside the allow-list."""


_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        # numpy array / scalar / dtype reconstruction (numpy 1.x and 2.x module paths)
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        # plain containers and values
        *(("builtins", n) for n in (
            "list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
            "complex", "bool",
        )),
        ("collections", "OrderedDict"),
        # bytes written by Python 2 / protocol 2 pickles
        ("_codecs", "encode"),
        ("codecs", "encode"),
    }
)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path, **kw: Any) -> None:
        super().__init__(file, **kw)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        # protocol <= 2 pickles name Python 2 modules (__builtin__.set): map them as pickle's fix_imports would
        # (those names do not exist in Python 3, so mapping them unconditionally is safe)
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._path}: refusing to unpickle global {module}.{name}: only numpy arrays, dtypes, scalars "
                "and plain containers are allowed in data pickles (this file may be malicious or not a data file)"
            )
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 name, avoids the shim's warning
        return super().find_class(module, name)


def safe_load_pickle(path: str | os.PathLike) -> Any:
    """Load a data pickle, admitting only the globals numpy arrays need.

    Raises `UnsafePickleError` (a `ValueError`) naming the file and the refused global, and `ValueError` naming
    the file when it is truncated or corrupt (e.g. ``invalid load key, '\\x00'``, MMSA #98).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{p}: file not found")
    for encoding in ("ASCII", "latin1"):  # latin1: numpy arrays pickled by Python 2
        try:
            with open(p, "rb") as f:
                return _RestrictedUnpickler(f, p, encoding=encoding).load()
        except UnsafePickleError:
            raise
        except UnicodeDecodeError:
            if encoding == "latin1":
                raise ValueError(f"{p}: pickle could not be decoded (neither ASCII nor latin1)") from None
            continue
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                KeyError, MemoryError, OverflowError) as e:
            raise ValueError(
                f"{p}: pickle looks truncated or corrupt ({type(e).__name__}: {e}); re-download the file and "
                "compare its SHA-256"
            ) from None
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------
# Helpers shared by the readers
# ------------------------------------------------------------------------------------------------

_SPLIT_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "dev": "valid", "test": "test"}
_SDK_ID = re.compile(r"^(.*)\[(\d+)\]$")


def normalize_id(raw: Any) -> tuple[str, str]:
    """(video_id, clip_id) from ``"<video>$_$<clip>"`` (MMSA), ``"<video>_<clip>"`` (MulT/MMIM: split on the
    **last** underscore, as MMIM's greedy regex) or ``"<video>[<clip>]"`` (CMU-SDK after ``align()``)."""
    s = raw.decode("utf-8") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
    s = s.strip()
    if "$_$" in s:
        video, _, clip = s.rpartition("$_$")
    elif m := _SDK_ID.match(s):
        video, clip = m.group(1), m.group(2)
    elif "_" in s:
        video, _, clip = s.rpartition("_")
    else:
        raise ValueError(f"id {s!r} has no '$_$' or '_' separating video and clip")
    if not video or not clip:
        raise ValueError(f"id {s!r} has an empty video or clip part")
    return video, clip


def _canonical(video: str, clip: str) -> str:
    return f"{video}$_${clip}"


def _decode(x: Any, where: str = "", sample_id: str = "") -> str:
    """A transcript as text; bytes must be UTF-8 (the error names the file, split, field and sample id)."""
    if not isinstance(x, (bytes, np.bytes_)):
        return str(x)
    try:
        return bytes(x).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: key 'raw_text' of sample {sample_id!r} is not UTF-8 ({e}); re-encode the "
                         "transcripts as UTF-8") from None


def _split_items(data: Any, path: Path) -> dict[str, Any]:
    """The three splits of a pickle's top-level dict (``dev`` / ``val`` accepted for ``valid``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a dict with keys {list(SPLITS)}, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, val in data.items():
        split = _SPLIT_ALIASES.get(str(key))
        if split is not None:
            if split in out:
                raise ValueError(f"{path}: split {split!r} appears twice (keys {list(data)})")
            out[split] = val
    missing = [s for s in SPLITS if s not in out]
    if missing:
        raise ValueError(f"{path}: missing split(s) {missing}; top-level keys are {list(data)}")
    for s in SPLITS:
        if not isinstance(out[s], dict):
            raise ValueError(f"{path}: split {s!r} must be a dict of arrays, got {type(out[s]).__name__}")
    return out


def _get(d: dict, key: str, split: str, path: Path) -> Any:
    if key not in d:
        raise ValueError(f"{path}: split {split!r} is missing key {key!r} (has {sorted(map(str, d))})")
    return d[key]


def _frames3d(x: Any, key: str, split: str, path: Path, n: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 3:
        raise ValueError(f"{path}: split {split!r} key {key!r} must be (N, T, D), got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{path}: split {split!r} key {key!r} has {arr.shape[0]} rows, labels have {n}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{path}: split {split!r} key {key!r} must be numeric, got dtype {arr.dtype}")
    return arr


def _zero_rows(x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """(N, T) bool: frames whose features are all exactly 0 (NaN is not 0, so a NaN frame is never padding)."""
    out = np.empty(x.shape[:2], dtype=bool)
    for lo in range(0, x.shape[0], chunk):
        out[lo : lo + chunk] = np.all(x[lo : lo + chunk] == 0, axis=2)
    return out


def _lengths_from_zero_rows(zero: np.ndarray, side: str) -> np.ndarray:
    """Valid lengths = T minus the run of all-zero frames on the padded side."""
    n, t = zero.shape
    edge = zero if side == "left" else zero[:, ::-1]
    nonzero = ~edge
    run = np.where(nonzero.any(axis=1), nonzero.argmax(axis=1), t)
    return (t - run).astype(np.int64)


def _side_from_zero_rows(zero: np.ndarray, default: str) -> str:
    """'left' when more samples start with a zero frame and end with a data frame than the reverse."""
    if zero.shape[1] == 0:
        return default
    left = int(np.sum(zero[:, 0] & ~zero[:, -1]))
    right = int(np.sum(zero[:, -1] & ~zero[:, 0]))
    if left == right:
        return default
    return "left" if left > right else "right"


def _side_from_lengths(zero: np.ndarray, lengths: np.ndarray) -> tuple[str, int]:
    """Padding side that fits the stored lengths; returns (side, samples that do not fit it)."""
    n, t = zero.shape
    pos = np.arange(t)[None, :]
    short = lengths < t
    right_pad = pos >= lengths[:, None]  # padding after the valid frames
    left_pad = pos < (t - lengths)[:, None]
    right_ok = np.all(~right_pad | zero, axis=1)
    left_ok = np.all(~left_pad | zero, axis=1)
    n_right = int(np.sum(short & right_ok & ~left_ok))
    n_left = int(np.sum(short & left_ok & ~right_ok))
    side = "left" if n_left > n_right else "right"
    bad = int(np.sum(short & ~(left_ok if side == "left" else right_ok)))
    return side, bad


class _Repairs:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        if n:
            self.counts[key] = self.counts.get(key, 0) + int(n)


def _clean_frames(x: np.ndarray, modality: str, repairs: _Repairs) -> np.ndarray:
    """float32 copy with NaN/±inf zeroed (counted); an empty sequence becomes one zero frame (counted)."""
    out = np.array(x, dtype=np.float32, copy=True)
    bad = ~np.isfinite(out)
    n_bad = int(bad.sum())
    if n_bad:
        out[bad] = 0.0
        repairs.add(f"{modality}_nonfinite_values_zeroed", n_bad)
    if out.shape[0] == 0:
        out = np.zeros((1, out.shape[1]), dtype=np.float32)
        repairs.add(f"{modality}_zero_length_repaired", 1)
    return out


def _slice_valid(x: np.ndarray, lengths: np.ndarray, side: str, modality: str, repairs: _Repairs) -> list[np.ndarray]:
    t = x.shape[1]
    out = []
    for i, n in enumerate(lengths):
        n = int(n)
        frames = x[i, :n] if side == "right" else x[i, t - n :]
        out.append(_clean_frames(frames, modality, repairs))
    return out


def _labels(y: Any, label_range: tuple[float, float], where: str, key: str = "label") -> np.ndarray:
    arr = np.asarray(y, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(f"{where}: {int(bad.sum())} non-finite value(s) in {key!r}")
    lo, hi = label_range
    out = (arr < lo - 1e-6) | (arr > hi + 1e-6)
    if out.any():
        raise ValueError(
            f"{where}: {int(out.sum())} {key!r} value(s) outside the label range [{lo}, {hi}] "
            f"(min {arr.min():.4g}, max {arr.max():.4g}); wrong dataset name or a corrupt file?"
        )
    return arr.astype(np.float32)


def _check_duplicates(ids_by_split: dict[str, list[str]], where: str) -> None:
    seen: dict[str, str] = {}
    dups: list[str] = []
    for split, ids in ids_by_split.items():
        for i in ids:
            if i in seen:
                dups.append(f"{i} ({seen[i]}/{split})")
            else:
                seen[i] = split
    if dups:
        raise ValueError(f"{where}: {len(dups)} duplicate id(s), e.g. {dups[:10]}")


def _infer_name(name: str | None, path: Path, dims: tuple[int, int]) -> str:
    """Dataset name: as given, else from the nearest parent directory (``MOSI/Processed/…``), else from the
    feature dims (MOSI 5/20, MOSEI 74/35, SIMS 33/709, SIMS v2 25/177), else from the file name, else custom."""
    if name:
        return name
    dirs = {"mosi": "mosi", "cmumosi": "mosi", "mosei": "mosei", "cmumosei": "mosei", "sims": "sims",
            "chsims": "sims", "simsv2": "simsv2", "chsimsv2": "simsv2"}
    for part in reversed(path.parts[:-1]):
        key = part.lower().replace("-", "").replace("_", "")
        if key in dirs:
            return dirs[key]
    by_dims = datasets.name_for_feature_dims(dims)
    if by_dims is not None:
        return by_dims
    stem = path.name.lower()
    for prefix in ("mosei", "mosi", "simsv2", "sims"):
        if stem.startswith(prefix):
            return prefix
    return "custom"


def _range_for(name: str, label_range: tuple[float, float] | None) -> tuple[float, float]:
    if label_range is not None:
        lo, hi = float(label_range[0]), float(label_range[1])
        if not lo < hi:
            raise ValueError(f"label_range must be (low, high) with low < high, got {label_range}")
        return (lo, hi)
    corpus = datasets.CORPORA.get(name)
    return corpus.label_range if corpus is not None else datasets.DEFAULT_LABEL_RANGE


# ------------------------------------------------------------------------------------------------
# MMSA
# ------------------------------------------------------------------------------------------------

_MMSA_REQUIRED = ("raw_text", "audio", "vision", "regression_labels", "id")


def read_mmsa(
    pkl_path: str | os.PathLike,
    name: str | None = None,
    *,
    padding: Literal["auto", "left", "right"] = "auto",
    label_range: tuple[float, float] | None = None,
) -> RawDataset:
    """Read an MMSA pickle (see the module docstring for the rules)."""
    path = Path(pkl_path)
    digest = sha256_file(path) if path.is_file() else None
    data = _split_items(safe_load_pickle(path), path)
    splits_raw = {s: data[s] for s in SPLITS}
    for s, d in splits_raw.items():
        for key in _MMSA_REQUIRED:
            _get(d, key, s, path)

    dims: dict[str, tuple[int, int]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for s, d in splits_raw.items():
        n = len(np.asarray(d["regression_labels"]).reshape(-1))
        audio = _frames3d(d["audio"], "audio", s, path, n)
        vision = _frames3d(d["vision"], "vision", s, path, n)
        for key in ("raw_text", "id"):
            if len(d[key]) != n:
                raise ValueError(f"{path}: split {s!r} key {key!r} has {len(d[key])} entries, labels have {n}")
        dims[s] = (audio.shape[2], vision.shape[2])
        arrays[s] = {"audio": audio, "vision": vision}
    if len(set(dims.values())) > 1:
        raise ValueError(f"{path}: feature dims (audio, vision) differ between splits: {dims}")
    audio_dim, visual_dim = dims["train"]
    ds_name = _infer_name(name, path, (audio_dim, visual_dim))
    if digest is not None:
        _check_published(path, digest, ds_name)
    lrange = _range_for(ds_name, label_range)

    repairs = _Repairs()
    padding_side: dict[str, str] = {}
    zero_rows = {s: {m: _zero_rows(arrays[s][m]) for m in ("audio", "vision")} for s in SPLITS}
    lengths: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for m, out_m in (("audio", "audio"), ("vision", "visual")):
        key = f"{m}_lengths"
        have = [key in splits_raw[s] for s in SPLITS]
        if any(have) and not all(have):
            missing = [s for s, h in zip(SPLITS, have) if not h]
            raise ValueError(f"{path}: key {key!r} missing from split(s) {missing} but present in others")
        if all(have):
            for s in SPLITS:
                t = arrays[s][m].shape[1]
                raw = np.asarray(splits_raw[s][key], dtype=np.float64).reshape(-1)
                if raw.shape[0] != arrays[s][m].shape[0]:
                    raise ValueError(f"{path}: split {s!r} key {key!r} has {raw.shape[0]} entries, "
                                     f"{m} has {arrays[s][m].shape[0]}")
                if not np.all(np.isfinite(raw)) or np.any(raw != np.rint(raw)) or np.any(raw < 0) or np.any(raw > t):
                    raise ValueError(f"{path}: split {s!r} key {key!r} must hold integers in [0, {t}] "
                                     f"(min {np.nanmin(raw)}, max {np.nanmax(raw)})")
                lengths[s][m] = raw.astype(np.int64)
            if padding == "auto":
                zero = np.concatenate([zero_rows[s][m] for s in SPLITS])
                lens = np.concatenate([lengths[s][m] for s in SPLITS])
                side, bad = _side_from_lengths(zero, lens)
                if bad:
                    log.warning("%s: %d %s sample(s) have non-zero frames where the detected %s padding should "
                                "be; slicing by the stored lengths anyway", path, bad, m, side)
            else:
                side = padding
        else:  # aligned files: no stored lengths
            side = padding if padding != "auto" else _side_from_zero_rows(
                np.concatenate([zero_rows[s][m] for s in SPLITS]), "right")
            for s in SPLITS:
                lengths[s][m] = _lengths_from_zero_rows(zero_rows[s][m], side)
            log.warning("%s: no %r key; lengths inferred from all-zero %s frames (padding side %s)",
                        path, key, m, side)
        padding_side[out_m] = side

    splits: dict[str, RawSplit] = {}
    for s in SPLITS:
        d = splits_raw[s]
        where = f"{path} split {s!r}"
        label = _labels(d["regression_labels"], lrange, where, "regression_labels")
        pairs = []
        for raw in np.asarray(d["id"]).reshape(-1):
            try:
                pairs.append(normalize_id(raw))
            except ValueError as e:
                raise ValueError(f"{where}: key 'id': {e}") from None
        unimodal = {}
        for m in ("T", "A", "V"):
            k = f"regression_labels_{m}"
            if k in d:
                unimodal[m] = _labels(d[k], lrange, where, k)
        splits[s] = RawSplit(
            ids=[_canonical(v, c) for v, c in pairs],
            text=[_decode(x, where, _canonical(*pairs[i]) if i < len(pairs) else str(i))
                  for i, x in enumerate(np.asarray(d["raw_text"], dtype=object).reshape(-1))],
            label=label,
            audio=_slice_valid(arrays[s]["audio"], lengths[s]["audio"], padding_side["audio"], "audio", repairs),
            visual=_slice_valid(arrays[s]["vision"], lengths[s]["vision"], padding_side["visual"], "visual", repairs),
            speaker=[v for v, _ in pairs],
            unimodal_labels=unimodal or None,
        )
    _check_duplicates({s: splits[s].ids for s in SPLITS}, str(path))
    return RawDataset(
        name=ds_name, splits=splits, audio_dim=audio_dim, visual_dim=visual_dim, label_range=lrange,
        source_files={str(path): digest or ""}, repairs=repairs.counts, padding_side=padding_side,
    )


# ------------------------------------------------------------------------------------------------
# MulT noalign + label.csv
# ------------------------------------------------------------------------------------------------

_MULT_REQUIRED = ("vision", "audio", "labels", "id")


def _read_table(path: Path) -> "Any":
    import pandas as pd

    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
            # non-numeric columns as text, nulls as "" (as in a CSV), not the strings "None" or "nan"
            text = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
            return df.assign(**{c: df[c].where(df[c].notna(), "").astype(str) for c in text})
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: could not be read as a table ({type(e).__name__}: {e})") from None


def read_mult(
    pkl_path: str | os.PathLike,
    label_csv: str | os.PathLike,
    name: str | None = None,
    *,
    padding: Literal["auto", "left", "right"] = "auto",
    label_range: tuple[float, float] | None = None,
) -> RawDataset:
    """Read a MulT noalign pickle and join its rows to `label_csv` by id (see the module docstring)."""
    path, csv_path = Path(pkl_path), Path(label_csv)
    digest = sha256_file(path) if path.is_file() else None
    data = _split_items(safe_load_pickle(path), path)
    df = _read_table(csv_path)
    files = f"{path} + {csv_path}"
    for col in ("video_id", "clip_id", "text"):
        if col not in df.columns:
            raise ValueError(f"{csv_path}: missing column {col!r} (columns {list(df.columns)})")

    index = _csv_index(df, csv_path)

    dims: dict[str, tuple[int, int]] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    pairs: dict[str, list[tuple[str, str]]] = {}
    for s in SPLITS:
        d = data[s]
        for key in _MULT_REQUIRED:
            _get(d, key, s, path)
        ids = np.asarray(d["id"])
        col0 = ids.reshape(ids.shape[0], -1)[:, 0] if ids.ndim >= 1 and ids.size else ids.reshape(-1)
        n = col0.shape[0]
        audio = _frames3d(d["audio"], "audio", s, path, n)
        vision = _frames3d(d["vision"], "vision", s, path, n)
        arrays[s] = {"audio": audio, "vision": vision, "labels": np.asarray(d["labels"])}
        if arrays[s]["labels"].shape[0] != n:
            raise ValueError(f"{path}: split {s!r} key 'labels' has {arrays[s]['labels'].shape[0]} rows, 'id' has {n}")
        dims[s] = (audio.shape[2], vision.shape[2])
        p = []
        for raw in col0:
            try:
                p.append(normalize_id(raw))
            except ValueError as e:
                raise ValueError(f"{path}: split {s!r} key 'id': {e}") from None
        pairs[s] = p
    if len(set(dims.values())) > 1:
        raise ValueError(f"{path}: feature dims (audio, vision) differ between splits: {dims}")
    audio_dim, visual_dim = dims["train"]
    ds_name = _infer_name(name, path, (audio_dim, visual_dim))
    lrange = _range_for(ds_name, label_range)
    _check_duplicates({s: [_canonical(v, c) for v, c in pairs[s]] for s in SPLITS}, str(path))

    rows = _join_csv(pairs, index, df, files, csv_path)

    repairs = _Repairs()
    padding_side: dict[str, str] = {}
    zero_rows = {s: {m: _zero_rows(arrays[s][m]) for m in ("audio", "vision")} for s in SPLITS}
    lengths: dict[str, dict[str, np.ndarray]] = {s: {} for s in SPLITS}
    for m, out_m in (("audio", "audio"), ("vision", "visual")):
        side = padding if padding != "auto" else _side_from_zero_rows(
            np.concatenate([zero_rows[s][m] for s in SPLITS]), "left")
        padding_side[out_m] = side
        for s in SPLITS:
            lengths[s][m] = _lengths_from_zero_rows(zero_rows[s][m], side)

    has_csv_label = "label" in df.columns
    splits: dict[str, RawSplit] = {}
    for s in SPLITS:
        where = f"{path} split {s!r}"
        lab = arrays[s]["labels"]
        label = _labels(lab.reshape(lab.shape[0], -1)[:, 0] if lab.size else lab.reshape(-1), lrange, where, "labels")
        sub = df.iloc[rows[s]] if rows[s] else df.iloc[[]]
        if has_csv_label and len(sub):
            csv_lab = np.asarray(np.array([_to_float(x) for x in sub["label"]]), dtype=np.float64)
            diff = np.abs(csv_lab - label) > 1e-3
            if np.any(diff & np.isfinite(csv_lab)):
                log.warning("%s: %d label(s) in the CSV differ from the pickle's (the pickle's are used)",
                            where, int(np.sum(diff & np.isfinite(csv_lab))))
        unimodal = {}
        for m in ("T", "A", "V"):
            col = f"label_{m}"
            if col in df.columns and len(sub) and all(str(x).strip() for x in sub[col]):
                unimodal[m] = _labels([_to_float(x) for x in sub[col]], lrange, f"{csv_path} ({s})", col)
        splits[s] = RawSplit(
            ids=[_canonical(v, c) for v, c in pairs[s]],
            text=[str(x) for x in sub["text"]],
            label=label,
            audio=_slice_valid(arrays[s]["audio"], lengths[s]["audio"], padding_side["audio"], "audio", repairs),
            visual=_slice_valid(arrays[s]["vision"], lengths[s]["vision"], padding_side["visual"], "visual", repairs),
            speaker=[v for v, _ in pairs[s]],
            unimodal_labels=unimodal or None,
        )
    return RawDataset(
        name=ds_name, splits=splits, audio_dim=audio_dim, visual_dim=visual_dim, label_range=lrange,
        source_files={str(path): digest or "", str(csv_path): sha256_file(csv_path)},
        repairs=repairs.counts, padding_side=padding_side,
    )


def _csv_index(df: Any, csv_path: Path) -> dict[tuple[str, str], int]:
    """Row of the label CSV for each (video_id, clip_id); duplicates are an error."""
    keys = list(zip(df["video_id"].astype(str).str.strip(), df["clip_id"].astype(str).str.strip()))
    index: dict[tuple[str, str], int] = {}
    dup_csv: list[str] = []
    for row, k in enumerate(keys):
        if k in index:
            dup_csv.append(f"{k[0]}_{k[1]}")
        index[k] = row
    if dup_csv:
        raise ValueError(f"{csv_path}: {len(dup_csv)} duplicate (video_id, clip_id) row(s), e.g. {dup_csv[:10]}")
    return index


def _join_csv(pairs: dict[str, list[tuple[str, str]]], index: dict[tuple[str, str], int], df: Any, files: str,
              csv_path: Path) -> dict[str, list[int]]:
    """The CSV row of every pickle sample, per split: every pickle id must be in the CSV, and where the CSV has
    a `mode` column it must agree with the pickle's split."""
    rows: dict[str, list[int]] = {}
    unmatched: list[str] = []
    for s in SPLITS:
        r = []
        for v, c in pairs[s]:
            k = index.get((v, c))
            if k is None:
                unmatched.append(f"{v}_{c}")
            r.append(-1 if k is None else k)
        rows[s] = r
    if unmatched:
        raise ValueError(
            f"{files}: {len(unmatched)} pickle id(s) have no (video_id, clip_id) row in the label CSV, e.g. "
            f"{unmatched[:10]}; refusing to drop them silently (is this the CSV that belongs to this pickle?)"
        )
    used = {k for s in SPLITS for k in rows[s]}
    if len(used) < len(df):
        log.info("%s: %d CSV row(s) match no pickle id (ignored)", csv_path, len(df) - len(used))

    if "mode" in df.columns:
        wrong = []
        modes = df["mode"].astype(str).str.strip().str.lower().map(lambda m: _SPLIT_ALIASES.get(m, m)).tolist()
        for s in SPLITS:
            for (v, c), k in zip(pairs[s], rows[s]):
                if modes[k] != s:
                    wrong.append(f"{v}_{c} (pickle {s}, csv {modes[k]})")
        if wrong:
            raise ValueError(f"{files}: {len(wrong)} sample(s) whose CSV 'mode' disagrees with the pickle split, "
                             f"e.g. {wrong[:10]}")
    return rows


def _to_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


# ------------------------------------------------------------------------------------------------
# Custom manifests
# ------------------------------------------------------------------------------------------------

_CUSTOM_REQUIRED = ("id", "split", "text", "label", "audio_path", "visual_path")
_PREDICT_REQUIRED = ("id", "text", "audio_path", "visual_path")  # read_custom(for_prediction=True)
PREDICT_SPLIT = "test"  # the one split every row of a prediction manifest goes to


def _load_features(path: Path, row_id: str, fld: str, manifest: Path) -> np.ndarray:
    where = f"{manifest}: row id {row_id!r} field {fld!r} ({path})"
    if not path.is_file():
        raise ValueError(f"{where}: file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "features" not in z.files:
                    raise ValueError(f"{where}: .npz has no key 'features' (keys {z.files})")
                arr = z["features"]
        else:
            raise ValueError(f"{where}: unsupported extension {suffix!r}; use .npy or .npz (key 'features')")
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise ValueError(f"{where}: could not be read ({e})") from None
    except (OSError, EOFError) as e:
        raise ValueError(f"{where}: could not be read ({type(e).__name__}: {e})") from None
    if arr.ndim != 2:
        raise ValueError(f"{where}: features must be 2-D (frames, dim), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{where}: features must be numeric, got dtype {arr.dtype}")
    return arr


def read_custom(
    manifest_path: str | os.PathLike,
    name: str = "custom",
    *,
    label_range: tuple[float, float] | None = None,
    for_prediction: bool = False,
) -> RawDataset:
    """Read a CSV/Parquet manifest of per-sample feature files (see the module docstring).

    `label_range` defaults to the named dataset's range ([-1, 1] for sims/simsv2, else [-3, 3]).
    `for_prediction` (`psamf predict --manifest`): only ``id, text, audio_path, visual_path`` are required;
    every row goes to the one split `PREDICT_SPLIT` whatever its ``split`` column says, and without a
    ``label`` column the labels are 0.0 placeholders and `RawDataset.labelled` is False. Every other rule
    (and every error message) is the training reader's.
    """
    manifest = Path(manifest_path)
    df = _read_table(manifest)
    for col in _PREDICT_REQUIRED if for_prediction else _CUSTOM_REQUIRED:
        if col not in df.columns:
            raise ValueError(f"{manifest}: missing column {col!r} (columns {list(df.columns)})")
    labelled = "label" in df.columns
    lrange = _range_for(name, label_range)
    base = manifest.parent
    repairs = _Repairs()
    sources: dict[str, str] = {str(manifest): sha256_file(manifest)}
    has_speaker = "speaker" in df.columns
    per_split: dict[str, dict[str, list]] = {s: {k: [] for k in ("ids", "text", "label", "audio", "visual", "speaker")}
                                             for s in SPLITS}
    dims: dict[str, tuple[int, str]] = {}
    for rec in df.to_dict("records"):
        rid = str(rec["id"]).strip()
        if not rid:
            raise ValueError(f"{manifest}: a row has an empty 'id'")
        split = PREDICT_SPLIT if for_prediction else _SPLIT_ALIASES.get(str(rec["split"]).strip().lower())
        if split is None:
            raise ValueError(f"{manifest}: row id {rid!r} field 'split' is {rec['split']!r}; use train/valid/test")
        label = _to_float(rec["label"]) if labelled else 0.0
        _labels([label], lrange, f"{manifest}: row id {rid!r}", "label")
        speaker = str(rec["speaker"]).strip() if has_speaker and rec["speaker"] is not None else ""
        if "$_$" in rid:
            video, clip = normalize_id(rid)
        else:
            video, clip = (speaker or rid), rid
        feats = {}
        for fld, modality in (("audio_path", "audio"), ("visual_path", "visual")):
            rel = str(rec[fld]).strip()
            if not rel:
                raise ValueError(f"{manifest}: row id {rid!r} field {fld!r} is empty")
            p = Path(rel) if Path(rel).is_absolute() else base / rel
            arr = _load_features(p, rid, fld, manifest)
            if modality in dims and dims[modality][0] != arr.shape[1]:
                raise ValueError(f"{manifest}: row id {rid!r} field {fld!r} ({p}) has feature dim {arr.shape[1]}, "
                                 f"but row {dims[modality][1]!r} has {dims[modality][0]}")
            dims.setdefault(modality, (arr.shape[1], rid))
            sources[str(p)] = sha256_file(p)
            feats[modality] = _clean_frames(arr, modality, repairs)
        if not str(rec["text"]).strip():
            raise ValueError(f"{manifest}: row id {rid!r} field 'text' is empty (every sample needs a transcript)")
        acc = per_split[split]
        acc["ids"].append(_canonical(video, clip))
        acc["text"].append(str(rec["text"]))
        acc["label"].append(label)
        acc["audio"].append(feats["audio"])
        acc["visual"].append(feats["visual"])
        acc["speaker"].append(speaker or video)
    empty = [s for s in SPLITS if not per_split[s]["ids"]]
    if for_prediction and not per_split[PREDICT_SPLIT]["ids"]:
        raise ValueError(f"{manifest}: no rows to predict")
    if empty and not for_prediction:
        raise ValueError(f"{manifest}: no rows for split(s) {empty}; every split needs at least one sample")
    _check_duplicates({s: per_split[s]["ids"] for s in SPLITS}, str(manifest))
    splits = {
        s: RawSplit(ids=a["ids"], text=a["text"], label=np.asarray(a["label"], dtype=np.float32), audio=a["audio"],
                    visual=a["visual"], speaker=a["speaker"])
        for s, a in per_split.items() if a["ids"] or not for_prediction
    }
    return RawDataset(
        name=name, splits=splits, audio_dim=dims["audio"][0], visual_dim=dims["visual"][0], label_range=lrange,
        source_files=sources, repairs=repairs.counts, padding_side={"audio": "none", "visual": "none"},
        labelled=labelled,
    )


# ------------------------------------------------------------------------------------------------
# Dispatch
# ------------------------------------------------------------------------------------------------


SOURCE_FORMATS = ("mmsa", "mult", "custom")


def read_source(
    fmt: Literal["mmsa", "mult", "custom"],
    path: str | os.PathLike,
    *,
    label_csv: str | os.PathLike | None = None,
    name: str | None = None,
    padding: Literal["auto", "left", "right"] = "auto",
    label_range: tuple[float, float] | None = None,
) -> RawDataset:
    """Read `path` in format `fmt` (``mmsa`` pickle, ``mult`` pickle + `label_csv`, ``custom`` manifest)."""
    if fmt == "mmsa":
        return read_mmsa(path, name, padding=padding, label_range=label_range)
    if fmt == "mult":
        if label_csv is None:
            raise ValueError(f"{path}: format 'mult' needs label_csv (the label.csv that belongs to the pickle)")
        return read_mult(path, label_csv, name, padding=padding, label_range=label_range)
    if fmt == "custom":
        return read_custom(path, name or "custom", label_range=label_range)
    raise ValueError(f"unknown source format {fmt!r}; choose one of {list(SOURCE_FORMATS)}")
