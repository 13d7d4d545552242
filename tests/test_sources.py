"""Readers: MMSA, MulT + label.csv (id join), custom manifests, the restricted unpickler, checksums."""

from __future__ import annotations

import csv
import hashlib
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from psamf.sources import (
    ChecksumMismatchWarning,
    UnsafePickleError,
    normalize_id,
    read_custom,
    read_mmsa,
    read_mult,
    read_source,
    safe_load_pickle,
)
from psamf.synth import generate, synthesize

pytestmark = pytest.mark.filterwarnings("ignore::psamf.sources.ChecksumMismatchWarning")

SCALE = 0.05
SPLITS = ("train", "valid", "test")


def _clean(x: np.ndarray) -> np.ndarray:
    """The documented transform: NaN and ±inf -> 0."""
    return np.where(np.isfinite(x), x, 0).astype(np.float32)


def _nonfinite(corpus, frames: str) -> int:
    return sum(int((~np.isfinite(getattr(c, frames)(i))).sum())
               for c in corpus.splits.values() for i in range(len(c)))


@pytest.fixture(scope="module")
def corpora():
    return {k: generate(k, seed=0, scale=SCALE) for k in ("mosi", "sims")}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for kind in ("mosi", "sims"):
        for fmt in ("mmsa", "mult", "custom"):
            out[kind, fmt] = synthesize(kind, fmt, root / f"{kind}-{fmt}", seed=0, scale=SCALE)
    return out


def _assert_matches_corpus(ds, corpus, *, check_unimodal: bool = True):
    assert set(ds.splits) == set(SPLITS)
    assert ds.audio_dim == corpus.spec.audio_dim and ds.visual_dim == corpus.spec.visual_dim
    assert ds.label_range == corpus.spec.label_range
    for s in SPLITS:
        raw, c = ds.splits[s], corpus.splits[s]
        assert raw.ids == c.ids
        assert raw.text == c.text
        assert raw.speaker == c.videos
        assert raw.label.dtype == np.float32
        np.testing.assert_array_equal(raw.label, c.label)
        assert len(raw.audio) == len(raw.visual) == len(c)
        for i in range(len(c)):
            assert raw.audio[i].dtype == np.float32 and raw.visual[i].dtype == np.float32
            np.testing.assert_array_equal(raw.audio[i], _clean(c.audio_frames(i)))
            np.testing.assert_array_equal(raw.visual[i], _clean(c.vision_frames(i)))
        if check_unimodal and c.unimodal:
            for m in ("T", "A", "V"):
                np.testing.assert_array_equal(raw.unimodal_labels[m], c.unimodal[m])
    assert ds.repairs == {
        "audio_nonfinite_values_zeroed": _nonfinite(corpus, "audio_frames"),
        "visual_nonfinite_values_zeroed": _nonfinite(corpus, "vision_frames"),
    }
    assert ds.repairs["audio_nonfinite_values_zeroed"] > 0 and ds.repairs["visual_nonfinite_values_zeroed"] > 0
    for path, digest in ds.source_files.items():
        assert digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mosi", "sims"])
def test_mmsa_round_trip(files, corpora, kind):
    ds = read_mmsa(files[kind, "mmsa"]["pickle"])
    assert ds.name == kind  # inferred from the feature dims
    assert ds.padding_side == {"audio": "right", "visual": "right"}
    assert list(ds.source_files) == [str(files[kind, "mmsa"]["pickle"])]
    _assert_matches_corpus(ds, corpora[kind])


@pytest.mark.parametrize("kind", ["mosi", "sims"])
def test_mult_round_trip(files, corpora, kind):
    p = files[kind, "mult"]
    ds = read_mult(p["pickle"], p["label_csv"])
    assert ds.name == kind
    assert ds.padding_side == {"audio": "left", "visual": "left"}
    assert set(ds.source_files) == {str(p["pickle"]), str(p["label_csv"])}
    _assert_matches_corpus(ds, corpora[kind])


@pytest.mark.parametrize("kind", ["mosi", "sims"])
def test_custom_round_trip(files, corpora, kind):
    ds = read_source("custom", files[kind, "custom"]["manifest"], name=kind)
    assert ds.name == kind
    assert len(ds.source_files) == 1 + 2 * sum(len(s) for s in corpora[kind].splits.values())
    _assert_matches_corpus(ds, corpora[kind], check_unimodal=False)


def test_custom_parquet_manifest(files, corpora, tmp_path):
    import pandas as pd

    src = files["mosi", "custom"]["manifest"]
    shutil.copytree(src.parent, tmp_path / "c")
    df = pd.read_csv(tmp_path / "c" / "manifest.csv", dtype=str, keep_default_na=False)
    df["label"] = df["label"].astype("float32")
    df.to_parquet(tmp_path / "c" / "manifest.parquet")
    ds = read_custom(tmp_path / "c" / "manifest.parquet", name="mosi")
    _assert_matches_corpus(ds, corpora["mosi"], check_unimodal=False)


def test_read_source_dispatch_errors(files):
    with pytest.raises(ValueError, match="label_csv"):
        read_source("mult", files["mosi", "mult"]["pickle"])
    with pytest.raises(ValueError, match="unknown source format"):
        read_source("hdf5", files["mosi", "mult"]["pickle"])


# ------------------------------------------------------------------------------------------------
# MulT: the join is by id
# ------------------------------------------------------------------------------------------------


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> None:
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def test_mult_join_is_by_id_not_by_position(files, corpora, tmp_path):
    p = files["mosi", "mult"]
    rows = _read_csv(p["label_csv"])
    corpus = corpora["mosi"]
    pickle_order = [f"{v}_{c}" for s in SPLITS for v, c in zip(corpus.splits[s].videos, corpus.splits[s].clips)]
    assert [f"{r['video_id']}_{r['clip_id']}" for r in rows] != pickle_order  # as written: not positional
    # shuffle again and reorder the columns (copies in the wild differ): still joined correctly
    order = np.random.default_rng(5).permutation(len(rows))
    columns = ["video_id", "clip_id", "text", "label", "annotation", "mode", "label_T", "label_A", "label_V"]
    _write_csv(tmp_path / "label.csv", [rows[k] for k in order], columns)
    ds = read_mult(p["pickle"], tmp_path / "label.csv")
    for s in SPLITS:
        assert ds.splits[s].text == corpus.splits[s].text
        assert ds.splits[s].ids == corpus.splits[s].ids


def test_video_ids_with_underscores_split_on_the_last_one(corpora):
    videos = [v for s in corpora["mosi"].splits.values() for v in s.videos]
    assert any("_" in v for v in videos)  # so the MulT round trip above exercised the last-underscore split
    assert normalize_id("ab_c_D-e_12") == ("ab_c_D-e", "12")
    assert normalize_id(b"03bSnISJMiM_1") == ("03bSnISJMiM", "1")
    assert normalize_id("video_0001$_$0003") == ("video_0001", "0003")
    assert normalize_id("Bfr499ggo-0[4]") == ("Bfr499ggo-0", "4")
    with pytest.raises(ValueError, match="no '\\$_\\$' or '_'"):
        normalize_id("novideoid")


def test_mult_missing_csv_row_is_an_error_listing_the_id(files, tmp_path):
    p = files["mosi", "mult"]
    rows = _read_csv(p["label_csv"])
    gone = rows.pop(3)
    _write_csv(tmp_path / "label.csv", rows)
    with pytest.raises(ValueError) as ei:
        read_mult(p["pickle"], tmp_path / "label.csv")
    msg = str(ei.value)
    assert f"{gone['video_id']}_{gone['clip_id']}" in msg
    assert "1 pickle id(s)" in msg
    assert str(p["pickle"]) in msg and str(tmp_path / "label.csv") in msg


def test_mult_duplicate_csv_row_is_an_error(files, tmp_path):
    p = files["mosi", "mult"]
    rows = _read_csv(p["label_csv"])
    _write_csv(tmp_path / "label.csv", rows + [rows[0]])
    with pytest.raises(ValueError, match="duplicate"):
        read_mult(p["pickle"], tmp_path / "label.csv")


def test_mult_mode_disagreement_is_an_error(files, tmp_path):
    p = files["mosi", "mult"]
    rows = _read_csv(p["label_csv"])
    k = next(i for i, r in enumerate(rows) if r["mode"] == "train")
    rows[k]["mode"] = "test"
    _write_csv(tmp_path / "label.csv", rows)
    with pytest.raises(ValueError, match=f"{rows[k]['video_id']}_{rows[k]['clip_id']} \\(pickle train, csv test\\)"):
        read_mult(p["pickle"], tmp_path / "label.csv")


def test_mult_missing_csv_column(files, tmp_path):
    p = files["mosi", "mult"]
    rows = _read_csv(p["label_csv"])
    _write_csv(tmp_path / "label.csv", rows, [c for c in rows[0] if c != "text"])
    with pytest.raises(ValueError, match="missing column 'text'"):
        read_mult(p["pickle"], tmp_path / "label.csv")


def test_mult_seven_column_labels_keep_column_0(files, corpora, tmp_path):
    p = files["mosi", "mult"]
    data = safe_load_pickle(p["pickle"])
    for s in SPLITS:
        y = data[s]["labels"]
        extra = np.full((y.shape[0], 1, 6), 9.0, dtype=np.float32)  # emotions: out of range if used
        data[s]["labels"] = np.concatenate([y, extra], axis=2)
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump(data, f)
    ds = read_mult(tmp_path / "m.pkl", p["label_csv"])
    for s in SPLITS:
        np.testing.assert_array_equal(ds.splits[s].label, corpora["mosi"].splits[s].label)


def test_mult_right_padded_file_is_detected(files, corpora, tmp_path):
    p = files["mosi", "mult"]
    data = safe_load_pickle(p["pickle"])
    for s in SPLITS:
        c = corpora["mosi"].splits[s]
        data[s]["audio"], data[s]["vision"] = c.audio.copy(), c.vision.copy()  # valid-first
    with open(tmp_path / "m.pkl", "wb") as f:
        pickle.dump(data, f)
    ds = read_mult(tmp_path / "m.pkl", p["label_csv"])
    assert ds.padding_side == {"audio": "right", "visual": "right"}
    _assert_matches_corpus(ds, corpora["mosi"])


# ------------------------------------------------------------------------------------------------
# MMSA: padding side, repairs, validation
# ------------------------------------------------------------------------------------------------


def _mmsa(files, kind="mosi"):
    return safe_load_pickle(files[kind, "mmsa"]["pickle"])


def _dump(data, path: Path) -> Path:
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    return path


def test_mmsa_left_padded_file_is_detected(files, corpora, tmp_path):
    data = _mmsa(files)
    for s in SPLITS:
        for m in ("audio", "vision"):
            x, lens = data[s][m], data[s][f"{m}_lengths"]
            left = np.zeros_like(x)
            for i, n in enumerate(lens):
                left[i, x.shape[1] - n:] = x[i, :n]
            data[s][m] = left
    ds = read_mmsa(_dump(data, tmp_path / "u.pkl"))
    assert ds.padding_side == {"audio": "left", "visual": "left"}
    _assert_matches_corpus(ds, corpora["mosi"])


def test_mmsa_zero_length_is_repaired_to_one_zero_frame(files, tmp_path):
    data = _mmsa(files)
    data["valid"]["audio_lengths"][2] = 0
    data["valid"]["audio"][2] = 0.0
    ds = read_mmsa(_dump(data, tmp_path / "u.pkl"))
    a = ds.splits["valid"].audio[2]
    assert a.shape == (1, 5) and not a.any()
    assert ds.repairs["audio_zero_length_repaired"] == 1


def test_mmsa_missing_key_names_key_split_and_file(files, tmp_path):
    data = _mmsa(files)
    del data["valid"]["vision"]
    path = _dump(data, tmp_path / "u.pkl")
    with pytest.raises(ValueError) as ei:
        read_mmsa(path)
    assert "'vision'" in str(ei.value) and "'valid'" in str(ei.value) and str(path) in str(ei.value)


def test_mmsa_missing_split(files, tmp_path):
    data = _mmsa(files)
    del data["test"]
    with pytest.raises(ValueError, match="missing split\\(s\\) \\['test'\\]"):
        read_mmsa(_dump(data, tmp_path / "u.pkl"))


def test_mmsa_dims_differing_between_splits(files, tmp_path):
    data = _mmsa(files)
    x = data["test"]["audio"]
    data["test"]["audio"] = np.concatenate([x, np.ones_like(x[:, :, :1])], axis=2)
    with pytest.raises(ValueError, match="differ between splits"):
        read_mmsa(_dump(data, tmp_path / "u.pkl"))


def test_mmsa_labels_out_of_range(files, tmp_path):
    data = _mmsa(files)
    data["train"]["regression_labels"][[1, 4]] = 4.5
    path = _dump(data, tmp_path / "u.pkl")
    with pytest.raises(ValueError) as ei:
        read_mmsa(path)
    assert "2 'regression_labels' value(s) outside the label range [-3.0, 3.0]" in str(ei.value)
    assert str(path) in str(ei.value)


def test_mmsa_sims_range_applies_to_sims(files, tmp_path):
    data = _mmsa(files, "sims")
    data["test"]["regression_labels"][0] = 1.4  # fine for MOSI, not for SIMS
    with pytest.raises(ValueError, match="outside the label range \\[-1.0, 1.0\\]"):
        read_mmsa(_dump(data, tmp_path / "u.pkl"))


def test_mmsa_duplicate_ids(files, tmp_path):
    data = _mmsa(files)
    data["test"]["id"][0] = data["train"]["id"][5]
    with pytest.raises(ValueError, match=f"duplicate id.*{data['train']['id'][5].replace('$', '.')}"):
        read_mmsa(_dump(data, tmp_path / "u.pkl"))


def test_mmsa_bad_lengths(files, tmp_path):
    data = _mmsa(files)
    data["train"]["audio_lengths"][0] = 10_000
    with pytest.raises(ValueError, match="'audio_lengths' must hold integers"):
        read_mmsa(_dump(data, tmp_path / "u.pkl"))


def test_mmsa_without_lengths_infers_them(files, corpora, tmp_path):
    data = _mmsa(files)
    for s in SPLITS:
        del data[s]["audio_lengths"], data[s]["vision_lengths"]
    ds = read_mmsa(_dump(data, tmp_path / "aligned.pkl"))
    assert ds.padding_side == {"audio": "right", "visual": "right"}
    _assert_matches_corpus(ds, corpora["mosi"])


# ------------------------------------------------------------------------------------------------
# checksums
# ------------------------------------------------------------------------------------------------


def test_published_name_with_other_hash_warns_but_reads(files, tmp_path):
    dst = tmp_path / "MOSI" / "Processed" / "unaligned_50.pkl"
    dst.parent.mkdir(parents=True)
    shutil.copy(files["mosi", "mmsa"]["pickle"], dst)
    with pytest.warns(ChecksumMismatchWarning, match="MOSI/Processed/unaligned_50.pkl"):
        ds = read_mmsa(dst)
    assert ds.name == "mosi" and len(ds.splits["train"]) > 0


def test_basename_plus_name_is_matched(files, tmp_path):
    dst = tmp_path / "unaligned_39.pkl"
    shutil.copy(files["sims", "mmsa"]["pickle"], dst)
    with pytest.warns(ChecksumMismatchWarning, match="SIMS/Processed/unaligned_39.pkl"):
        read_mmsa(dst, name="sims")


def test_unpublished_name_does_not_warn(files, tmp_path):
    dst = tmp_path / "my_features.pkl"
    shutil.copy(files["mosi", "mmsa"]["pickle"], dst)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ChecksumMismatchWarning)
        ds = read_mmsa(dst)
    assert ds.source_files[str(dst)] == hashlib.sha256(dst.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# restricted unpickler
# ------------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_side_effect(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "unaligned_50.pkl"
    path.write_bytes(pickle.dumps({"train": {"audio": np.zeros(3), "x": _Evil(marker)}}))
    with pytest.raises(UnsafePickleError) as ei:
        safe_load_pickle(path)
    assert isinstance(ei.value, ValueError)
    assert "system" in str(ei.value) and str(path) in str(ei.value)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to unpickle global"):
        read_mmsa(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # the payload is live: a plain unpickler runs it
    assert marker.exists()


def test_other_globals_are_refused(tmp_path):
    path = tmp_path / "x.pkl"
    path.write_bytes(pickle.dumps(Path("/etc/passwd")))
    with pytest.raises(UnsafePickleError, match="pathlib"):
        safe_load_pickle(path)


def test_numpy_payloads_are_admitted(tmp_path):
    obj = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(["x", "y"]),
           "b": np.array([b"ab_1", b"cd_2"]), "o": np.array(["t", "u"], dtype=object),
           "scalar": np.float64(1.5), "t": (1, 2.0, "z", b"q", None, True), "set": {1, 2}}
    for proto in (2, 4, 5):
        path = tmp_path / f"ok{proto}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=proto))
        back = safe_load_pickle(path)
        np.testing.assert_array_equal(back["a"], obj["a"])
        assert list(back["b"]) == [b"ab_1", b"cd_2"] and back["scalar"] == 1.5 and back["set"] == {1, 2}


def test_truncated_and_corrupt_pickles(files, tmp_path):
    good = files["mosi", "mmsa"]["pickle"].read_bytes()
    half = tmp_path / "half.pkl"
    half.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        safe_load_pickle(half)
    zeros = tmp_path / "zeros.pkl"  # what a failed download looks like (MMSA #98)
    zeros.write_bytes(b"\x00" * 1024)
    with pytest.raises(ValueError, match="zeros.pkl: pickle looks truncated or corrupt.*invalid load key"):
        safe_load_pickle(zeros)
    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_mmsa(empty)
    with pytest.raises(ValueError, match="file not found"):
        read_mmsa(tmp_path / "nope.pkl")


# ------------------------------------------------------------------------------------------------
# custom manifests: errors name the row id, the field and the file
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def custom_copy(files, tmp_path):
    src = files["mosi", "custom"]["manifest"].parent
    dst = tmp_path / "custom"
    shutil.copytree(src, dst)
    return dst / "manifest.csv"


def test_custom_missing_feature_file(custom_copy):
    rows = _read_csv(custom_copy)
    (custom_copy.parent / rows[4]["visual_path"]).unlink()
    with pytest.raises(ValueError) as ei:
        read_custom(custom_copy)
    msg = str(ei.value)
    assert rows[4]["id"] in msg and "'visual_path'" in msg and rows[4]["visual_path"] in msg and "not found" in msg


def test_custom_npz_without_features_key(custom_copy):
    rows = _read_csv(custom_copy)
    np.savez(custom_copy.parent / rows[1]["visual_path"], frames=np.zeros((3, 20), np.float32))
    with pytest.raises(ValueError, match=f"{rows[1]['id'].replace('$', '.')}.*no key 'features'"):
        read_custom(custom_copy)


def test_custom_dim_mismatch(custom_copy):
    rows = _read_csv(custom_copy)
    np.save(custom_copy.parent / rows[6]["audio_path"], np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match="'audio_path'.*feature dim 7"):
        read_custom(custom_copy)


def test_custom_bad_rows(custom_copy):
    rows = _read_csv(custom_copy)
    bad = [dict(r) for r in rows]
    bad[0]["split"] = "holdout"
    _write_csv(custom_copy, bad)
    with pytest.raises(ValueError, match="field 'split'"):
        read_custom(custom_copy)
    bad = [dict(r) for r in rows]
    bad[0]["label"] = "7"
    _write_csv(custom_copy, bad)
    with pytest.raises(ValueError, match="outside the label range"):
        read_custom(custom_copy)
    with pytest.raises(ValueError, match="outside the label range \\[-1.0, 1.0\\]"):
        _write_csv(custom_copy, rows)
        read_custom(custom_copy, name="sims")  # MOSI-range labels are out of range for SIMS
    _write_csv(custom_copy, rows + [rows[0]])
    with pytest.raises(ValueError, match="duplicate id"):
        read_custom(custom_copy)
    _write_csv(custom_copy, [r for r in rows if r["split"] != "valid"])
    with pytest.raises(ValueError, match="no rows for split\\(s\\) \\['valid'\\]"):
        read_custom(custom_copy)
    _write_csv(custom_copy, rows, [c for c in rows[0] if c != "label"])
    with pytest.raises(ValueError, match="missing column 'label'"):
        read_custom(custom_copy)


def test_custom_empty_or_null_transcripts_are_refused_naming_the_row(custom_copy):
    import pandas as pd

    rows = _read_csv(custom_copy)
    bad = [dict(r) for r in rows]
    bad[3]["text"] = "  "
    _write_csv(custom_copy, bad)
    with pytest.raises(ValueError, match=f"manifest.csv: row id '{re.escape(rows[3]['id'])}' field 'text' is empty"):
        read_custom(custom_copy)
    # a null in a Parquet manifest is an empty field, not the transcript "None" or "nan"
    df = pd.DataFrame(rows).astype({"label": "float32"})
    df["text"] = df["text"].astype(object)
    df.loc[5, "text"] = None
    df.to_parquet(custom_copy.with_suffix(".parquet"))
    with pytest.raises(ValueError, match=f"row id '{re.escape(rows[5]['id'])}' field 'text' is empty"):
        read_custom(custom_copy.with_suffix(".parquet"))
    with pytest.raises(ValueError, match=f"row id '{re.escape(rows[5]['id'])}' field 'text' is empty"):
        read_custom(custom_copy.with_suffix(".parquet"), for_prediction=True)


def test_custom_ids_without_separator_use_the_speaker(custom_copy):
    rows = _read_csv(custom_copy)
    for k, r in enumerate(rows):
        r["id"] = f"utt{k}"
    rows[0]["speaker"] = ""
    _write_csv(custom_copy, rows)
    ds = read_custom(custom_copy)
    train = ds.splits["train"]
    assert train.ids[0] == "utt0$_$utt0" and train.ids[1] == f"{rows[1]['speaker']}$_$utt1"
    assert ds.repairs.get("visual_nonfinite_values_zeroed", 0) > 0
