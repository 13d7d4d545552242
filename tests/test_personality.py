"""Big Five corpus (`psamf synth --kind bigfive`) and the plain-torch side of personality pretraining (no Ray)."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from psamf import personality as P
from psamf.synth import (BIGFIVE_TRAITS, EXPRESSIVE_WORDS, RESERVED_WORDS, _BETA_E, bigfive_traits, generate_bigfive,
                         synthesize_bigfive)
from psamf.tokenizers import TINY, load_tokenizer


def _style_score(text: str) -> float:
    words = text.split()
    exp = sum(w in EXPRESSIVE_WORDS for w in words)
    res = sum(w in RESERVED_WORDS for w in words)
    return (exp - res) / max(1, exp + res)


# ------------------------------------------------------------------------------------------------
# synth --kind bigfive
# ------------------------------------------------------------------------------------------------


def test_bigfive_extraversion_is_the_planted_expressiveness():
    rng = np.random.default_rng(0)
    e, z = rng.uniform(size=50), rng.uniform(size=(50, 4))
    traits = bigfive_traits(e, z)
    assert traits.shape == (50, 5) and traits.dtype == np.float32
    np.testing.assert_allclose(traits[:, BIGFIVE_TRAITS.index("extraversion")], e, atol=1e-6)
    assert traits.min() >= 0 and traits.max() <= 1
    assert P.TRAITS == BIGFIVE_TRAITS


def test_bigfive_corpus_shows_personality_through_the_style_words():
    splits = generate_bigfive(seed=3, scale=0.1)
    assert [len(s) for s in splits.values()] == [600, 200, 200]
    speakers = [set(s.speakers) for s in splits.values()]
    assert not (speakers[0] & speakers[1]) and not (speakers[0] & speakers[2]) and not (speakers[1] & speakers[2])
    tr = splits["train"]
    ext = tr.traits[:, BIGFIVE_TRAITS.index("extraversion")]
    # one clip's style words reveal the speaker's e_v (the sentiment corpora's _transcript mechanism)
    style = np.array([_style_score(t) for t in tr.text])
    assert np.corrcoef(style, ext)[0, 1] > 0.6
    # traits are the speaker's: constant within a speaker
    first = {}
    for spk, row in zip(tr.speakers, tr.traits):
        np.testing.assert_array_equal(first.setdefault(spk, row), row)
    # extraversion follows the sentiment corpora's Beta(0.6, 0.6) prior: U-shaped, many extreme speakers
    assert _BETA_E < 1 and np.mean((ext < 0.2) | (ext > 0.8)) > 0.4


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_bigfive_files_are_deterministic_and_complete(tmp_path, fmt):
    a = synthesize_bigfive(tmp_path / "a", fmt, seed=1, scale=0.02)["corpus"]
    b = synthesize_bigfive(tmp_path / "b", fmt, seed=1, scale=0.02)["corpus"]
    c = synthesize_bigfive(tmp_path / "c", fmt, seed=2, scale=0.02)["corpus"]
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    data = P.read_bigfive(str(a))
    assert [len(d) for d in data.values()] == [120, 40, 40]
    assert data["train"].traits.shape == (120, 5)
    assert not list(tmp_path.rglob("*.tmp*"))  # atomic: no temporary file left


def test_cli_synth_bigfive(tmp_path, capsys):
    from psamf.cli import main

    assert main(["synth", "--kind", "bigfive", "--out", str(tmp_path), "--scale", "0.01"]) == 0
    with open(tmp_path / "bigfive.csv") as f:
        header = next(csv.reader(f))
    assert header == ["id", "split", "speaker", "text", *BIGFIVE_TRAITS]
    assert main(["synth", "--kind", "bigfive", "--format", "mmsa", "--out", str(tmp_path)]) == 2
    assert "--kind bigfive writes --format csv or parquet" in capsys.readouterr().err
    assert main(["synth", "--kind", "mosi", "--format", "parquet", "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    for kind in ("mosi", "bigfive"):  # a scale that cannot be: one line, no traceback, nothing written
        assert main(["synth", "--kind", kind, "--out", str(tmp_path / "zero"), "--scale", "0"]) == 2
        assert "psamf synth: error: synth: scale must be a finite number > 0, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "zero").exists()


# ------------------------------------------------------------------------------------------------
# read_bigfive: bad input names the file, the column and the row
# ------------------------------------------------------------------------------------------------


def _write(tmp_path, rows, name="c.csv"):
    path = tmp_path / name
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(rows[0]))
        for r in rows:
            w.writerow(list(r.values()))
    return str(path)


def _rows(n=30, **change):
    rows = [{"id": f"u{i}", "speaker": f"s{i}", "text": "wow great movie", **{t: 0.5 for t in BIGFIVE_TRAITS}}
            for i in range(n)]
    for k, v in change.items():
        rows[3][k] = v
    return rows


def test_read_bigfive_without_split_column_splits_by_speaker(tmp_path):
    data = P.read_bigfive(_write(tmp_path, _rows(200)))
    assert sum(len(d) for d in data.values()) == 200
    assert 120 < len(data["train"]) < 190 and len(data["valid"]) >= 2 and len(data["test"]) >= 2


@pytest.mark.parametrize("change,needle", [
    ({"openness": 1.5}, "column openness: row 'u3' is 1.5; trait scores must be in [0, 1]"),
    ({"neuroticism": "high"}, "column neuroticism: row 'u3' is not a number"),
    ({"neuroticism": "nan"}, "column neuroticism: row 'u3'"),
    ({"text": " "}, "column text: row 'u3' has no text"),
    ({"id": "u0"}, "column id: duplicate id 'u0'"),
])
def test_read_bigfive_rejects_bad_values(tmp_path, change, needle):
    path = _write(tmp_path, _rows(**change))
    with pytest.raises(ValueError) as e:
        P.read_bigfive(path)
    assert needle in str(e.value) and path in str(e.value)


def test_read_bigfive_rejects_missing_columns_bad_split_and_format(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "agreeableness"} for r in _rows()]
    with pytest.raises(ValueError, match=r"c\.csv: missing column\(s\) \['agreeableness'\]"):
        P.read_bigfive(_write(tmp_path, rows))
    rows = [{**r, "split": "train"} for r in _rows()]
    rows[5]["split"] = "dev"
    with pytest.raises(ValueError, match="column split: 'dev' is not one of"):
        P.read_bigfive(_write(tmp_path, rows, "d.csv"))
    rows[5]["split"] = "train"
    with pytest.raises(ValueError, match="split 'valid' has 0 row"):
        P.read_bigfive(_write(tmp_path, rows, "e.csv"))
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "f.parquet")
    with pytest.raises(ValueError, match="f.parquet: missing column"):
        P.read_bigfive(str(tmp_path / "f.parquet"))
    with pytest.raises(ValueError, match="is a .csv, .tsv or .parquet file"):
        P.read_bigfive(str(tmp_path / "f.json"))


# ------------------------------------------------------------------------------------------------
# model, step, baseline, metrics, export
# ------------------------------------------------------------------------------------------------


def test_tiny_config_is_the_preset_random_encoder_and_learns_the_traits():
    from psamf.config import Config
    from psamf.model import load_personality_encoder

    enc = P.build_encoder(P.TINY_CONFIG)
    ref = load_personality_encoder(Config.from_preset("tiny").model)
    for (k, a), (_, b) in zip(enc.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), k  # the untrained encoder is exactly what prepare uses by default
    assert all(p.requires_grad for p in enc.parameters())
    data = generate_bigfive(seed=0, scale=0.02)["train"]
    tok = P.tokenize(data.text, load_tokenizer(TINY), 16)
    assert tok["input_ids"].shape == (len(data), 16)
    torch.manual_seed(0)
    model = P.TraitRegressor(enc)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = {**{k: v[:16] for k, v in tok.items()}, "traits": data.traits[:16]}
    losses = [P.pretrain_step(model, batch, opt, device=torch.device("cpu")) for _ in range(8)]
    assert losses[-1] < 0.5 * losses[0]
    pred = P.predict_traits(model, tok, batch_size=16)
    assert pred.shape == (len(data), 5)
    assert P.cls_features(model.encoder, tok).shape == (len(data), 32)


def test_ridge_and_metrics():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = np.clip(0.5 + 0.1 * x[:, :5] + 0.01 * rng.normal(size=(300, 5)), 0, 1)
    ridge = P.fit_ridge(x[:200], y[:200], x[200:250], y[200:250])
    m = P.trait_metrics(ridge_pred := P.ridge_predict(ridge, x[250:]), y[250:])
    assert m["mean_r"] > 0.95 and m["mean_mae"] < 0.03 and m["n"] == 50
    assert ridge_pred.dtype == np.float32
    flat = P.trait_metrics(np.full((50, 5), 0.5, np.float32), y[250:])
    assert flat["pearson_r"]["openness"] == 0.0  # a constant prediction correlates with nothing


def test_export_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an earlier personality export"):
        P.export_encoder(P.build_encoder(P.TINY_CONFIG), load_tokenizer(TINY), str(tmp_path / "mine"), {})
    out = P.export_encoder(P.build_encoder(P.TINY_CONFIG), load_tokenizer(TINY), str(tmp_path / "enc"), {"a": 1})
    again = P.export_encoder(P.build_encoder(P.TINY_CONFIG), load_tokenizer(TINY), out, {"a": 2})
    assert again == out and (tmp_path / "enc" / P.METRICS_FILE).read_text().count('"a": 2') == 1
    # an export that names its run is replaced only by that run
    P.export_encoder(P.build_encoder(P.TINY_CONFIG), load_tokenizer(TINY), out, {"run": "runs/a"})
    P.export_encoder(P.build_encoder(P.TINY_CONFIG), load_tokenizer(TINY), out, {"run": "runs/a", "b": 1})
    with pytest.raises(ValueError, match="holds the encoder of pretraining run runs/a, not of runs/b"):
        P.export_encoder(P.build_encoder(P.TINY_CONFIG), load_tokenizer(TINY), out, {"run": "runs/b"})
    assert '"b": 1' in (tmp_path / "enc" / P.METRICS_FILE).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "mine"]
