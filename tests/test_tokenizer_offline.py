"""`psamf prepare` with a hub tokenizer on a machine that cannot reach the hub fails fast, once, with a message
that says how to give a local path or `psamf:tiny` (issue 9, item 10). A subprocess: the hub library reads
HF_ENDPOINT / HF_HUB_OFFLINE when it is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.filterwarnings("ignore::psamf.sources.ChecksumMismatchWarning")
@pytest.mark.parametrize("offline", ["", "1"])
def test_prepare_without_hub_fails_fast_with_instructions(tmp_path, offline, refusing_port):
    from psamf.synth import synthesize

    pkl = synthesize("mosi", "mmsa", tmp_path / "src", seed=1, scale=0.02)["pickle"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf-home"),
               HF_ENDPOINT=f"http://127.0.0.1:{refusing_port}")
    if offline:
        env["HF_HUB_OFFLINE"] = offline
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "psamf.cli", "prepare", "--format", "mmsa", "--input", str(pkl),
                           "--dataset", "mosi", "--out", str(out), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    err = proc.stderr
    assert proc.returncode == 2, err[-2000:]
    assert "tokenizer 'bert-base-uncased'" in err and "--tokenizer /path/to/" in err and "psamf:tiny" in err
    assert "Traceback" not in err
    assert "Retry" not in err and "retry" not in err  # no backoff loop against an unreachable hub
    assert not (out / "manifest.json").exists()
