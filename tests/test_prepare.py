"""psamf.prepare: RawDataset -> shards + manifest; values, atomicity, validation, CLI, S3, personality CLS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from psamf import prepare as prep
from psamf.shards import SCHEMA_VERSION
from psamf.sources import RawDataset, RawSplit
from psamf.tokenizers import TINY, load_tokenizer, vocab_sha256

WORDS = ("the movie was good great bad boring really very actor plot fun sad ending music wow um "
         "perhaps loved hated story").split()
L = 16  # max_text_len in these tests (some transcripts are longer: truncation is exercised)


def make_raw(sizes=(12, 4, 4), audio_dim=3, visual_dim=4, max_frames=(9, 7), seed=0, name="mosi") -> RawDataset:
    """A small hand-built corpus with varied transcript and sequence lengths."""
    rng = np.random.default_rng(seed)
    splits = {}
    k = 0
    for split, n in zip(("train", "valid", "test"), sizes):
        ids, text, audio, visual, spk = [], [], [], [], []
        for i in range(n):
            ids.append(f"vid{k // 3:03d}$_${k % 3 + 1}")
            text.append(" ".join(rng.choice(WORDS, size=int(rng.integers(1, 14)))))
            audio.append(rng.normal(size=(int(rng.integers(1, max_frames[0] + 1)), audio_dim)).astype(np.float32))
            visual.append((rng.normal(size=(int(rng.integers(1, max_frames[1] + 1)), visual_dim)) * 3 + 1)
                          .astype(np.float32))
            spk.append(f"vid{k // 3:03d}" if i % 5 else None)
            k += 1
        label = np.round(rng.uniform(-3, 3, n), 1).astype(np.float32)
        label[0] = 0.0
        splits[split] = RawSplit(ids=ids, text=text, label=label, audio=audio, visual=visual, speaker=spk)
    return RawDataset(name=name, splits=splits, audio_dim=audio_dim, visual_dim=visual_dim, label_range=(-3.0, 3.0),
                      source_files={"/data/x.pkl": "ab" * 32}, repairs={"audio_nonfinite_values_zeroed": 2},
                      padding_side={"audio": "right", "visual": "right"})


def run_prepare(raw, out, **kw):
    kw.setdefault("tokenizer", TINY)
    kw.setdefault("personality_tokenizer", TINY)
    kw.setdefault("max_text_len", L)
    return prep.prepare(raw, str(out), **kw)


def files_under(out: Path) -> list[str]:
    """Every file under `out`, relative, sorted (the versioned layout has `v-<id>/` folders)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def shard_file(out: Path, name: str) -> Path:
    """The file of shard `name` (e.g. "train-00000.parquet") as the manifest names it."""
    man = json.loads((out / "manifest.json").read_text())
    (path,) = [s["path"] for s in man["shards"] if s["path"].rsplit("/", 1)[-1] == name]
    return out / path


def read_rows(out: Path) -> dict[str, dict]:
    man = json.loads((out / "manifest.json").read_text())
    rows = {}
    for s in man["shards"]:
        for r in pq.read_table(out / s["path"]).to_pylist():
            rows[r["sample_id"]] = r
    return rows


def source_rows(raw: RawDataset):
    for split in ("train", "valid", "test"):
        sp = raw.splits[split]
        for i, sid in enumerate(sp.ids):
            yield split, i, sid, sp


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ragged", "fixed"])
def test_roundtrip_values_equal_source(tmp_path, layout):
    raw = make_raw()
    out = tmp_path / "shards"
    man = run_prepare(raw, out, layout=layout)
    rows = read_rows(out)
    assert len(rows) == 20
    tok = load_tokenizer(TINY)
    t_a, t_v = man["max_lengths"]["audio"], man["max_lengths"]["visual"]
    index = 0
    for split, i, sid, sp in source_rows(raw):
        r = rows[sid]
        assert r["split"] == split and r["index"] == index and r["text"] == sp.text[i]
        index += 1
        assert r["speaker"] == sp.speaker[i]
        assert np.float32(r["label"]) == sp.label[i]
        enc = tok(sp.text[i], max_length=L, truncation=True, padding="max_length")
        assert r["input_ids"] == enc["input_ids"] == r["p_input_ids"]
        assert r["attention_mask"] == enc["attention_mask"] and r["token_type_ids"] == enc["token_type_ids"]
        assert r["text_len"] == sum(enc["attention_mask"]) == r["p_text_len"]
        for m, t_max in (("audio", t_a), ("visual", t_v)):
            src = getattr(sp, m)[i]
            got = np.asarray(r[m], np.float32)
            assert r[f"{m}_len"] == len(src)
            if layout == "ragged":
                assert got.shape == src.shape
                np.testing.assert_array_equal(got, src)
            else:
                got = got.reshape(t_max, src.shape[1])  # fixed_shape_tensor -> flat storage in to_pylist
                np.testing.assert_array_equal(got[: len(src)], src)  # valid-first
                assert not got[len(src):].any()  # zero padding after
    assert man["layout"] == layout


def test_train_rows_shuffled_other_splits_in_source_order(tmp_path):
    raw = make_raw(sizes=(30, 4, 4))
    out = tmp_path / "s"
    man = run_prepare(raw, out)
    train = pq.read_table(shard_file(out, "train-00000.parquet")).column("sample_id").to_pylist()
    assert sorted(train) == sorted(raw.splits["train"].ids) and train != raw.splits["train"].ids
    assert pq.read_table(shard_file(out, "valid-00000.parquet")).column("sample_id").to_pylist() == raw.splits["valid"].ids
    assert man["train_row_order"] == {"shuffled": True, "seed": 0}
    # same seed -> same bytes of content order
    man2 = run_prepare(raw, tmp_path / "s2")
    assert pq.read_table(shard_file(tmp_path / "s2", "train-00000.parquet")).column("sample_id").to_pylist() == train
    assert man2["counts"] == man["counts"]


def test_manifest_contents(tmp_path):
    raw = make_raw()
    out = tmp_path / "s"
    man = run_prepare(raw, out)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == man
    for key in ("schema_version", "dataset", "counts", "feature_dims", "max_lengths", "label_stats", "tokenizers",
                "personality_cls", "source_files", "repairs", "padding_side", "layout", "normalization", "shards",
                "psamf_version"):
        assert key in man, key
    assert man["schema_version"] == SCHEMA_VERSION and man["dataset"] == "mosi"
    assert man["counts"] == {"train": 12, "valid": 4, "test": 4}
    assert man["feature_dims"] == {"audio": 3, "visual": 4}
    all_a = [a for s in raw.splits.values() for a in s.audio]
    all_v = [v for s in raw.splits.values() for v in s.visual]
    assert man["max_lengths"] == {"audio": max(map(len, all_a)), "visual": max(map(len, all_v)), "text": L}
    y = raw.splits["valid"].label.astype(np.float64)
    st = man["label_stats"]["valid"]
    assert st["n"] == 4 and st["n_zero"] == int((y == 0).sum())
    assert st["mean"] == pytest.approx(y.mean()) and st["std"] == pytest.approx(y.std())
    assert st["min"] == pytest.approx(y.min()) and st["max"] == pytest.approx(y.max())
    tok = load_tokenizer(TINY)
    assert man["tokenizers"]["text"]["name"] == TINY
    assert man["tokenizers"]["text"]["vocab_sha256"] == vocab_sha256(tok)
    assert man["tokenizers"]["personality"]["vocab_size"] == len(tok.get_vocab())
    assert man["tokenizers"]["text"]["n_truncated"] == sum(
        len(tok(t)["input_ids"]) > L for s in raw.splits.values() for t in s.text)
    assert man["personality_cls"] is None
    assert man["source_files"] == raw.source_files and man["repairs"] == raw.repairs
    assert man["padding_side"] == {"text": "right", "audio": "right", "visual": "right"}
    # normalisation statistics: train split only, valid frames only
    fa = np.concatenate(raw.splits["train"].audio).astype(np.float64)
    fv = np.concatenate(raw.splits["train"].visual).astype(np.float64)
    np.testing.assert_allclose(man["normalization"]["audio"]["mean"], fa.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(man["normalization"]["audio"]["std"], fa.std(0), rtol=1e-10)
    np.testing.assert_allclose(man["normalization"]["visual"]["std"], fv.std(0), rtol=1e-10)
    assert man["normalization"]["split"] == "train" and man["normalization"]["audio"]["n_frames"] == len(fa)
    assert files_under(out) == sorted(["manifest.json", f"{man['data_version']}/.psamf-prepare"]
                                      + [s["path"] for s in man["shards"]])
    assert sum(s["rows"] for s in man["shards"]) == 20
    assert man["columns"]["audio"].startswith("list<") and man["columns"]["input_ids"].startswith("fixed_size_list")


def test_shard_sizing(tmp_path):
    raw = make_raw()
    man = run_prepare(raw, tmp_path / "a", rows_per_shard=5)
    v = man["data_version"]
    assert [s["path"] for s in man["shards"]] == [f"{v}/train-00000.parquet", f"{v}/train-00001.parquet",
                                                   f"{v}/train-00002.parquet", f"{v}/valid-00000.parquet",
                                                   f"{v}/test-00000.parquet"]
    assert [s["rows"] for s in man["shards"]] == [5, 5, 2, 4, 4]
    assert len(read_rows(tmp_path / "a")) == 20
    man = run_prepare(raw, tmp_path / "b", target_shard_mb=0.0005)  # ~500 bytes -> a few rows per shard
    assert len(man["shards"]) > 5 and man["rows_per_shard"] < 5
    assert len(read_rows(tmp_path / "b")) == 20


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------


def _crash_after(monkeypatch, n_ok: int):
    real = prep._write_shard
    calls = {"n": 0}

    def flaky(fs, path, table, *args):
        if calls["n"] >= n_ok:
            raise OSError("simulated crash while writing a shard")
        calls["n"] += 1
        return real(fs, path, table, *args)

    monkeypatch.setattr(prep, "_write_shard", flaky)


def test_crash_mid_write_leaves_nothing_complete(tmp_path, monkeypatch):
    from psamf.shards import IncompleteDatasetError, read_manifest

    raw = make_raw()
    out = tmp_path / "s"
    _crash_after(monkeypatch, 1)
    with pytest.raises(OSError, match="simulated crash"):
        run_prepare(raw, out, rows_per_shard=4)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.parquet"))  # the failed run removed what it wrote
    with pytest.raises(IncompleteDatasetError, match="no manifest.json"):
        read_manifest(str(out))
    monkeypatch.undo()
    man = run_prepare(raw, out, rows_per_shard=4)
    assert read_manifest(str(out)) == man
    assert len(read_rows(out)) == 20
    assert files_under(out) == sorted(["manifest.json", f"{man['data_version']}/.psamf-prepare"]
                                      + [s["path"] for s in man["shards"]])


def test_crash_during_rerun_keeps_previous_complete_dataset(tmp_path, monkeypatch):
    from psamf.shards import read_manifest

    out = tmp_path / "s"
    man1 = run_prepare(make_raw(seed=1), out, rows_per_shard=3)
    _crash_after(monkeypatch, 2)
    with pytest.raises(OSError):
        run_prepare(make_raw(seed=2), out, rows_per_shard=5)
    assert read_manifest(str(out)) == man1  # old data set still complete and intact
    assert set(read_rows(out)) == {sid for *_, sid, _ in source_rows(make_raw(seed=1))}
    monkeypatch.undo()
    # a version folder left by a hard crash (no cleanup; marked as psamf's) is removed by the next run
    stale = out / "v-deadbeef"
    stale.mkdir()
    (stale / ".psamf-prepare").write_text("{}")
    (stale / "train-00000.parquet").write_bytes(b"junk")
    man2 = run_prepare(make_raw(seed=2), out, rows_per_shard=5)
    assert files_under(out) == sorted(["manifest.json", f"{man2['data_version']}/.psamf-prepare"]
                                      + [s["path"] for s in man2["shards"]])
    rows = read_rows(out)
    raw2 = make_raw(seed=2)
    for split, i, sid, sp in source_rows(raw2):
        np.testing.assert_array_equal(np.asarray(rows[sid]["audio"], np.float32), sp.audio[i])


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def _mutate(what):
    raw = make_raw()
    sp = raw.splits["valid"]
    sid = sp.ids[2]
    if what == "empty_text":
        sp.text[2] = "   "
        return raw, r"text: empty transcript.*split='valid'.*" + _re(sid) + r".*/data/x\.pkl"
    if what == "text_without_tokens":  # zero-width spaces pass str.strip() but the tokenizer drops them
        sp.text[2] = "\u200b\u200b"
        return raw, r"text: no tokens after tokenisation.*only \[CLS\] \[SEP\].*split='valid'.*" + _re(sid)
    if what == "label_range":
        sp.label[2] = 3.5
        return raw, r"label: 3\.5 outside the label range \[-3\.0, 3\.0\].*'valid'.*" + _re(sid)
    if what == "label_nan":
        sp.label[2] = np.nan
        return raw, r"label: not finite.*" + _re(sid)
    if what == "duplicate_id":
        sp.ids[2] = raw.splits["train"].ids[0]
        return raw, r"sample_id: duplicate \(also in split 'train'\).*'valid'"
    if what == "audio_dim":
        sp.audio[2] = np.zeros((4, 5), np.float32)
        return raw, r"audio: feature dim 5 != declared audio_dim 3.*" + _re(sid)
    if what == "visual_zero_len":
        sp.visual[2] = np.zeros((0, 4), np.float32)
        return raw, r"visual: zero length.*'valid'.*" + _re(sid)
    if what == "audio_1d":
        sp.audio[2] = np.zeros(3, np.float32)
        return raw, r"audio: expected \(frames, 3\).*" + _re(sid)
    if what == "visual_nan":
        sp.visual[2][0, 0] = np.inf
        return raw, r"visual: contains NaN/inf.*" + _re(sid)
    if what == "length_mismatch":
        sp.text.pop()
        return raw, r"text: 3 entries but 4 ids \(split='valid'"
    if what == "no_train":
        del raw.splits["train"]
        return raw, r"splits: a non-empty 'train' split is required"
    raise AssertionError(what)


def _re(s: str) -> str:
    import re

    return re.escape(s)


@pytest.mark.parametrize("what", ["empty_text", "text_without_tokens", "label_range", "label_nan", "duplicate_id",
                                  "audio_dim", "visual_zero_len", "audio_1d", "visual_nan", "length_mismatch",
                                  "no_train"])
def test_bad_input_rejected_before_writing(tmp_path, what):
    raw, pattern = _mutate(what)
    out = tmp_path / "s"
    with pytest.raises(ValueError, match=pattern):
        run_prepare(raw, out)
    assert not out.exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        run_prepare(make_raw(), tmp_path / "x", layout="dense")
    with pytest.raises(ValueError, match="rows_per_shard"):
        run_prepare(make_raw(), tmp_path / "x", rows_per_shard=0)
    with pytest.raises(ValueError, match=r"max_text_len must be in \[3, 512\]"):
        run_prepare(make_raw(), tmp_path / "x", max_text_len=2)
    with pytest.raises(ValueError, match="tokenizer"):
        run_prepare(make_raw(), tmp_path / "x", tokenizer=str(tmp_path / "no-such-tokenizer"))
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_prepare(tmp_path, monkeypatch, capsys):
    from psamf import cli

    seen = {}

    def fake_read_source(fmt, path, *, label_csv=None, name=None):
        seen.update(format=fmt, input=path, dataset=name, labels=label_csv)
        return make_raw()

    from psamf import sources

    monkeypatch.setattr(sources, "read_source", fake_read_source)  # the one read_source the CLI calls
    out = tmp_path / "cli"
    rc = cli.main(["prepare", "--format", "mult", "--input", "x.pkl", "--labels", "l.csv", "--dataset", "mosi",
                   "--out", str(out), "--tokenizer", TINY, "--max-text-len", "12", "--rows-per-shard", "6"])
    assert rc == 0
    assert seen == {"format": "mult", "input": "x.pkl", "dataset": "mosi", "labels": "l.csv"}
    man = json.loads((out / "manifest.json").read_text())
    assert man["tokenizers"]["personality"]["name"] == TINY and man["max_lengths"]["text"] == 12
    assert len(man["shards"]) == 4 and "wrote 4 shards" in capsys.readouterr().out

    monkeypatch.setattr(sources, "read_source", lambda *a, **k: _mutate("empty_text")[0])
    rc = cli.main(["prepare", "--format", "mmsa", "--input", "x.pkl", "--dataset", "mosi", "--out",
                   str(tmp_path / "bad"), "--tokenizer", TINY])
    assert rc == 2 and "empty transcript" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Personality CLS (Ray Data map_batches) and S3
# ---------------------------------------------------------------------------------------------


def _tiny_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    vocab = len(load_tokenizer(TINY).get_vocab())
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=64), add_pooling_layer=False).eval()


@pytest.mark.integration
def test_personality_cls_pass(tmp_path, ray_cluster):
    import torch

    raw = make_raw()
    model = _tiny_bert()
    out = tmp_path / "s"
    man = run_prepare(raw, out, personality_model=model, personality_batch_size=5)
    assert man["personality_cls"]["dim"] == 16 and man["columns"]["personality_cls"].startswith("fixed_size_list")
    rows = read_rows(out)
    sids = list(rows)
    ids = torch.tensor([rows[s]["p_input_ids"] for s in sids])
    mask = torch.tensor([rows[s]["p_attention_mask"] for s in sids])
    tt = torch.tensor([rows[s]["p_token_type_ids"] for s in sids])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state[:, 0].numpy()
    got = np.asarray([rows[s]["personality_cls"] for s in sids], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_personality_cls_from_model_config(tmp_path, ray_cluster):
    import torch

    from psamf.config import Config
    from psamf.model import load_personality_encoder

    mc = Config.from_preset("tiny").model
    raw = make_raw(sizes=(6, 2, 2))
    man = run_prepare(raw, tmp_path / "s", personality_model=mc)
    assert man["personality_cls"]["dim"] == mc.hidden_size
    assert man["personality_cls"]["model"].startswith("random-init BertModel")
    rows = read_rows(tmp_path / "s")
    r = rows[raw.splits["test"].ids[1]]
    enc = load_personality_encoder(mc)
    with torch.no_grad():
        want = enc(input_ids=torch.tensor([r["p_input_ids"]]), attention_mask=torch.tensor([r["p_attention_mask"]]),
                   token_type_ids=torch.tensor([r["p_token_type_ids"]])).last_hidden_state[0, 0].numpy()
    np.testing.assert_allclose(r["personality_cls"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_s3_roundtrip(s3_bucket, ray_cluster):
    """prepare to s3:// (moto) through fsspec, read back with build_datasets + iter_batches on Ray."""
    from psamf.config import DataConfig
    from psamf.data import build_datasets, iter_batches
    from psamf.shards import read_manifest

    raw = make_raw()
    uri = f"s3://{s3_bucket}/mosi/shards"
    man = run_prepare(raw, uri, rows_per_shard=5)
    assert read_manifest(uri) == man
    cfg = DataConfig(uri=uri, tokenizer=TINY, personality_tokenizer=TINY, max_text_len=L, materialize=False)
    ds = build_datasets(cfg)  # streamed from S3 on every pass
    got = {}
    for split in ("train", "valid", "test"):
        for b in iter_batches(ds[split], cfg, 4, epoch=0, train=False):
            for j, sid in enumerate(b["sample_id"]):
                n_a = int(b["audio_lengths"][j])
                got[sid] = (split, float(b["label"][j]), b["audio"][j, :n_a].numpy(), int(b["index"][j]))
    assert len(got) == 20
    for split, i, sid, sp in source_rows(raw):
        g_split, g_label, g_audio, _ = got[sid]
        assert g_split == split and g_label == pytest.approx(float(sp.label[i]))
        np.testing.assert_array_equal(g_audio, sp.audio[i])
    # re-run over S3 overwrites cleanly: only the new shards + manifest remain
    import s3fs

    man2 = run_prepare(raw, uri, rows_per_shard=20)
    from psamf.storage import s3_endpoint

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint())
    fs.invalidate_cache()
    names = sorted(p.split("/mosi/shards/", 1)[1] for p in fs.find(f"{s3_bucket}/mosi/shards"))
    assert names == sorted(["manifest.json", f"{man2['data_version']}/.psamf-prepare"]
                           + [s["path"] for s in man2["shards"]])


@pytest.mark.filterwarnings("ignore::psamf.sources.ChecksumMismatchWarning")  # synthetic != published file
@pytest.mark.parametrize("fmt", ["mmsa", "mult", "custom"])
def test_synth_reader_prepare_roundtrip(tmp_path, fmt):
    """End to end: psamf.synth -> psamf.sources reader -> prepare -> read back == the synthetic source
    (transforms: the readers zero NaN/inf and keep only valid frames; prepare changes no value)."""
    from psamf.sources import read_source
    from psamf.synth import generate, synthesize

    paths = synthesize("mosi", fmt, tmp_path / "src", seed=3, scale=0.02)
    src = paths.get("pickle") or paths["manifest"]
    raw = read_source(fmt, str(src), name="mosi", label_csv=str(paths.get("label_csv") or "") or None)
    out = tmp_path / "shards"
    man = run_prepare(raw, out, max_text_len=50)
    corpus = generate("mosi", seed=3, scale=0.02)
    rows = read_rows(out)
    assert man["counts"] == {s: len(corpus.splits[s]) for s in ("train", "valid", "test")}
    for split, sp in corpus.splits.items():
        for i, sid in enumerate(sp.ids):
            r = rows[sid]
            assert r["split"] == split and r["text"] == sp.text[i]
            assert np.float32(r["label"]) == sp.label[i]
            for m, frames in (("audio", sp.audio_frames(i)), ("visual", sp.vision_frames(i))):
                want = np.where(np.isfinite(frames), frames, 0.0).astype(np.float32)  # readers zero NaN/inf
                got = np.asarray(r[m], np.float32)
                assert r[f"{m}_len"] == len(want)
                np.testing.assert_array_equal(got, want)
    assert sum(man["repairs"].values()) > 0  # the synthetic defects were repaired and counted
    assert man["source_files"] and all(len(h) == 64 for h in man["source_files"].values())


@pytest.mark.filterwarnings("ignore::psamf.sources.ChecksumMismatchWarning")
def test_cli_end_to_end_on_synthetic_files(tmp_path):
    """`psamf synth` files -> `psamf prepare` (real reader, no mocks) -> a readable manifest."""
    from psamf import cli
    from psamf.shards import read_manifest
    from psamf.synth import synthesize

    paths = synthesize("sims", "mult", tmp_path / "src", seed=1, scale=0.02)
    out = tmp_path / "shards"
    rc = cli.main(["prepare", "--format", "mult", "--input", str(paths["pickle"]), "--labels",
                   str(paths["label_csv"]), "--dataset", "sims", "--out", str(out), "--tokenizer", TINY,
                   "--max-text-len", "39", "--layout", "fixed"])
    assert rc == 0
    man = read_manifest(str(out))
    assert man["dataset"] == "sims" and man["layout"] == "fixed" and man["label_range"] == [-1.0, 1.0]
    assert man["feature_dims"] == {"audio": 33, "visual": 709}
    assert len(man["source_files"]) == 2  # pickle + label CSV, by SHA-256
    assert sum(man["counts"].values()) == sum(s["rows"] for s in man["shards"])
