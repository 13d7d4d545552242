"""`psamf synth`: vocabulary, determinism, shapes of the three formats, CLI, and the planted signal."""

from __future__ import annotations

import csv
import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest

from psamf import synth
from psamf.synth import KINDS, LEXICON, generate, synthesize
from psamf.tokenizers import TINY, load_tokenizer, tiny_vocab_path

SCALE = 0.05


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _expected_sizes(kind: str, scale: float) -> list[int]:
    return [max(2, int(round(n * scale))) for n in KINDS[kind].split_sizes]


# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------


def test_tiny_vocab_keeps_its_head_and_covers_the_lexicon():
    lines = Path(tiny_vocab_path()).read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert lines[5:31] == [chr(c) for c in range(ord("a"), ord("z") + 1)]
    assert lines[47] == "##a" and lines[82] == "##9"
    assert len(lines) <= 500  # the tiny model has vocab_size 512
    assert len(set(lines)) == len(lines), "duplicate vocabulary entries shift token ids"
    assert all(w == w.lower() for w in LEXICON)
    assert set(LEXICON) <= set(lines[83:])


def test_tiny_tokenizer_reads_synthetic_transcripts_as_whole_words():
    tok = load_tokenizer(TINY)
    corpus = generate("mosi", seed=3, scale=SCALE)
    text = corpus.splits["train"].text[:20]
    for t in text:
        pieces = tok.tokenize(t)
        assert pieces == t.split()  # every word is one vocabulary entry: no [UNK], no ## pieces
    assert tok.unk_token_id not in tok(text[0])["input_ids"]


# ------------------------------------------------------------------------------------------------
# determinism and files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mmsa", "mult", "custom"])
def test_same_seed_gives_identical_bytes(tmp_path, fmt):
    a = synthesize("sims", fmt, tmp_path / "a", seed=7, scale=0.02)
    b = synthesize("sims", fmt, tmp_path / "b", seed=7, scale=0.02)
    c = synthesize("sims", fmt, tmp_path / "c", seed=8, scale=0.02)
    da, db, dc = (_tree_digest(tmp_path / x) for x in "abc")
    assert da == db and len(da) >= 1
    assert set(a) == set(b) == set(c)
    main = next(iter(a))
    assert da[a[main].name] != dc[c[main].name]  # a different seed differs
    assert not [p for p in (tmp_path / "a").rglob("*") if ".tmp-" in p.name]  # atomic writes left no temp files


def test_generate_is_format_independent_and_seeded():
    a, b = generate("mosi", seed=1, scale=SCALE), generate("mosi", seed=1, scale=SCALE)
    c = generate("mosi", seed=2, scale=SCALE)
    for s in synth.SPLITS:
        assert a.splits[s].ids == b.splits[s].ids and a.splits[s].text == b.splits[s].text
        np.testing.assert_array_equal(a.splits[s].audio, b.splits[s].audio)
    assert a.splits["train"].text != c.splits["train"].text


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown kind"):
        synthesize("iemocap", "mmsa", tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        synthesize("mosi", "hdf5", tmp_path)
    with pytest.raises(ValueError, match="scale"):
        synthesize("mosi", "mmsa", tmp_path, scale=0)


# ------------------------------------------------------------------------------------------------
# shapes per format
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mosi", "mosei", "sims", "simsv2"])
def test_mmsa_layout(tmp_path, kind):
    spec = KINDS[kind]
    scale = 0.01 if kind == "mosei" else SCALE
    paths = synthesize(kind, "mmsa", tmp_path, seed=0, scale=scale)
    assert paths["pickle"].name == spec.mmsa_file
    with open(paths["pickle"], "rb") as f:
        data = pickle.load(f)
    assert list(data) == ["train", "valid", "test"]
    for s, n in zip(data, _expected_sizes(kind, scale)):
        d = data[s]
        keys = {"raw_text", "text", "text_bert", "audio", "vision", "audio_lengths", "vision_lengths", "id",
                "annotations", "regression_labels"}
        assert keys <= set(d)
        assert d["audio"].shape == (n, spec.audio_frames, spec.audio_dim)
        assert d["vision"].shape == (n, spec.vision_frames, spec.visual_dim)
        assert d["text"].shape == (n, spec.text_len, 1)
        assert d["text_bert"].shape == (n, 3, spec.text_len)
        assert np.all(d["text_bert"][:, 0, 0] == 2)  # [CLS]
        assert d["regression_labels"].shape == (n,) and d["regression_labels"].dtype == np.float32
        assert all("$_$" in i for i in d["id"])
        assert set(d["annotations"]) <= {"Negative", "Neutral", "Positive"}
        lo, hi = spec.label_range
        y = d["regression_labels"]
        assert y.min() >= lo and y.max() <= hi
        grid = y * spec.annotators  # mean of integer ratings
        assert np.allclose(grid, np.rint(grid), atol=1e-4)
        # valid-first: padding after the stored length is zero, valid frames are never all-zero
        for m in ("audio", "vision"):
            x, lens = d[m], d[f"{m}_lengths"]
            assert lens.min() >= 1 and lens.max() <= x.shape[1]
            for i in range(n):
                assert not np.any(x[i, lens[i]:])
                assert not np.any(np.all(x[i, : lens[i]] == 0, axis=1))
        if spec.unimodal_labels:
            for m in ("T", "A", "V"):
                assert d[f"regression_labels_{m}"].shape == (n,)
                assert np.abs(d[f"regression_labels_{m}"]).max() <= 1.0
                assert set(np.unique(d[f"classification_labels_{m}"])) <= {0.0, 1.0, 2.0}
        else:
            assert "regression_labels_T" not in d
    # the planted defects: -inf audio values and NaN visual frames, in every split
    for s in data:
        assert np.isneginf(data[s]["audio"]).any()
        assert np.isnan(data[s]["vision"]).all(axis=2).any()


def test_mmsa_full_text_features(tmp_path):
    paths = synthesize("mosi", "mmsa", tmp_path, scale=0.01, full_text_features=True)
    with open(paths["pickle"], "rb") as f:
        d = pickle.load(f)["test"]
    assert d["text"].shape[1:] == (50, 768) and not d["text"].any()


@pytest.mark.parametrize("kind", ["mosi", "sims"])
def test_mult_layout(tmp_path, kind):
    spec = KINDS[kind]
    paths = synthesize(kind, "mult", tmp_path, seed=0, scale=SCALE)
    assert paths["pickle"].name == spec.mult_file and paths["label_csv"].name == "label.csv"
    with open(paths["pickle"], "rb") as f:
        data = pickle.load(f)
    corpus = generate(kind, seed=0, scale=SCALE)
    pickle_order = []
    for s, n in zip(("train", "valid", "test"), _expected_sizes(kind, SCALE)):
        d = data[s]
        assert d["vision"].shape == (n, spec.vision_frames, spec.visual_dim)
        assert d["audio"].shape == (n, spec.audio_frames, spec.audio_dim)
        assert d["text"].shape == (n, 50, 1)
        assert d["labels"].shape == (n, 1, 1)
        assert d["id"].shape == (n, 3)
        if kind == "mosi":
            assert d["id"].dtype.kind == "S"  # bytes, as in the real MOSI file
        ids = [x.decode() if isinstance(x, bytes) else str(x) for x in d["id"][:, 0]]
        c = corpus.splits[s]
        assert ids == [f"{v}_{k}" for v, k in zip(c.videos, c.clips)]
        pickle_order += ids
        # left padding: zeros before the valid frames
        for i in range(n):
            la, lv = int(c.audio_lengths[i]), int(c.vision_lengths[i])
            assert not np.any(d["audio"][i, : spec.audio_frames - la])
            np.testing.assert_array_equal(d["audio"][i, spec.audio_frames - la:], c.audio_frames(i))
            np.testing.assert_array_equal(d["vision"][i, spec.vision_frames - lv:], c.vision_frames(i))
    with open(paths["label_csv"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["video_id", "clip_id", "text", "label", "label_T", "label_A", "label_V",
                             "annotation", "mode"]
    csv_order = [f"{r['video_id']}_{r['clip_id']}" for r in rows]
    assert sorted(csv_order) == sorted(pickle_order)
    assert csv_order != pickle_order  # a positional join would be wrong
    assert {r["mode"] for r in rows} == {"train", "valid", "test"}
    filled = {bool(r["label_T"]) for r in rows}
    assert filled == ({True} if spec.unimodal_labels else {False})


def test_custom_layout(tmp_path):
    paths = synthesize("mosi", "custom", tmp_path, seed=0, scale=SCALE)
    with open(paths["manifest"], newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "split", "text", "label", "speaker", "audio_path", "visual_path"]
    assert len(rows) == sum(_expected_sizes("mosi", SCALE))
    r = rows[0]
    a = np.load(tmp_path / r["audio_path"])
    with np.load(tmp_path / r["visual_path"]) as z:
        assert z.files == ["features"]
        v = z["features"]
    assert a.ndim == 2 and a.shape[1] == 5 and v.ndim == 2 and v.shape[1] == 20
    assert r["id"].startswith(r["speaker"] + "$_$")


def test_cli_synth(tmp_path, capsys):
    from psamf.cli import main

    rc = main(["synth", "--kind", "sims", "--format", "mult", "--out", str(tmp_path), "--seed", "1",
               "--scale", "0.02"])
    assert rc == 0
    assert (tmp_path / "sims_data_noalign.pkl").is_file() and (tmp_path / "label.csv").is_file()
    assert "label_csv" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# the planted signal
# ------------------------------------------------------------------------------------------------


def test_generative_process_statistics():
    corpus = generate("mosi", seed=0, scale=0.5)
    tr = corpus.splits["train"]
    # personality is visible in the wording
    expressive = set(synth.EXPRESSIVE_WORDS)
    reserved = set(synth.RESERVED_WORDS)
    style = np.array([(sum(w in expressive for w in t.split()) - sum(w in reserved for w in t.split()))
                      for t in tr.text])
    assert np.corrcoef(style, tr.expressiveness)[0, 1] > 0.5
    # sentiment words follow the verbal latent
    pos, neg = set(synth.POSITIVE_WORDS), set(synth.NEGATIVE_WORDS)
    polarity = np.array([sum(w in pos for w in t.split()) - sum(w in neg for w in t.split()) for t in tr.text])
    assert np.corrcoef(polarity, tr.t)[0, 1] > 0.5
    # labels look like averaged annotations: many distinct values on the 0.2 grid, some exact zeros
    assert len(np.unique(tr.label)) > 20
    assert 0 < np.mean(tr.label == 0) < 0.2
    # speakers = videos, several clips each
    assert len(set(tr.videos)) < len(tr) / 5


def _features(split, with_personality: bool) -> np.ndarray:
    pos, neg = set(synth.POSITIVE_WORDS), set(synth.NEGATIVE_WORDS)
    exp, res = set(synth.EXPRESSIVE_WORDS), set(synth.RESERVED_WORDS)
    rows, proxy = [], []
    for i, text in enumerate(split.text):
        w = text.split()
        n_pos, n_neg = sum(x in pos for x in w), sum(x in neg for x in w)
        n_exp, n_res = sum(x in exp for x in w), sum(x in res for x in w)
        a = np.nan_to_num(split.audio_frames(i), nan=0.0, posinf=0.0, neginf=0.0).mean(axis=0)
        v = np.nan_to_num(split.vision_frames(i), nan=0.0, posinf=0.0, neginf=0.0).mean(axis=0)
        rows.append(np.concatenate([[n_pos, n_neg, n_pos - n_neg], a, v]))
        proxy.append((n_exp - n_res) / (n_exp + n_res + 1))
    x = np.asarray(rows)
    if not with_personality:
        return x
    # speaker-level personality proxy: the speaker's mean style-word balance (speaker = video)
    proxy_arr, videos = np.asarray(proxy), np.asarray(split.videos)
    p = np.zeros_like(proxy_arr)
    for v in set(split.videos):
        p[videos == v] = proxy_arr[videos == v].mean()
    return np.hstack([x, p[:, None], x[:, 3:] * p[:, None]])  # + personality x audio/visual interactions


def test_planted_signal_is_learnable_and_needs_personality():
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    corpus = generate("mosi", seed=0, scale=0.5)
    tr, te = corpus.splits["train"], corpus.splits["test"]

    def mae(with_personality: bool) -> float:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
        model.fit(_features(tr, with_personality), tr.label)
        return float(np.abs(model.predict(_features(te, with_personality)) - te.label).mean())

    mae_mean = float(np.abs(te.label - tr.label.mean()).mean())
    mae_without, mae_with = mae(False), mae(True)
    assert mae_without < mae_mean - 0.3, (mae_mean, mae_without)
    assert mae_with < mae_without - 0.05, (mae_without, mae_with)


# ------------------------------------------------------------------------------------------------
# --personality-signal strong
# ------------------------------------------------------------------------------------------------


def _style_share(texts: list[str], sig: "synth.PersonalitySignal") -> np.ndarray:
    exp, res = set(sig.expressive), set(sig.reserved)
    counts = np.array([(sum(w in exp for w in t.split()), sum(w in res for w in t.split())) for t in texts])
    return (counts[:, 0] + 0.5) / (counts.sum(axis=1) + 1.0)


def test_weak_is_the_default_and_strong_plants_a_denser_rarer_weightier_signal():
    weak, strong = synth.SIGNALS["weak"], synth.SIGNALS["strong"]
    default = generate("mosi", seed=0, scale=0.2)
    assert default.personality_signal == "weak"
    assert default.splits["train"].text == generate("mosi", seed=0, scale=0.2, personality_signal="weak").splits[
        "train"].text
    corpus = generate("mosi", seed=0, scale=0.2, personality_signal="strong")
    tr, d = corpus.splits["train"], default.splits["train"]
    # same latents and audio/visual features, other words and labels
    np.testing.assert_array_equal(tr.expressiveness, d.expressiveness)
    np.testing.assert_array_equal(tr.audio, d.audio)
    assert tr.text != d.text and not np.array_equal(tr.label, d.label)
    # the strong style vocabulary is disjoint from everything the weak corpora use, and larger
    words = {w for t in tr.text for w in t.split()}
    assert words.isdisjoint(weak.expressive + weak.reserved)
    assert len(strong.expressive) >= 4 * len(weak.expressive) and set(strong.expressive).isdisjoint(strong.reserved)
    # one transcript reveals e_v much better than under the weak signal
    r_strong = np.corrcoef(_style_share(tr.text, strong), tr.expressiveness)[0, 1]
    r_weak = np.corrcoef(_style_share(d.text, weak), d.expressiveness)[0, 1]
    assert r_strong > 0.8 and r_strong > r_weak + 0.1, (r_weak, r_strong)
    # personality weighs more in the label: the label's regression on 2e-1 (given t) has the larger slope
    def slope(split) -> float:
        x = np.stack([split.t, 2 * split.expressiveness - 1, np.ones(len(split))], axis=1)
        return float(np.linalg.lstsq(x, split.label, rcond=None)[0][1])
    assert slope(tr) > slope(d) + 0.25
    with pytest.raises(ValueError, match="personality_signal 'loud'"):
        generate("mosi", seed=0, scale=0.02, personality_signal="loud")


def _styles_by_speaker(speakers, texts, sig) -> dict[str, set[str]]:
    pool = set(sig.expressive) | set(sig.reserved)
    out: dict[str, set[str]] = {}
    for spk, t in zip(speakers, texts):
        out.setdefault(spk, set()).update(w for w in t.split() if w in pool)
    return out


def test_strong_speakers_have_idiolects_drawn_from_the_whole_style_vocabulary():
    """Under the strong signal each speaker uses a fixed few style words of each list (its idiolect), in the
    sentiment corpora and the Big Five corpus alike; over many speakers every style word occurs."""
    from psamf.synth import generate_bigfive

    strong = synth.SIGNALS["strong"]
    k = strong.idiolect
    assert synth.SIGNALS["weak"].idiolect is None and k is not None and 1 <= k < len(strong.expressive) // 4
    tr = generate("mosi", seed=0, scale=1.0, personality_signal="strong").splits["train"]
    bf = generate_bigfive(seed=0, scale=0.3, personality_signal="strong")["train"]
    by_speaker = [_styles_by_speaker(tr.videos, tr.text, strong), _styles_by_speaker(bf.speakers, bf.text, strong)]
    for used in by_speaker:
        for words in used.values():
            assert len(words & set(strong.expressive)) <= k and len(words & set(strong.reserved)) <= k
        assert len({frozenset(w) for w in used.values() if len(w) == 2 * k}) > 0.9 * sum(
            len(w) == 2 * k for w in used.values())  # idiolects differ between speakers
    # the sentiment corpus' 52 training speakers leave some style words unseen; the Big Five corpus uses them all
    seen_sentiment, seen_bigfive = (set().union(*used.values()) for used in by_speaker)
    assert seen_bigfive == set(strong.expressive) | set(strong.reserved)
    assert len(seen_sentiment) < len(seen_bigfive)


def test_cli_personality_signal_applies_to_sentiment_and_bigfive_corpora(tmp_path, capsys):
    from psamf.cli import main
    from psamf.synth import generate_bigfive

    assert main(["synth", "--kind", "mosi", "--out", str(tmp_path / "m"), "--scale", "0.02",
                 "--personality-signal", "strong", "--no-progress"]) == 0
    with open(tmp_path / "m" / "unaligned_50.pkl", "rb") as f:
        raw = pickle.load(f)["train"]["raw_text"]
    assert list(raw) == generate("mosi", seed=0, scale=0.02, personality_signal="strong").splits["train"].text
    assert main(["synth", "--kind", "bigfive", "--out", str(tmp_path / "b"), "--scale", "0.01",
                 "--personality-signal", "strong"]) == 0
    assert "personality signal strong" in capsys.readouterr().out
    with open(tmp_path / "b" / "bigfive.csv", newline="") as f:
        texts = [r["text"] for r in csv.DictReader(f) if r["split"] == "train"]
    assert texts == generate_bigfive(seed=0, scale=0.01, personality_signal="strong")["train"].text
    strong = synth.SIGNALS["strong"]
    assert any(w in strong.expressive + strong.reserved for t in texts for w in t.split())
