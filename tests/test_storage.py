"""psamf.storage: the one URI resolver (local, S3 with a custom endpoint) and the atomic writes."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from psamf import storage
from psamf.storage import atomic_open, exists, read_bytes, read_json, resolve, write_bytes, write_json


def test_resolve_local_path_is_absolute_and_joins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("runs/")
    assert loc.root == loc.uri == loc.storage_path == str(tmp_path / "runs")
    assert isinstance(loc.fs, pafs.LocalFileSystem) and loc.storage_filesystem is None and loc.endpoint is None
    assert loc.run_dir("a") == loc.join("a") == f"{tmp_path}/runs/a"
    assert loc.join("a", "/b/") == f"{tmp_path}/runs/a/b"
    assert loc.run_uri("a") == f"{tmp_path}/runs/a"
    fs, path = loc.fsspec()
    assert path == loc.root and "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def test_resolve_s3_with_explicit_endpoint_drops_scheme_path_style(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    loc = resolve("s3://bucket/runs/", "http://127.0.0.1:9")
    assert loc.storage_path == loc.root == "bucket/runs" and loc.uri == "s3://bucket/runs/"
    assert loc.endpoint == "http://127.0.0.1:9"
    assert loc.fs is loc.storage_filesystem and isinstance(loc.fs, pafs.S3FileSystem)
    assert loc.fs.region == "eu-west-3"
    kwargs = loc.fs.__reduce__()[1][0]
    assert kwargs["endpoint_override"] == "127.0.0.1:9" and kwargs["scheme"] == "http"
    assert kwargs["force_virtual_addressing"] is False
    fs, path = loc.fsspec()
    assert path == "bucket/runs"
    assert fs.endpoint_url == "http://127.0.0.1:9"
    assert fs.client_kwargs["region_name"] == "eu-west-3"
    assert fs.config_kwargs["s3"] == {"addressing_style": "path"}


def test_resolve_s3_endpoint_from_environment(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example:9000")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    assert storage.s3_endpoint() == "https://minio.example:9000"
    assert storage.s3_endpoint("http://explicit:1") == "http://explicit:1"  # the config field wins
    assert storage.s3_region() == "us-east-1"
    loc = resolve("s3a://b/p")
    assert loc.endpoint == "https://minio.example:9000" and loc.root == "b/p"
    kwargs = loc.fs.__reduce__()[1][0]
    assert kwargs["endpoint_override"] == "minio.example:9000" and kwargs["scheme"] == "https"
    assert kwargs["region"] == "us-east-1" and kwargs["force_virtual_addressing"] is False


def test_resolve_s3_without_endpoint_leaves_aws_to_pyarrow(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    assert storage.s3_endpoint() is None
    loc = resolve("s3://bucket/x")
    assert loc.storage_path == "s3://bucket/x" and loc.storage_filesystem is None and loc.root == "bucket/x"
    assert loc.endpoint is None


def test_resolve_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="nosuchscheme://x"):
        resolve("nosuchscheme://x")
    with pytest.raises(ValueError, match="must not be empty"):
        resolve("")


def test_write_bytes_local_is_atomic_and_leaves_no_temp_file(tmp_path):
    fs = pafs.LocalFileSystem()
    path = f"{tmp_path}/a/b/x.bin"
    write_bytes(fs, path, b"old")
    write_bytes(fs, path, b"new content")
    assert read_bytes(fs, path) == b"new content" and exists(fs, path)
    assert os.listdir(tmp_path / "a" / "b") == ["x.bin"]
    with pytest.raises(TypeError):
        write_bytes(fs, path, "not bytes")  # fails inside the write: the old file stays whole
    assert read_bytes(fs, path) == b"new content"
    assert os.listdir(tmp_path / "a" / "b") == ["x.bin"]


def test_write_json_is_strict_json(tmp_path):
    import numpy as np

    fs = pafs.LocalFileSystem()
    write_json(fs, f"{tmp_path}/m.json", {"nan": float("nan"), "np": np.float32(1.5), "t": (1, 2)})
    assert read_json(fs, f"{tmp_path}/m.json") == {"nan": None, "np": 1.5, "t": [1, 2]}


def test_write_bytes_through_fsspec_local(tmp_path):
    import fsspec

    fs = fsspec.filesystem("file")
    write_bytes(fs, f"{tmp_path}/d/m.json", b"{}")
    assert (tmp_path / "d" / "m.json").read_bytes() == b"{}" and os.listdir(tmp_path / "d") == ["m.json"]


def test_write_and_read_on_s3(s3_bucket):
    loc = resolve(f"s3://{s3_bucket}/runs")  # endpoint from AWS_ENDPOINT_URL_S3 (the moto server)
    assert loc.endpoint is not None
    path = loc.join("r1", "metrics.json")
    write_json(loc.fs, path, {"a": 1})
    write_json(loc.fs, path, {"a": 2})
    assert read_json(loc.fs, path) == {"a": 2} and exists(loc.fs, path)
    assert not exists(loc.fs, loc.join("r1", "missing.json"))
    names = [i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(loc.join("r1")))]
    assert names == ["metrics.json"]  # a single PUT: no temporary object
    fs, root = loc.fsspec()  # the fsspec view reaches the same objects
    assert fs.cat_file(f"{root}/r1/metrics.json") == read_bytes(loc.fs, path)


def test_atomic_open_never_leaves_a_half_file(tmp_path):
    target = tmp_path / "sub" / "f.txt"
    with atomic_open(target, "w") as f:
        f.write("complete\n")
    assert target.read_text() == "complete\n"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_open(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_text() == "complete\n"
    assert os.listdir(target.parent) == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(target, "a"):
            pass


def test_config_to_yaml_writes_through_atomic_open(tmp_path):
    from psamf.config import Config

    cfg = Config.from_preset("tiny")
    text = cfg.to_yaml(tmp_path / "c.yaml")
    assert (tmp_path / "c.yaml").read_text() == text and os.listdir(tmp_path) == ["c.yaml"]
    assert Config.from_yaml(tmp_path / "c.yaml").to_dict() == cfg.to_dict()


def test_local_model_directories_reach_workers_as_absolute_paths(tmp_path, monkeypatch):
    """Ray workers and Tune trials run in other working directories, where a relative model directory would be
    taken for a hub name: the config they get names it absolutely; hub and psamf: names stay as they are."""
    from psamf.config import Config
    from psamf.storage import absolute_model_paths
    from psamf.train import build_loop_config

    (tmp_path / "encoders" / "persona").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    cfg = Config.from_preset("tiny").replace({"model.personality_model": "encoders/persona",
                                              "model.text_model": "bert-base-uncased"})
    out = absolute_model_paths(cfg)
    assert out.model.personality_model == str(tmp_path / "encoders" / "persona")
    assert out.model.text_model == "bert-base-uncased"
    assert absolute_model_paths(Config.from_preset("tiny")).to_dict() == Config.from_preset("tiny").to_dict()
    loop = build_loop_config(cfg, storage=type("S", (), {"root": str(tmp_path)})())
    assert loop["config"]["model"]["personality_model"] == str(tmp_path / "encoders" / "persona")
    assert cfg.model.personality_model == "encoders/persona"  # the run's own config keeps what the user wrote
