"""psamf.shards: the manifest contract. Every problem is one exception type (ShardError) naming the file
or the config field."""

from __future__ import annotations

import json

import pytest

from psamf.config import ConfigError, DataConfig
from psamf.shards import (MANIFEST_NAME, SCHEMA_VERSION, IncompleteDatasetError, ShardError, check_manifest,
                          looks_like_shard, read_manifest)
from psamf.tokenizers import TINY


def _manifest(**over) -> dict:
    man = {"schema_version": SCHEMA_VERSION, "dataset": "mosi",
           "tokenizers": {"text": {"name": TINY, "max_len": 16}, "personality": {"name": TINY, "max_len": 16}}}
    man.update(over)
    return man


def _cfg(**over) -> DataConfig:
    kw = dict(uri="/shards/x", dataset="mosi", tokenizer=TINY, personality_tokenizer=TINY, max_text_len=16)
    kw.update(over)
    return DataConfig(**kw)


def test_shard_error_is_a_config_error():
    assert issubclass(ShardError, ConfigError) and issubclass(IncompleteDatasetError, ShardError)
    assert issubclass(IncompleteDatasetError, FileNotFoundError)


def test_missing_manifest_names_the_directory(tmp_path):
    (tmp_path / "half").mkdir()  # a directory without a manifest: an interrupted or running prepare
    with pytest.raises(ShardError, match=f"{tmp_path}/half: no {MANIFEST_NAME}") as e:
        read_manifest(str(tmp_path / "half"))
    assert isinstance(e.value, IncompleteDatasetError)
    with pytest.raises(IncompleteDatasetError, match=f"{tmp_path}/missing: no such directory"):  # a typo
        read_manifest(str(tmp_path / "missing"))


def test_bad_json_names_the_file(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text('{"schema_version": 1,')
    with pytest.raises(ShardError, match=f"{tmp_path}/manifest.json: not valid JSON"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ShardError, match=f"{tmp_path}/manifest.json: expected a JSON object"):
        read_manifest(str(tmp_path))


def test_wrong_schema_version_names_the_file(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 999}))
    with pytest.raises(ShardError, match=f"{tmp_path}/manifest.json: schema_version 999"):
        read_manifest(str(tmp_path))


def test_read_manifest_round_trip_local_and_s3(tmp_path, s3_bucket):
    import s3fs

    from psamf.storage import s3_endpoint

    man = _manifest(shards=[])
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(man))
    assert read_manifest(str(tmp_path)) == man
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint())
    fs.pipe_file(f"{s3_bucket}/d/{MANIFEST_NAME}", json.dumps(man).encode())
    assert read_manifest(f"s3://{s3_bucket}/d") == man
    with pytest.raises(IncompleteDatasetError, match=f"s3://{s3_bucket}/empty: no such directory"):
        read_manifest(f"s3://{s3_bucket}/empty")


def test_check_manifest_accepts_matching_config():
    check_manifest(_manifest(), _cfg())
    for corpus in ("mosi", "mosei", "custom"):  # custom reads any corpus scored with its (MOSI/MOSEI) metrics
        check_manifest(_manifest(dataset=corpus), _cfg(dataset="custom"))


def test_check_manifest_mismatched_dataset():
    with pytest.raises(ShardError, match="data.dataset='mosei' but the shards at /shards/x hold 'mosi'"):
        check_manifest(_manifest(), _cfg(dataset="mosei"))
    for corpus in ("sims", "simsv2"):  # SIMS shards scored with MOSI's Acc-7 would be meaningless
        with pytest.raises(ShardError, match=f"data.dataset='custom' but the shards at /shards/x hold '{corpus}'"):
            check_manifest(_manifest(dataset=corpus), _cfg(dataset="custom"))
    with pytest.raises(ShardError, match="data.dataset='custom'"):
        check_manifest(_manifest(dataset="iemocap"), _cfg(dataset="custom"))


def test_check_manifest_mismatched_tokenizers():
    with pytest.raises(ShardError, match="data.tokenizer='bert-base-uncased' but the shards were tokenised with"):
        check_manifest(_manifest(), _cfg(tokenizer="bert-base-uncased"))
    with pytest.raises(ShardError, match="data.personality_tokenizer='bert-base-uncased'"):
        check_manifest(_manifest(), _cfg(personality_tokenizer="bert-base-uncased"))


def test_a_local_tokenizer_directory_matches_relative_or_absolute(tmp_path, monkeypatch):
    """prepare records the name as given (relative); a config may name the same directory absolutely."""
    (tmp_path / "encoders" / "persona").mkdir(parents=True)
    (tmp_path / "encoders" / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    toks = {"text": {"name": TINY, "max_len": 16}, "personality": {"name": "encoders/persona", "max_len": 16}}
    check_manifest(_manifest(tokenizers=toks), _cfg(personality_tokenizer=str(tmp_path / "encoders" / "persona")))
    check_manifest(_manifest(tokenizers=toks), _cfg(personality_tokenizer="./encoders/persona/"))
    with pytest.raises(ShardError, match=r"data.personality_tokenizer='.*encoders/other' but the shards were "
                                         r"tokenised with 'encoders/persona'"):
        check_manifest(_manifest(tokenizers=toks), _cfg(personality_tokenizer=str(tmp_path / "encoders" / "other")))


def test_check_manifest_mismatched_text_length():
    with pytest.raises(ShardError, match="data.max_text_len=50 but the shards at /shards/x hold 16 tokens"):
        check_manifest(_manifest(), _cfg(max_text_len=50))


def test_shard_names():
    assert looks_like_shard("train-00000.parquet") and looks_like_shard("my-split-00012.parquet")
    assert not looks_like_shard("train-0.parquet") and not looks_like_shard("notes.parquet")
    assert not looks_like_shard("train-00000.json")
