"""psamf prepare never loses data: it deletes only what a previous prepare recorded, swaps data sets
atomically for readers (versioned `v-<id>/` folders, manifest.json written last), never creates buckets,
and refuses outputs it must not write to with exit status 2 and a message naming the path (issue 9: 4, 5, 6, 8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from psamf import cli
from psamf import prepare as prep
from psamf.shards import read_manifest
from tests.test_prepare import files_under, make_raw, read_rows, run_prepare, source_rows

REPO = Path(__file__).resolve().parents[1]


def _user_files(out: Path) -> dict[str, bytes]:
    """Files a user keeps in the output folder, with names that look like psamf's own."""
    files = {"_tmp-mywork/thesis.tex": b"\\documentclass{article}", "model-00003.parquet": b"user model",
             "results-00001.parquet": b"user results", "train-00000.parquet": b"not a shard of ours"}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return files


def _assert_untouched(out: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data, rel


def test_refuses_nonempty_folder_that_is_not_a_dataset(tmp_path, capsys):
    out = tmp_path / "work"
    files = _user_files(out)
    with pytest.raises(ValueError, match=r"not empty and is not a psamf data set.*--allow-nonempty"):
        run_prepare(make_raw(), out)
    _assert_untouched(out, files)
    assert not (out / "manifest.json").exists()
    # the CLI refuses before reading the source (the input does not even exist): exit 2, the path named
    rc = cli.main(["prepare", "--format", "mmsa", "--input", str(tmp_path / "missing.pkl"), "--dataset", "mosi",
                   "--out", str(out), "--tokenizer", "psamf:tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and str(out) in err and "--allow-nonempty" in err and "Traceback" not in err
    # told otherwise, it writes beside them and deletes none of them, now or on a re-run
    man = run_prepare(make_raw(), out, allow_nonempty=True)
    _assert_untouched(out, files)
    run_prepare(make_raw(seed=4), out)  # now a psamf data set: no flag needed
    _assert_untouched(out, files)
    assert not (out / man["data_version"]).exists()  # the replaced version is gone


def test_rerun_deletes_only_what_the_manifest_recorded(tmp_path):
    out = tmp_path / "s"
    man1 = run_prepare(make_raw(seed=1), out, rows_per_shard=3)
    files = _user_files(out)
    (out / man1["data_version"] / "notes.txt").write_text("mine")  # even inside psamf's own folder
    man2 = run_prepare(make_raw(seed=2), out, rows_per_shard=5)
    _assert_untouched(out, files)
    assert (out / man1["data_version"] / "notes.txt").read_text() == "mine"
    assert not list((out / man1["data_version"]).glob("*.parquet"))
    assert set(read_rows(out)) == {sid for *_, sid, _ in source_rows(make_raw(seed=2))}
    assert read_manifest(str(out)) == man2


def test_old_flat_layout_is_read_and_replaced(tmp_path):
    """A data set written by an older psamf (shards next to manifest.json) stays readable and is replaced
    cleanly: its recorded shards are removed, nothing else."""
    out = tmp_path / "s"
    man = run_prepare(make_raw(seed=1), out, rows_per_shard=4)
    v = man["data_version"]
    for s in man["shards"]:  # rewrite it as the flat layout of psamf <= 0.x
        name = s["path"].split("/", 1)[1]
        (out / s["path"]).rename(out / name)
        s["path"] = name
    (out / v / ".psamf-prepare").unlink()
    (out / v).rmdir()
    del man["data_version"]
    (out / "manifest.json").write_text(json.dumps(man))
    (out / "notes.txt").write_text("mine")
    assert set(read_rows(out)) == {sid for *_, sid, _ in source_rows(make_raw(seed=1))}
    man2 = run_prepare(make_raw(seed=2), out)
    assert files_under(out) == sorted(["manifest.json", "notes.txt", f"{man2['data_version']}/.psamf-prepare"]
                                      + [s["path"] for s in man2["shards"]])


_KILLED_PREPARE = """
import sys
from tests.test_prepare import make_raw, run_prepare
run_prepare(make_raw(seed=2), sys.argv[1], rows_per_shard=5)
"""


def _prepare_killed_before_manifest(uri: str) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), **{prep.FAULT_ENV: "before-manifest"})
    proc = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, uri], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no finally, no cleanup ran


def test_kill_between_shards_and_manifest_keeps_old_dataset(tmp_path):
    out = tmp_path / "s"
    man1 = run_prepare(make_raw(seed=1), out, rows_per_shard=3)
    _prepare_killed_before_manifest(str(out))
    leftovers = [p for p in out.iterdir() if p.is_dir() and p.name != man1["data_version"]]
    assert len(leftovers) == 1 and list(leftovers[0].glob("*.parquet"))  # the new shards were written
    assert read_manifest(str(out)) == man1  # the old data set: complete, readable, unchanged
    assert set(read_rows(out)) == {sid for *_, sid, _ in source_rows(make_raw(seed=1))}
    man3 = run_prepare(make_raw(seed=3), out)  # the next prepare removes the killed run's folder too
    assert files_under(out) == sorted(["manifest.json", f"{man3['data_version']}/.psamf-prepare"]
                                      + [s["path"] for s in man3["shards"]])


def _s3_names(bucket: str, prefix: str) -> list[str]:
    import s3fs

    from psamf.storage import s3_endpoint

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint())
    return sorted(p.split(f"{bucket}/{prefix}/", 1)[1] for p in fs.find(f"{bucket}/{prefix}"))


def test_kill_between_shards_and_manifest_on_s3(s3_bucket):
    import pyarrow.parquet as pq

    from psamf.storage import resolve

    uri = f"s3://{s3_bucket}/mosi/shards"
    man1 = run_prepare(make_raw(seed=1), uri, rows_per_shard=3)
    _prepare_killed_before_manifest(uri)
    assert read_manifest(uri) == man1
    loc = resolve(uri)
    ids = {i for s in man1["shards"] for i in pq.read_table(loc.join(s["path"]), filesystem=loc.fs)
           .column("sample_id").to_pylist()}
    assert ids == {sid for *_, sid, _ in source_rows(make_raw(seed=1))}
    assert len({n.split("/")[0] for n in _s3_names(s3_bucket, "mosi/shards")}) == 3  # manifest, old, killed
    man3 = run_prepare(make_raw(seed=3), uri)
    assert _s3_names(s3_bucket, "mosi/shards") == sorted(
        ["manifest.json", f"{man3['data_version']}/.psamf-prepare"] + [s["path"] for s in man3["shards"]])


def test_missing_bucket_is_refused_never_created(s3_server, capsys):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    before = {b["Name"] for b in s3.list_buckets()["Buckets"]}
    with pytest.raises(ValueError, match=r"bucket 'psamf-no-such-bucket' does not exist; psamf never creates"):
        run_prepare(make_raw(), "s3://psamf-no-such-bucket/mosi")
    rc = cli.main(["prepare", "--format", "mmsa", "--input", "x.pkl", "--dataset", "mosi", "--out",
                   "s3://psamf-no-such-bucket/mosi", "--tokenizer", "psamf:tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "psamf-no-such-bucket" in err and "Traceback" not in err
    assert {b["Name"] for b in s3.list_buckets()["Buckets"]} == before


def test_out_that_is_a_regular_file(tmp_path, capsys):
    f = tmp_path / "shards"
    f.write_text("precious")
    with pytest.raises(ValueError, match="is a regular file"):
        run_prepare(make_raw(), f)
    rc = cli.main(["prepare", "--format", "mmsa", "--input", "x.pkl", "--dataset", "mosi", "--out", str(f),
                   "--tokenizer", "psamf:tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and str(f) in err and "regular file" in err and "Traceback" not in err
    assert f.read_text() == "precious"


def test_foreign_manifest_json_is_not_overwritten(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(ValueError, match=r"manifest.json: not a psamf shard manifest"):
        run_prepare(make_raw(), out, allow_nonempty=True)
    assert (out / "manifest.json").read_text() == '{"name": "my web app"}'
