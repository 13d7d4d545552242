"""`psamf predict`: Ray Data batch inference with an actor pool, on the shared local Ray.

* Predictions equal the model's own forward on the same samples (PadCollate batches of the evaluation path).
* Every input id is predicted exactly once, with several blocks and 2 actors; files and directories (local, S3).
* A custom manifest (`psamf synth --format custom`) goes end to end through prepare's reader and tokenisation;
  a bad row is refused naming the field and the file; a manifest without labels gets null labels.
* The source can be a run name, a run directory or a checkpoint directory, local or in S3 (moto).

The model is a tiny PSA-MF with random weights saved by `psamf.checkpoint.save_checkpoint` (what is under test is
the scoring pipeline, not training).
"""

from __future__ import annotations

import csv
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from psamf import checkpoint
from psamf.cli import run_command
from psamf.config import Config, ConfigError
from psamf.engine import Selector
from psamf.metrics import polarity, regression_metrics, sentiment_class7
from psamf.model import build_model, model_inputs
from psamf.predict import OUTPUT_SCHEMA, SUMMARY_NAME, BatchPredictor, predict, resolve_source

pytestmark = pytest.mark.integration

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROWS_PER_SHARD = 16  # several shards per split: several blocks reach the actor pool


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny synthetic MOSI in both layouts: MMSA -> shards of 16 rows, and the custom manifest."""
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    root = tmp_path_factory.mktemp("predict")
    pkl = synthesize("mosi", "mmsa", root / "mmsa", seed=3, scale=0.06)["pickle"]
    shards = str(root / "shards")
    man = prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, shards, tokenizer="psamf:tiny",
                  personality_tokenizer="psamf:tiny", max_text_len=32, rows_per_shard=ROWS_PER_SHARD)
    custom = synthesize("mosi", "custom", root / "custom", seed=4, scale=0.03)["manifest"]
    return {"root": root, "shards": shards, "manifest": man, "custom": str(custom)}


@pytest.fixture(scope="module")
def run_dir(corpus):
    """A finished-looking run directory: one checkpoint of a random tiny model, and metrics.json naming it."""
    cfg = Config.from_preset("tiny").override([f"data.uri={corpus['shards']}", "run.name=predict-run",
                                               f"run.storage_path={corpus['root'] / 'runs'}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    run = corpus["root"] / "runs" / "predict-run"
    ck = run / "checkpoint_epoch=001"
    checkpoint.save_checkpoint(str(ck), model=model, optimizer=torch.optim.Adam(model.parameters()),
                               scheduler=None, selector=Selector("val_mae"), epoch=1, history=[], cfg=cfg)
    (run / "metrics.json").write_text(json.dumps({"checkpoint": str(ck)}))
    return run


def _read(path) -> dict:
    return pq.read_table(str(path)).to_pydict()


def _split_ids(shards: str, manifest: dict, split: str) -> list[str]:
    """The split's sample ids in input order: its shards as the manifest lists them, rows in shard order."""
    return [i for s in manifest["shards"] if s["split"] == split
            for i in pq.read_table(os.path.join(shards, s["path"]), columns=["sample_id"])
            .column("sample_id").to_pylist()]


def _forward_labels(shards: str, manifest: dict, split: str) -> list[float]:
    return [y for s in manifest["shards"] if s["split"] == split
            for y in pq.read_table(os.path.join(shards, s["path"]), columns=["label"]).column("label").to_pylist()]


def _forward_scores(run_dir, shards: str, split: str, batch_size: int) -> dict[str, float]:
    """The model's own forward in this process, per sample id: the split's shards in order, cut into batches of
    `batch_size` (other boundaries than the actors saw), collated by PadCollate, scored by PSAMF.predict."""
    import pyarrow as pa

    from psamf.data import PadCollate
    from psamf.shards import read_manifest

    model, cfg = checkpoint.load_model(str(run_dir))
    collate = PadCollate(cfg.data, sample_ids=True)
    table = pa.concat_tables([pq.read_table(os.path.join(shards, s["path"])) for s in read_manifest(shards)["shards"]
                              if s["split"] == split])
    out = {}
    for i in range(0, table.num_rows, batch_size):
        b = collate(table.slice(i, batch_size))
        out.update(zip(b["sample_id"], model.predict(**model_inputs(b)).prediction.tolist()))
    return out


# --------------------------------------------------------------------------------------------------------------
def test_predictions_equal_forward_and_cover_every_id_once(ray_cluster, s3_bucket, corpus, run_dir):
    """A run directory in S3 (moto), 2 actors, batches of 8 over shards of 16 rows, one output file in S3: every
    id once, in input order; scores equal the model's forward on the evaluation path's batches (other batch
    boundaries); class7 and polarity as the metrics define them."""
    import pyarrow.fs as pafs

    from psamf.storage import resolve

    st = resolve(f"s3://{s3_bucket}/runs")
    pafs.copy_files(str(run_dir), f"{st.root}/predict-run", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=st.fs)  # metrics.json names the local checkpoint: found by name inside
    out = f"s3://{s3_bucket}/predictions/test.parquet"
    rep = predict(f"s3://{s3_bucket}/runs/predict-run", out, shards=corpus["shards"], split="test", batch_size=8,
                  actors=2)
    n_test = corpus["manifest"]["counts"]["test"]
    assert sum(s["split"] == "test" for s in corpus["manifest"]["shards"]) >= 2  # several blocks
    assert rep.rows == n_test and rep.checkpoint == f"s3://{s3_bucket}/runs/predict-run/checkpoint_epoch=001"
    so = resolve(out)
    table = pq.read_table(so.root, filesystem=so.fs)
    assert table.schema.remove_metadata() == OUTPUT_SCHEMA
    got = table.to_pydict()
    assert len(got["id"]) == len(set(got["id"])) == n_test
    assert got["id"] == _split_ids(corpus["shards"], corpus["manifest"], "test")  # one file: input order
    ref = _forward_scores(run_dir, corpus["shards"], "test", batch_size=32)
    np.testing.assert_allclose(got["score"], [ref[i] for i in got["id"]], atol=1e-5, rtol=0)
    score = np.asarray(got["score"], np.float32)
    assert got["class7"] == sentiment_class7(score, "mosi").tolist()
    assert got["polarity"] == polarity(score, "mosi").tolist()
    label = np.asarray(got["label"], np.float32)
    assert label.tolist() == _forward_labels(corpus["shards"], corpus["manifest"], "test")
    acc7 = np.mean(np.asarray(got["class7"]) == sentiment_class7(label, "mosi"))
    assert acc7 == pytest.approx(regression_metrics(score, label)["acc7"])  # the metric's own classes


def test_batch_predictor_equals_model_predict_on_the_same_batch(corpus, run_dir):
    """The actor's callable on one Arrow batch equals PSAMF.predict on PadCollate of that batch; a run name,
    a run directory and a checkpoint directory name the same checkpoint."""
    from psamf.data import PadCollate

    ck = str(run_dir / "checkpoint_epoch=001")
    assert resolve_source("predict-run", storage_path=str(run_dir.parent)) == resolve_source(str(run_dir)) == \
        resolve_source(ck) == ck
    first = next(s for s in corpus["manifest"]["shards"] if s["split"] == "valid")
    table = pq.read_table(os.path.join(corpus["shards"], first["path"]))
    got = BatchPredictor(ck)(table)
    model, cfg = checkpoint.load_model(ck)
    batch = PadCollate(cfg.data, sample_ids=True)(table)
    want = model.predict(**model_inputs(batch)).prediction.numpy()
    assert got.column("id").to_pylist() == batch["sample_id"]
    np.testing.assert_allclose(got.column("score").to_numpy(), want, atol=1e-6, rtol=0)


def _write_csv(path, fields: list[str], rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return str(path)


def test_manifest_end_to_end(ray_cluster, corpus, run_dir, tmp_path):
    """`psamf predict RUN_NAME --manifest` (the synth custom layout without its split and label columns) into a
    directory: every row scored once, labels null, scores those of the model on prepare's own shards of the same
    manifest; a non-empty output directory is refused (exit status 2)."""
    from psamf.prepare import prepare
    from psamf.sources import read_custom

    src = os.path.dirname(corpus["custom"])
    with open(corpus["custom"]) as f:
        rows = list(csv.DictReader(f))
    for sub in ("audio", "visual"):
        shutil.copytree(os.path.join(src, sub), tmp_path / sub)
    plain = _write_csv(tmp_path / "new-clips.csv", ["id", "text", "audio_path", "visual_path"], rows)
    out_dir = tmp_path / "out"
    assert run_command("predict", ["predict-run", "--storage-path", str(run_dir.parent), "--manifest", plain,
                                   "--out", str(out_dir), "--batch-size", "4"]) == 0
    summary = json.loads((out_dir / SUMMARY_NAME).read_text())
    assert summary["rows"] == len(rows) and summary["files"]
    got = pq.read_table([str(out_dir / f) for f in summary["files"]]).to_pydict()
    assert sorted(got["id"]) == sorted(r["id"] for r in rows) and got["label"] == [None] * len(rows)
    shards = str(tmp_path / "reference-shards")  # the training-side route for the same manifest
    prepare(read_custom(corpus["custom"]), shards, tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny",
            max_text_len=32)
    ref = {}
    for split in ("train", "valid", "test"):
        ref.update(_forward_scores(run_dir, shards, split, batch_size=16))
    np.testing.assert_allclose(got["score"], [ref[i] for i in got["id"]], atol=1e-5, rtol=0)
    assert run_command("predict", [str(run_dir), "--manifest", plain, "--out", str(out_dir)]) == 2


def test_bad_inputs_are_refused_naming_field_and_file(corpus, run_dir, tmp_path):
    """A bad manifest row (missing feature file, empty transcript), shards of another text length, a split the
    shards lack, an unknown run name: clear errors before any actor starts, nothing written."""
    src = os.path.dirname(corpus["custom"])
    with open(corpus["custom"]) as f:
        rows = list(csv.DictReader(f))[:5]
    for r in rows:
        for k in ("audio_path", "visual_path"):
            r[k] = os.path.join(src, r[k])
    fields = ["id", "text", "audio_path", "visual_path"]
    bad = [dict(r) for r in rows]
    bad[2]["audio_path"] = os.path.join(src, "audio", "missing.npy")
    path = _write_csv(tmp_path / "bad.csv", fields, bad)
    out = tmp_path / "x.parquet"
    with pytest.raises(ValueError, match=r"bad\.csv: row id .* field 'audio_path'.*file not found"):
        predict(str(run_dir), str(out), manifest=path)
    bad = [dict(r) for r in rows]
    bad[1]["text"] = " "
    path = _write_csv(tmp_path / "empty-text.csv", fields, bad)
    with pytest.raises(ValueError, match=r"empty-text\.csv: row id .* field 'text' is empty"):
        predict(str(run_dir), str(out), manifest=path)
    with pytest.raises(ConfigError, match=r"data.max_text_len=50 .* hold 32 tokens"):
        predict(str(run_dir), str(out), shards=corpus["shards"], overrides=["data.max_text_len=50"])
    with pytest.raises(ConfigError, match=r"model.hidden_size=8.*only data.\* and run.\* keys"):
        predict(str(run_dir), str(out), shards=corpus["shards"], overrides=["model.hidden_size=8"])
    with pytest.raises(ConfigError, match="--split valid: a split is chosen from --shards only"):
        predict(str(run_dir), str(out), manifest=path, split="valid")
    with pytest.raises(ConfigError, match="no 'holdout' split"):
        predict(str(run_dir), str(out), shards=corpus["shards"], split="holdout")
    with pytest.raises(ConfigError, match="no run named 'nope'"):
        predict("nope", str(out), shards=corpus["shards"], storage_path=str(tmp_path))
    assert not out.exists()


def test_a_model_that_scores_nan_is_reported_in_one_error_and_nothing_is_written(ray_cluster, corpus, run_dir,
                                                                                  tmp_path):
    """A checkpoint with non-finite weights (a diverged run): the actor's error reaches the caller as itself,
    naming the sample ids, not as Ray's UDF error; no output file or directory is left."""
    from psamf.predict import NonFiniteScoreError

    model, cfg = checkpoint.load_model(str(run_dir / "checkpoint_epoch=001"))
    with torch.no_grad():
        model.fusion_prj.linear_3.bias.fill_(float("nan"))  # the regression output
    ck = tmp_path / "diverged" / "checkpoint_epoch=000"
    checkpoint.save_checkpoint(str(ck), model=model, optimizer=torch.optim.Adam(model.parameters()),
                               scheduler=None, selector=Selector("val_mae"), epoch=0, history=[], cfg=cfg)
    for out in (tmp_path / "p.parquet", tmp_path / "p-dir"):
        with pytest.raises(NonFiniteScoreError, match=r"scored \d+ of \d+ sample\(s\) in a batch as NaN or inf "
                                                      r"\(ids '.+\$_\$.+'.*nothing was written"):
            predict(str(ck), str(out), shards=corpus["shards"], split="valid", batch_size=8)
        assert not out.exists()
    with pytest.raises(ValueError, match="1 score\\(s\\) not finite"):
        sentiment_class7([0.5, float("nan")])
    with pytest.raises(ValueError, match="not finite"):
        polarity([float("inf")])


def test_personality_cls_must_come_from_the_encoder_the_checkpoint_was_trained_on(ray_cluster, corpus, tmp_path):
    """A checkpoint trained on shards whose personality_cls a saved personality BERT precomputed (its own
    model.personality_model is null: a seeded random-init encoder fills the checkpoint). Shards with that
    encoder's CLS_p are scored; shards without CLS_p (the model's own encoder would compute it) or with another
    encoder's are refused before Ray work, naming both encoders; a --manifest input gets its CLS_p computed with
    the training encoder, so its scores are the model's on prepare's shards of the same clips."""
    import dataclasses

    from transformers import BertModel

    from psamf.model import bert_config
    from psamf.prepare import prepare
    from psamf.sources import read_custom

    base = Config.from_preset("tiny")
    m = base.model
    torch.manual_seed(5)
    enc_dir = tmp_path / "persona-bert"
    BertModel(bert_config(m, 1, m.personality_vocab_size), add_pooling_layer=False).save_pretrained(enc_dir)
    kw = dict(tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=32)
    persona = str(tmp_path / "persona-shards")
    prepare(read_custom(corpus["custom"], "mosi"), persona, **kw,
            personality_model=dataclasses.replace(m, personality_model=str(enc_dir)))
    other = str(tmp_path / "random-init-shards")  # CLS_p of the seeded random-init encoder
    prepare(read_custom(corpus["custom"], "mosi"), other, **kw, personality_model=m)

    cfg = base.override([f"data.uri={persona}", "run.name=persona-run", f"run.storage_path={tmp_path / 'runs'}"])
    torch.manual_seed(1)
    model = build_model(cfg.model)
    ck = tmp_path / "runs" / "persona-run" / "checkpoint_epoch=001"
    checkpoint.save_checkpoint(str(ck), model=model, optimizer=torch.optim.Adam(model.parameters()),
                               scheduler=None, selector=Selector("val_mae"), epoch=1, history=[], cfg=cfg)

    out = tmp_path / "scores.parquet"
    assert predict(str(ck), str(out), shards=persona, split="test").rows > 0
    first = out.read_bytes()  # an existing output file is replaced only when asked
    with pytest.raises(ConfigError, match=r"scores\.parquet: exists; name a new file, or pass --overwrite"):
        predict(str(ck), str(out), shards=persona, split="valid")
    assert out.read_bytes() == first
    (tmp_path / "dir.parquet").mkdir()
    with pytest.raises(ConfigError, match=r"dir\.parquet: is a directory"):
        predict(str(ck), str(tmp_path / "dir.parquet"), shards=persona, split="valid", overwrite=True)
    n_valid = predict(str(ck), str(out), shards=persona, split="valid", overwrite=True).rows
    assert n_valid > 0 and pq.read_table(str(out)).num_rows == n_valid
    with pytest.raises(ConfigError, match=r"trained on CLS_p from '.*persona-bert'.*hold no precomputed "
                                          r"personality_cls.*'random-init BertModel"):
        predict(str(ck), str(tmp_path / "x.parquet"), shards=corpus["shards"], split="test")
    with pytest.raises(ConfigError, match=r"trained on CLS_p from '.*persona-bert'.*precomputed with 'random-init"):
        predict(str(ck), str(tmp_path / "x.parquet"), shards=other, split="test")
    assert not (tmp_path / "x.parquet").exists()
    from psamf.evaluate import evaluate_checkpoint, worker_count_note  # the same check when evaluate reads other shards

    n = max(1, cfg.run.num_workers)
    assert "validated on" in worker_count_note(str(ck), cfg, n + 1) and worker_count_note(str(ck), cfg, n) is None

    with pytest.raises(ConfigError, match=r"trained on CLS_p from '.*persona-bert'.*precomputed with 'random-init"):
        evaluate_checkpoint(str(ck), splits=("test",), overrides=[f"data.uri={other}"])

    src = os.path.dirname(corpus["custom"])
    with open(corpus["custom"]) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("audio_path", "visual_path"):
            r[k] = os.path.join(src, r[k])
    plain = _write_csv(tmp_path / "clips.csv", ["id", "text", "audio_path", "visual_path"], rows)
    got = _read(predict(str(ck), str(tmp_path / "clips.parquet"), manifest=plain).out)
    ref = {}
    for split in ("train", "valid", "test"):
        ref.update(_forward_scores(ck, persona, split, batch_size=16))
    assert sorted(got["id"]) == sorted(ref)
    np.testing.assert_allclose(got["score"], [ref[i] for i in got["id"]], atol=1e-5, rtol=0)
