"""Bad data gets a clear error naming the file, the field and the sample (issue 9, item 8, data side):
a non-UTF-8 transcript, a manifest whose dims disagree with its shards, a listed shard that is missing,
and a custom-manifest error that names the manifest instead of all of its feature files."""

from __future__ import annotations

import json
import pickle

import pytest

from psamf import cli
from psamf.config import DataConfig
from psamf.shards import ShardError, read_manifest, verify_shards
from tests.test_prepare import L, make_raw, run_prepare

pytestmark = pytest.mark.filterwarnings("ignore::psamf.sources.ChecksumMismatchWarning")


def test_non_utf8_transcript_names_file_split_and_sample(tmp_path, capsys):
    from psamf.synth import synthesize

    pkl = synthesize("mosi", "mmsa", tmp_path / "src", seed=1, scale=0.02)["pickle"]
    with open(pkl, "rb") as f:
        data = pickle.load(f)
    data["valid"]["raw_text"][1] = "caf\u00e9 was great".encode("latin1")
    with open(pkl, "wb") as f:
        pickle.dump(data, f)
    sid = str(data["valid"]["id"][1])
    out = tmp_path / "shards"
    rc = cli.main(["prepare", "--format", "mmsa", "--input", str(pkl), "--dataset", "mosi", "--out", str(out),
                   "--tokenizer", "psamf:tiny", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert str(pkl) in err and "'valid'" in err and "raw_text" in err and "not UTF-8" in err
    assert sid.split("$_$")[0] in err
    assert not out.exists()


def _prepared(tmp_path):
    out = tmp_path / "s"
    man = run_prepare(make_raw(), out, rows_per_shard=5)
    cfg = DataConfig(uri=str(out), tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=L,
                     materialize=False)
    return out, man, cfg


@pytest.mark.parametrize("layout", ["ragged", "fixed"])
def test_manifest_dims_disagree_with_shards(tmp_path, layout):
    from psamf.data import build_datasets

    out = tmp_path / "s"
    man = run_prepare(make_raw(), out, layout=layout)
    man["feature_dims"]["visual"] = 7  # the shards hold 4
    (out / "manifest.json").write_text(json.dumps(man))
    man = read_manifest(str(out))
    with pytest.raises(ShardError, match=r"train-00000\.parquet: column 'visual' has feature width 4, but "
                                         r"manifest.json says feature_dims.visual=7"):
        verify_shards(man, str(out))
    cfg = DataConfig(uri=str(out), tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=L,
                     materialize=False)
    with pytest.raises(ShardError, match="feature_dims.visual=7"):
        build_datasets(cfg)  # before any Ray Data task starts


def test_listed_shard_missing(tmp_path):
    from psamf.data import build_datasets

    out, man, cfg = _prepared(tmp_path)
    victim = [s["path"] for s in man["shards"] if s["split"] == "valid"][0]
    (out / victim).unlink()
    with pytest.raises(ShardError, match=rf"{victim}: listed in manifest.json but missing"):
        verify_shards(man, str(out))
    verify_shards(man, str(out), splits=("train",))  # only the splits asked for are opened
    with pytest.raises(ShardError, match="listed in manifest.json but missing"):
        build_datasets(cfg)
    (out / victim).write_bytes(b"PAR1 not parquet")
    with pytest.raises(ShardError, match=rf"{victim}: not a readable Parquet shard"):
        verify_shards(man, str(out))


def test_custom_manifest_error_names_the_manifest_not_every_feature_file(tmp_path):
    from psamf.prepare import validate
    from psamf.sources import read_custom
    from psamf.synth import synthesize

    manifest = synthesize("mosi", "custom", tmp_path / "src", seed=1, scale=0.05)["manifest"]
    raw = read_custom(manifest, name="mosi")
    assert len(raw.source_files) > 40
    raw.splits["test"].text[2] = "   "
    with pytest.raises(ValueError) as ei:
        validate(raw)
    msg = str(ei.value)
    assert str(manifest) in msg and "empty transcript" in msg and raw.splits["test"].ids[2] in msg
    assert f"{len(raw.source_files) - 1} feature files" in msg
    assert len(msg) < 400 and msg.count(".npy") + msg.count(".npz") == 0
