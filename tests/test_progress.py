"""`psamf synth` and `psamf prepare` show progress on stderr: plain lines in a log, a bar on a terminal,
and prepare says which repairs it made (issue 9, item 13)."""

from __future__ import annotations

import os
import re

import pytest

from psamf import cli
from psamf.progress import Progress


@pytest.mark.filterwarnings("ignore::psamf.sources.ChecksumMismatchWarning")
def test_synth_and_prepare_print_progress_lines(tmp_path, capsys):
    assert cli.main(["synth", "--kind", "mosi", "--format", "custom", "--out", str(tmp_path / "src"),
                     "--scale", "0.05"]) == 0
    err = capsys.readouterr().err
    assert "synth: generating mosi (seed 0, scale 0.05)" in err
    lines = [ln for ln in err.splitlines() if ln.startswith("synth: writing feature files:")]
    assert 2 <= len(lines) <= 11 and re.search(r": (\d+)/\1 utterances \(100%", lines[-1])  # tenths, no flood
    assert "\r" not in err and "\x1b" not in err  # a log gets lines, not a redrawn bar
    assert cli.main(["prepare", "--format", "custom", "--input", str(tmp_path / "src" / "manifest.csv"),
                     "--dataset", "mosi", "--out", str(tmp_path / "shards"), "--tokenizer", "psamf:tiny",
                     "--rows-per-shard", "20"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"prepare: repairs made while reading mosi \(.*manifest\.csv and \d+ feature files it "
                     r"lists\): (audio|visual) nonfinite values zeroed: \d+", err)
    for step in ("validate", "tokenize", "statistics", "write"):
        assert f"prepare: {step} done" in err
    assert re.search(r"prepare: writing shards: (\d+)/\1 shards \(100%", err)


def test_quiet_when_asked(tmp_path, capsys):
    assert cli.main(["synth", "--kind", "mosi", "--out", str(tmp_path / "src"), "--scale", "0.02",
                     "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_terminal_gets_a_bar(tmp_path):
    master, slave = os.openpty()
    with open(slave, "w", closefd=True) as tty:
        assert tty.isatty()
        with Progress("prepare: writing shards", 5, unit="shard", stream=tty) as bar:
            for _ in range(5):
                bar.update(1)
        tty.flush()
    chunks = []
    while True:  # everything written before the slave closed, then EIO
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    data = b"".join(chunks).decode(errors="replace")
    assert "prepare: writing shards" in data and "5/5" in data and "100%" in data and "\r" in data
