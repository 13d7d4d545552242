"""psamf.data: collate on hand-built Arrow tables, windows / length grouping, Ray pipeline, 2 Train workers."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa
import pytest
import torch

from psamf.config import DataConfig
from psamf.data import PadCollate, StartedEarly, _WindowCollate, padding_stats
from psamf.tokenizers import TINY

L = 8


def fsl(rows, width, typ=pa.int32()):
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(rows).reshape(-1), typ), width)


def hand_table(layout="ragged", *, with_cls=False, a_lens=(3, 1, 5), v_lens=(2, 4, 1), t_lens=(4, 3, 6),
               p_lens=(3, 5, 3), D_a=2, D_v=3, T_max=(6, 5)):
    """Three shard rows built by hand: frame values encode (row, frame, feature) so padding errors show."""
    B = len(a_lens)
    cols = {"index": pa.array(np.arange(10, 10 + B), pa.int64()),
            "sample_id": pa.array([f"v{i}$_$1" for i in range(B)]),
            "label": pa.array(np.linspace(-1, 1, B), pa.float32())}
    for prefix, lens in (("", t_lens), ("p_", p_lens)):
        ids = np.zeros((B, L), np.int32)
        mask = np.zeros((B, L), np.int32)
        for i, n in enumerate(lens):
            ids[i, :n] = 100 * (i + 1) + np.arange(n)
            mask[i, :n] = 1
        cols[prefix + "input_ids"] = fsl(ids, L)
        cols[prefix + "attention_mask"] = fsl(mask, L)
        cols[prefix + "token_type_ids"] = fsl(np.zeros((B, L)), L)
    cols["text_len"] = pa.array(t_lens, pa.int32())
    for m, lens, D, T in (("audio", a_lens, D_a, T_max[0]), ("visual", v_lens, D_v, T_max[1])):
        frames = [np.array([[1000 * (i + 1) + 10 * t + d for d in range(D)] for t in range(n)], np.float32)
                  for i, n in enumerate(lens)]
        if layout == "ragged":
            offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
            cols[m] = pa.ListArray.from_arrays(pa.array(offs), fsl(np.concatenate(frames), D, pa.float32()))
        else:
            padded = np.zeros((B, T, D), np.float32)
            for i, f in enumerate(frames):
                padded[i, : len(f)] = f
            cols[m] = pa.FixedShapeTensorArray.from_numpy_ndarray(padded)
        cols[f"{m}_len"] = pa.array(lens, pa.int32())
    if with_cls:
        cols["personality_cls"] = fsl(np.arange(B * 4, dtype=np.float32), 4, pa.float32())
    return pa.table(cols)


# ---------------------------------------------------------------------------------------------
# PadCollate on hand-built tables
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["ragged", "fixed"])
def test_collate_pads_to_batch_max_and_trims_tokens(layout):
    tbl = hand_table(layout)
    b = PadCollate()(tbl)
    assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "p_input_ids", "p_attention_mask",
                      "p_token_type_ids", "audio", "audio_lengths", "visual", "visual_lengths", "label", "index",
                      "text_tokens"}
    assert b["input_ids"].shape == (3, 6) and b["p_input_ids"].shape == (3, 5)  # batch-longest transcript
    assert b["text_tokens"] == (13, 18)  # real transcript tokens, token positions: plain ints, on the host
    for k in ("input_ids", "attention_mask", "token_type_ids", "p_input_ids", "audio_lengths", "index"):
        assert b[k].dtype == torch.int64, k
    for k in ("audio", "visual", "label"):
        assert b[k].dtype == torch.float32, k
    assert b["input_ids"][1].tolist() == [200, 201, 202, 0, 0, 0]
    assert b["attention_mask"].sum(1).tolist() == [4, 3, 6]
    assert b["audio"].shape == (3, 5, 2) and b["visual"].shape == (3, 4, 3)  # batch max, not data-set max (6, 5)
    assert b["audio_lengths"].tolist() == [3, 1, 5] and b["visual_lengths"].tolist() == [2, 4, 1]
    for i, n in enumerate([3, 1, 5]):
        want = np.array([[1000 * (i + 1) + 10 * t + d for d in range(2)] for t in range(n)], np.float32)
        np.testing.assert_array_equal(b["audio"][i, :n].numpy(), want)  # valid frames first
        assert not b["audio"][i, n:].any()  # zero padding after
    np.testing.assert_array_equal(b["visual"][2, 0].numpy(), [3000, 3001, 3002])
    assert b["index"].tolist() == [10, 11, 12]
    np.testing.assert_allclose(b["label"].numpy(), [-1, 0, 1])


@pytest.mark.parametrize("layout", ["ragged", "fixed"])
def test_collate_rounds_shapes_up_to_buckets(layout):
    """data.*_pad_multiple: widths rounded up (tokens capped at the stored width, frames of a fixed layout at
    theirs), the extra positions masked / zero, the values and lengths unchanged."""
    tbl = hand_table(layout)
    exact = PadCollate()(tbl)
    b = PadCollate(DataConfig(token_pad_multiple=4, frame_pad_multiple=4))(tbl)
    assert b["input_ids"].shape == (3, 8) and b["p_input_ids"].shape == (3, 8)  # 6 -> 8, 5 -> 8 (= L, the cap)
    assert b["audio"].shape[1] == (6 if layout == "fixed" else 8)  # longest 5 -> 8, or the stored 6
    assert b["visual"].shape[1] == 4  # longest 4: already a multiple
    for k in ("input_ids", "attention_mask", "p_input_ids"):
        w = exact[k].shape[1]
        assert torch.equal(b[k][:, :w], exact[k]) and not b[k][:, w:].any()
    for m in ("audio", "visual"):
        T = exact[m].shape[1]
        assert torch.equal(b[m][:, :T], exact[m]) and not b[m][:, T:].any()
        assert torch.equal(b[f"{m}_lengths"], exact[f"{m}_lengths"])
    big = PadCollate(token_pad_multiple=64)(tbl)
    assert big["input_ids"].shape[1] == L  # never wider than the tokenized width


def test_bucketed_batches_give_the_same_predictions():
    """Padding is masked everywhere in the model, so the shape buckets leave one forward's predictions and losses
    equal to the exact batch-max padding, for the masked (tiny) and the unmasked (reference) attention."""
    from psamf.losses import compute_losses
    from psamf.model import build_model, model_inputs
    from tests.helpers import tiny_cfg

    for overrides in ([], ["model.cross_key_padding_mask=false", "model.cross_pad_to=null"]):
        cfg = tiny_cfg().override([*overrides, "data.token_pad_multiple=8", "data.frame_pad_multiple=32"])
        tbl = hand_table(D_a=cfg.model.audio_dim, D_v=cfg.model.visual_dim, a_lens=(7, 2, 5), v_lens=(3, 9, 1),
                         T_max=(7, 9))
        exact, bucketed = PadCollate()(tbl), PadCollate(cfg.data)(tbl)
        assert bucketed["visual"].shape[1] > exact["visual"].shape[1]
        torch.manual_seed(0)
        model = build_model(cfg.model).eval()
        with torch.no_grad():
            outs = [model(**model_inputs({**b, "audio": b["audio"] / 1000, "visual": b["visual"] / 1000}))
                    for b in (exact, bucketed)]
        torch.testing.assert_close(outs[1].prediction, outs[0].prediction, atol=1e-5, rtol=1e-5)
        losses = [compute_losses(o, exact["label"], cfg.loss, cfg.model)["total"] for o in outs]
        torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["ragged", "fixed"])
def test_collate_on_sliced_and_chunked_tables(layout):
    tbl = hand_table(layout)
    full = PadCollate()(tbl)
    part = PadCollate()(tbl.slice(1, 2))  # offsets into the child arrays
    assert part["audio"].shape == (2, 5, 2) and part["input_ids"].shape == (2, 6)
    torch.testing.assert_close(part["audio"], full["audio"][1:])
    chunked = pa.concat_tables([tbl.slice(0, 1), tbl.slice(1, 2)])
    assert chunked.column("audio").num_chunks == 2
    got = PadCollate()(chunked)
    for k in full:
        torch.testing.assert_close(got[k], full[k])
    one = PadCollate()(tbl.slice(1, 1))  # a one-row batch: its own lengths
    assert one["audio"].shape == (1, 1, 2) and one["input_ids"].shape == (1, 3) and one["visual"].shape == (1, 4, 3)


def test_collate_personality_cls_and_sample_ids():
    tbl = hand_table(with_cls=True)
    b = PadCollate()(tbl)
    assert b["personality_cls"].shape == (3, 4) and b["personality_cls"].dtype == torch.float32
    assert b["personality_cls"][1].tolist() == [4, 5, 6, 7]
    cfg = DataConfig(use_precomputed_personality=False)
    assert "personality_cls" not in PadCollate(cfg)(tbl)
    assert "personality_cls" not in PadCollate()(hand_table())  # absent column -> absent key
    b = PadCollate(sample_ids=True)(tbl)
    assert b["sample_id"] == ["v0$_$1", "v1$_$1", "v2$_$1"]


def test_collate_normalizes_valid_frames_only():
    tbl = hand_table()
    man = {"normalization": {"audio": {"mean": [1000.0, 1001.0], "std": [2.0, 0.0]},
                             "visual": {"mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}}
    raw = PadCollate()(tbl)
    b = PadCollate(DataConfig(normalize_features=True, frame_pad_multiple=1), manifest=man)(tbl)
    valid = raw["audio"][0, :3]
    torch.testing.assert_close(b["audio"][0, :3, 0], (valid[:, 0] - 1000) / 2)
    torch.testing.assert_close(b["audio"][0, :3, 1], valid[:, 1] - 1001)  # std 0 -> divide by 1
    assert not b["audio"][0, 3:].any() and not b["audio"][1, 1:].any()  # padding stays 0
    torch.testing.assert_close(b["visual"], raw["visual"])


def test_collate_threadsafe_under_concurrency():
    from concurrent.futures import ThreadPoolExecutor

    tbl = hand_table()
    c = PadCollate()
    want = c(tbl)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda _: c(tbl), range(32)))
    for o in outs:
        for k in want:
            torch.testing.assert_close(o[k], want[k])


# ---------------------------------------------------------------------------------------------
# Windows: shuffling and length grouping (no Ray)
# ---------------------------------------------------------------------------------------------


def varied_table(n=256, seed=0):
    """Shard-like rows with widely varied transcript lengths (and audio lengths correlated with them)."""
    rng = np.random.default_rng(seed)
    t = rng.integers(3, 41, n)
    a = np.clip(t * 3 + rng.integers(-5, 6, n), 1, None)
    width = 48
    ids = np.zeros((n, width), np.int32)
    mask = (np.arange(width)[None] < t[:, None]).astype(np.int32)
    ids[mask == 1] = 7
    cols = {"index": pa.array(np.arange(n), pa.int64()), "sample_id": pa.array([f"s{i}" for i in range(n)]),
            "label": pa.array(rng.normal(size=n), pa.float32()), "text_len": pa.array(t, pa.int32())}
    for p in ("", "p_"):
        cols[p + "input_ids"] = fsl(ids, width)
        cols[p + "attention_mask"] = fsl(mask, width)
        cols[p + "token_type_ids"] = fsl(np.zeros_like(ids), width)
    for m, lens, D in (("audio", a, 2), ("visual", t, 3)):
        offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        cols[m] = pa.ListArray.from_arrays(pa.array(offs), fsl(np.ones((int(lens.sum()), D)), D, pa.float32()))
        cols[f"{m}_len"] = pa.array(lens, pa.int32())
    return pa.table(cols)


def _padding(batches):
    tot = {}
    for b in batches:
        for k, v in padding_stats(b).items():
            tot[k] = tot.get(k, 0) + v
    return tot


def test_window_shuffle_is_seeded_by_epoch_and_covers_rows():
    tbl = varied_table(64)
    wc = lambda epoch, **kw: _WindowCollate(PadCollate(sample_ids=True), 8, seed=5, epoch=epoch,
                                            **{"shuffle": True, "group": False} | kw)
    ids = lambda bs: [s for b in bs for s in b["sample_id"]]
    e0, e0b, e1 = ids(wc(0)(tbl)), ids(wc(0)(tbl)), ids(wc(1)(tbl))
    assert e0 == e0b and e0 != e1  # same epoch -> same order; next epoch -> a new one
    assert sorted(e0) == sorted(e1) == sorted(tbl.column("sample_id").to_pylist())
    assert e0 != tbl.column("sample_id").to_pylist()
    evals = ids(_WindowCollate(PadCollate(sample_ids=True), 8, seed=5, epoch=0, shuffle=False, group=False)(tbl))
    assert evals == tbl.column("sample_id").to_pylist()  # evaluation: shard order


def test_length_grouping_reduces_padding():
    tbl = varied_table(512)
    c = PadCollate(sample_ids=True)
    rand = _WindowCollate(c, 16, seed=0, epoch=0, shuffle=True, group=False)(tbl)
    grouped = _WindowCollate(c, 16, seed=0, epoch=0, shuffle=True, group=True)(tbl)
    assert len(rand) == len(grouped) == 32
    assert sorted(s for b in grouped for s in b["sample_id"]) == sorted(s for b in rand for s in b["sample_id"])
    pr, pg = _padding(rand), _padding(grouped)
    assert pg["tokens_real"] == pr["tokens_real"]
    assert pg["tokens_padded"] < 0.2 * pr["tokens_padded"]  # sorted windows: far less token padding
    assert pg["audio_padded"] < 0.5 * pr["audio_padded"]  # and, lengths being correlated, fewer padded frames
    # batch order is shuffled, not ascending length
    maxlen = [int(b["attention_mask"].sum(1).max()) for b in grouped]
    assert maxlen != sorted(maxlen)


def test_length_noise_varies_batches_across_epochs_and_keeps_padding_low():
    """data.length_noise: each epoch's grouped batches differ more from the last (soft length buckets), padding
    stays a fraction of uniformly shuffled batches', and evaluation (no shuffle) ignores the jitter."""
    tbl = varied_table(512)
    c = PadCollate(sample_ids=True)

    def batches(epoch, noise, group=True, shuffle=True):
        return _WindowCollate(c, 16, seed=0, epoch=epoch, shuffle=shuffle, group=group, noise=noise)(tbl)

    def pairs(bs):  # which rows share a batch
        return {(a, b) for x in bs for a in x["sample_id"] for b in x["sample_id"] if a < b}

    strict = [pairs(batches(e, 0.0)) for e in range(4)]
    noisy = [pairs(batches(e, 0.2)) for e in range(4)]
    assert len(set().union(*noisy)) > 1.3 * len(set().union(*strict))  # more distinct batch mates over 4 epochs
    rand = _padding(batches(0, 0.0, group=False))["tokens_padded"]
    assert _padding(batches(0, 0.2))["tokens_padded"] < 0.35 * rand
    assert _padding(batches(0, 0.0))["tokens_padded"] <= _padding(batches(0, 0.2))["tokens_padded"]
    ev = [b["sample_id"] for b in batches(0, 0.2, shuffle=False)]
    assert ev == [b["sample_id"] for b in batches(0, 0.0, shuffle=False)]  # evaluation: strictly by length, stable
    lens = dict(zip(tbl.column("sample_id").to_pylist(), tbl.column("text_len").to_pylist()))
    flat = [lens[s] for b in ev for s in b]
    assert flat == sorted(flat)


def test_pinned_batches_are_refused_without_cuda(monkeypatch):
    """`pin_memory=True` is what the training loop asks for on a GPU; in a process without CUDA it is a clear error
    naming the argument, not a failure inside Ray's collate threads (bench/gpu_checks.py covers the GPU side)."""
    from psamf.data import iter_batches

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    with pytest.raises(ValueError, match=r"pin_memory=True\) needs a CUDA device"):
        next(iter_batches(None, DataConfig(uri="unused"), 4, epoch=0, train=True, pin_memory=True))


def test_window_short_batch_last():
    tbl = varied_table(37)
    bs = _WindowCollate(PadCollate(sample_ids=True), 8, seed=0, epoch=3, shuffle=True, group=True)(tbl)
    assert [len(b["sample_id"]) for b in bs] == [8, 8, 8, 8, 5]


def test_the_short_batch_training_drops_is_not_the_longest_transcripts():
    """With length grouping, a window's rows sorted by length would leave its longest transcripts in the short
    batch that training drops, every epoch. The short batch takes random rows: over 200 epochs the dropped rows'
    mean length rank is near the middle, and every row is dropped in some epoch."""
    wc = _WindowCollate(PadCollate(), 4, seed=0, epoch=0, shuffle=True, group=True, noise=0.05)
    lens = np.arange(37) + 3  # distinct lengths: rank = length - 3
    dropped = []
    for epoch in range(200):
        wc.epoch = epoch
        bs = wc.batch_order(37, 0, lens)
        assert sorted(np.concatenate(bs).tolist()) == list(range(37)) and [len(b) for b in bs][-1] == 1
        assert all(len(b) == 4 for b in bs[:-1])
        dropped += bs[-1].tolist()
    assert 0.35 < np.mean(dropped) / 36 < 0.65, np.mean(dropped) / 36  # sorted order: 1.0 every epoch
    assert len(set(dropped)) > 30
    full = wc.batch_order(37, 0, lens)[:-1]
    assert np.mean([np.ptp(lens[b]) for b in full]) < 4  # the full batches stay grouped by length


def test_started_early_fetches_the_first_item_before_iteration_and_yields_all_in_order():
    import threading

    fetched = threading.Event()
    threads = []

    def gen():
        threads.append(threading.current_thread().name)
        fetched.set()
        for i in range(5):
            if i:
                threads.append(threading.current_thread().name)
            yield i

    early = StartedEarly(gen())
    assert fetched.wait(10), "the first item was not fetched before iteration"
    assert list(early) == [0, 1, 2, 3, 4]
    assert threads[0] == "psamf-first-batch" and set(threads[1:]) == {threading.current_thread().name}
    assert list(StartedEarly(iter(()))) == []


def test_started_early_raises_a_fetch_error_on_first_next_and_close_finishes_the_generator():
    def broken():
        raise ValueError("shard s3://b/x.parquet: column 'audio' missing")
        yield  # pragma: no cover

    with pytest.raises(ValueError, match="column 'audio' missing"):
        next(iter(StartedEarly(broken())))

    finished = []

    def gen():
        try:
            yield from range(100)
        finally:
            finished.append(True)

    early = StartedEarly(gen())
    early.close()  # never iterated: the generator is closed, its finally runs
    assert finished == [True]


# ---------------------------------------------------------------------------------------------
# Ray pipeline
# ---------------------------------------------------------------------------------------------


def _prepared(tmp_path, sizes=(24, 6, 6), **kw):
    try:
        from tests.test_prepare import make_raw, run_prepare
    except ImportError:  # tests/ not a package
        from test_prepare import make_raw, run_prepare

    raw = make_raw(sizes=sizes)
    out = tmp_path / "shards"
    man = run_prepare(raw, out, **kw)
    cfg = DataConfig(uri=str(out), tokenizer=TINY, personality_tokenizer=TINY, max_text_len=16)
    return raw, cfg, man


@pytest.mark.integration
def test_build_datasets_and_iter_batches(tmp_path, ray_cluster):
    from psamf.data import build_datasets, iter_batches

    raw, cfg, man = _prepared(tmp_path, rows_per_shard=5)
    ds = build_datasets(cfg)
    assert set(ds) == {"train", "valid", "test"}
    cols = ds["train"].schema().names
    assert "text" not in cols and "speaker" not in cols and "sample_id" in cols and "audio" in cols
    train_ids = sorted(raw.splits["train"].ids)
    seen = []
    for b in iter_batches(ds["train"], cfg, 5, epoch=0, train=True):  # drop_last defaults to True for train
        assert len(b["sample_id"]) == 5 and b["audio"].shape[0] == 5
        longest = int(b["attention_mask"].sum(1).max())  # rounded up to the token bucket, at most max_text_len
        assert b["input_ids"].shape[1] == min(-(-longest // cfg.token_pad_multiple) * cfg.token_pad_multiple, 16)
        seen += b["sample_id"]
    assert len(seen) == 20 and set(seen) <= set(train_ids)
    all_ids = [s for b in iter_batches(ds["train"], cfg, 5, epoch=1, train=True, drop_last=False)
               for s in b["sample_id"]]
    assert sorted(all_ids) == train_ids
    plain = DataConfig(**{**cfg.__dict__, "length_grouping": False})
    ev = [b for b in iter_batches(ds["valid"], plain, 4, epoch=0, train=False)]
    assert [len(b["sample_id"]) for b in ev] == [4, 2]  # evaluation: no drop
    assert [s for b in ev for s in b["sample_id"]] == raw.splits["valid"].ids  # one shard: source order
    # length grouping (the default): evaluation batches sorted by length within the window, the same every time
    assert cfg.length_grouping
    ev = [b for b in iter_batches(ds["valid"], cfg, 4, epoch=0, train=False)]
    assert [len(b["sample_id"]) for b in ev] == [4, 2]
    got = [s for b in ev for s in b["sample_id"]]
    assert sorted(got) == sorted(raw.splits["valid"].ids)
    assert got == [s for b in iter_batches(ds["valid"], cfg, 4, epoch=3, train=False) for s in b["sample_id"]]
    lens = [int(n) for b in ev for n in b["attention_mask"].sum(1)]
    assert lens == sorted(lens)
    with pytest.raises(ValueError, match="data.tokenizer"):
        build_datasets(DataConfig(uri=cfg.uri, tokenizer="bert-base-uncased", personality_tokenizer=TINY,
                                  max_text_len=16))
    with pytest.raises(ValueError, match="split 'extra'"):
        build_datasets(cfg, splits=("extra",))


def _footer_pool(ds) -> int:
    """The footer-reader pool size of a `read_parquet` dataset's listing step (Ray 2.60's FooterFileIndexer)."""
    op = ds._logical_plan.dag
    while not hasattr(op, "file_indexer"):
        op = op.input_dependencies[0]
    return op.file_indexer._num_actors


@pytest.mark.integration
def test_parquet_reads_size_the_footer_reader_pool_to_the_shard_list(tmp_path, ray_cluster, monkeypatch):
    """Ray's default starts 32 footer-reading actors for every read, even of 3 files (11-17 s a split here);
    psamf asks for one per 10 files, leaves the environment as it was, and a value the user exported wins."""
    import os

    import pyarrow.parquet as pq

    from psamf.data import FOOTER_ACTORS_ENV, footer_actors, read_shards

    assert [footer_actors(n) for n in (0, 1, 10, 11, 95, 320, 5000)] == [1, 1, 1, 2, 10, 32, 32]
    paths = []
    for i in range(11):
        pq.write_table(pa.table({"a": [i]}), tmp_path / f"{i}.parquet")
        paths.append(str(tmp_path / f"{i}.parquet"))
    monkeypatch.delenv(FOOTER_ACTORS_ENV, raising=False)
    assert _footer_pool(read_shards(paths[:3], None, None)) == 1
    ds = read_shards(paths, None, None)
    assert _footer_pool(ds) == 2 and FOOTER_ACTORS_ENV not in os.environ
    assert sorted(ds.to_pandas()["a"]) == list(range(11))
    monkeypatch.setenv(FOOTER_ACTORS_ENV, "5")
    assert _footer_pool(read_shards(paths[:3], None, None)) == 5 and os.environ[FOOTER_ACTORS_ENV] == "5"


@pytest.mark.integration
def test_build_datasets_refuses_incomplete(tmp_path, ray_cluster):
    from psamf.data import IncompleteDatasetError, build_datasets

    raw, cfg, man = _prepared(tmp_path)
    (tmp_path / "shards" / "manifest.json").unlink()
    with pytest.raises(IncompleteDatasetError, match="not a complete prepared data set"):
        build_datasets(cfg)


@pytest.mark.integration
def test_length_grouping_through_the_pipeline(tmp_path, ray_cluster):
    """On a prepared set with varied transcript lengths, grouping cuts token padding, same rows."""
    from psamf.data import build_datasets, iter_batches

    raw, cfg, man = _prepared(tmp_path, sizes=(96, 2, 2), rows_per_shard=32)
    ds = build_datasets(cfg, splits=("train",))["train"]
    base = list(iter_batches(ds, DataConfig(**{**cfg.__dict__, "length_grouping": False}), 8, epoch=0, train=True))
    gcfg = DataConfig(**{**cfg.__dict__, "length_grouping": True, "group_window": 12})
    grouped = list(iter_batches(ds, gcfg, 8, epoch=0, train=True))
    assert sorted(s for b in grouped for s in b["sample_id"]) == sorted(s for b in base for s in b["sample_id"])
    assert _padding(grouped)["tokens_padded"] < 0.5 * _padding(base)["tokens_padded"]


@pytest.mark.integration
@pytest.mark.slow
def test_two_train_workers_stream_disjoint_covering_shards(tmp_path, ray_cluster):
    import ray.train
    from ray.train.torch import TorchTrainer

    from psamf.data import build_datasets, split_config

    raw, cfg, man = _prepared(tmp_path, sizes=(40, 4, 4), rows_per_shard=6)
    out_dir = tmp_path / "ids"
    out_dir.mkdir()

    def worker(config):
        import json as _json

        import ray.train as rt

        from psamf.data import iter_batches as _iter

        import time as _time

        from psamf.data import StartedEarly

        ctx = rt.get_context()
        shard = rt.get_dataset_shard("train")
        # epoch 0 as a Train worker runs it: the first pass started in a thread while the worker sets up
        early = StartedEarly(_iter(shard, config["cfg"], 4, epoch=0, train=True, drop_last=False))
        _time.sleep(0.5 * ctx.get_world_rank())  # the ranks' set-up takes different times
        train_ids = [s for b in early for s in b["sample_id"]]
        again = [s for b in _iter(shard, config["cfg"], 4, epoch=1, train=True, drop_last=False)
                 for s in b["sample_id"]]
        valid_ids = [s for b in _iter(rt.get_dataset_shard("valid"), config["cfg"], 4, epoch=0, train=False)
                     for s in b["sample_id"]]
        with open(f"{config['out']}/rank{ctx.get_world_rank()}.json", "w") as f:
            _json.dump({"train": train_ids, "again": again, "valid": valid_ids}, f)

    ds = build_datasets(cfg, splits=("train", "valid"))
    trainer = TorchTrainer(
        worker, train_loop_config={"cfg": cfg, "out": str(out_dir)}, datasets=ds, dataset_config=split_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"data-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    r0 = json.loads((out_dir / "rank0.json").read_text())
    r1 = json.loads((out_dir / "rank1.json").read_text())
    assert r0["train"] and r1["train"] and not set(r0["train"]) & set(r1["train"])  # disjoint
    assert sorted(r0["train"] + r1["train"]) == sorted(raw.splits["train"].ids)  # together: the whole split
    assert len(r0["train"]) == len(r1["train"]) == 20  # equal split
    # the next pass after an early-started one: the same contract
    assert not set(r0["again"]) & set(r1["again"]) and len(r0["again"]) == len(r1["again"]) == 20
    assert sorted(r0["again"] + r1["again"]) == sorted(raw.splits["train"].ids)
    # valid not split: every rank sees all of it, in the same order (sorted by length within windows: grouping)
    assert r0["valid"] == r1["valid"] and sorted(r0["valid"]) == sorted(raw.splits["valid"].ids)


# ---------------------------------------------------------------------------------------------
# Small contracts (no Ray)
# ---------------------------------------------------------------------------------------------


def test_split_config_splits_only_train():
    from psamf.data import split_config

    rc = split_config()
    assert rc._datasets_to_split == ["train"]
    assert rc._get_user_execution_options("valid").preserve_order
    assert rc._get_user_execution_options("train") is None  # Train's defaults for the split dataset


def test_data_config_new_fields_validated():
    from psamf.config import ConfigError

    with pytest.raises(ConfigError, match="data.shuffle_seed"):
        DataConfig(shuffle_seed=-1)
    with pytest.raises(ConfigError, match="data.s3_endpoint"):
        DataConfig(s3_endpoint="127.0.0.1:9000")
    assert DataConfig().materialize and not DataConfig().normalize_features
    for name in ("token_pad_multiple", "frame_pad_multiple"):
        with pytest.raises(ConfigError, match=f"data.{name}"):
            DataConfig(**{name: 0})


def test_eval_splits_are_not_split_across_workers():
    from psamf import data

    assert data.EVAL_SPLIT_ACROSS_WORKERS is False
    assert data.split_config(eval_splits=("valid",))._datasets_to_split == ["train"]


@pytest.mark.integration
def test_load_datasets_reads_small_splits_in_the_driver(tmp_path, ray_cluster):
    """The driver fast path (psamf.data.load_datasets) gives the same rows as build_datasets, eval in shard order."""
    from psamf.data import load_datasets

    raw, cfg, man = _prepared(tmp_path, rows_per_shard=5)
    ds = load_datasets(cfg, man)  # a few KiB: every split is read by the driver
    assert list(ds) == ["train", "valid", "test"]
    assert sorted(ds["train"].to_pandas()["sample_id"]) == sorted(raw.splits["train"].ids)
    assert list(ds["valid"].to_pandas()["sample_id"]) == raw.splits["valid"].ids
    assert "text" not in ds["test"].schema().names
    with pytest.raises(ValueError, match="split 'extra'"):
        load_datasets(cfg, man, splits=("extra",))
