"""`ray job submit` end to end against a real Ray head (issue 10, item 1).

One head for the module, started like a user's (`ray start --head`, 127.0.0.1, token auth, its own temp dir and
ports: see `tests/rayhead.py`). The jobs are the shipped entry points, submitted as the cluster guide says
(`--working-dir .` and `cluster/runtime_env.yaml`), in the order a user runs them: `jobs/prepare.py` writes shards,
`jobs/train.py` trains on them, and a resubmission of the same run name under a new submission id resumes it. A
client without the token is refused. The head's processes, and only those, are stopped at the end. (`jobs/tune.py`
is submitted in `tests/test_autoscaling.py`, to a cluster that has to grow for its trials.) Needs `ray[default]`
(the `cluster` extra): the Jobs API lives in the dashboard.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.rayhead import LocalHead

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head():
    h = LocalHead(num_cpus=6).start()  # logical CPUs: the train job's worker and Ray Data, with room to spare
    yield h
    pids = h.stop()
    assert pids and not h.pids(), "the head's processes outlived stop()"


def _submit(head: LocalHead, submission_id: str, *entrypoint: str, token: bool = True, **env: str):
    """`ray job submit` from the repository root, as a user submits: the working dir is uploaded and becomes the
    job's cwd; `cluster/runtime_env.yaml` is the project's runtime env. Waits for the job's end (the CLI follows
    its logs) and returns the finished CLI process."""
    import subprocess

    return subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--submission-id", submission_id,
         "--working-dir", ".", "--runtime-env", "cluster/runtime_env.yaml", "--", sys.executable, *entrypoint],
        cwd=REPO, env=head.env(token=token, RAY_API_SERVER_ADDRESS=head.dashboard, **env), capture_output=True,
        text=True, timeout=900)


def _ok(out) -> str:
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text[-6000:]
    return text


@pytest.fixture(scope="module")
def shards(head, tmp_path_factory):
    """`jobs/prepare.py` as a job: a synthetic MOSI-shaped pickle (written here) into shards."""
    from psamf.synth import synthesize

    root = tmp_path_factory.mktemp("jobs")
    pkl = synthesize("mosi", "mmsa", root / "synth", seed=3, scale=0.1)["pickle"]
    out = root / "shards"
    _ok(_submit(head, f"prepare-{uuid.uuid4().hex[:8]}", "jobs/prepare.py", "--format", "mmsa", "--input",
                str(pkl), "--dataset", "mosi", "--out", str(out), "--tokenizer", "psamf:tiny",
                "--max-text-len", "32", "--no-progress"))
    man = json.loads((out / "manifest.json").read_text())
    assert set(man["splits"]) == {"train", "valid", "test"} and min(man["counts"].values()) > 0
    return root, out


@pytest.mark.slow
def test_train_job_writes_its_outputs_and_a_resubmission_resumes(head, shards):
    root, data = shards
    storage = root / "runs"
    args = ["jobs/train.py", "--config", "jobs/configs/tiny-synth.yaml", "--run-name", "job-run",
            f"data.uri={data}", f"run.storage_path={storage}", "run.num_workers=1", "optim.batch_size=32"]
    text = _ok(_submit(head, "job-run", *args, "optim.epochs=1"))
    run = storage / "job-run"
    m = json.loads((run / "metrics.json").read_text())
    assert m["test"]["n"] > 0 and m["test"]["mae"] > 0 and "mae" in m["valid"]
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [0]
    assert (run / "predictions.parquet").exists() and list(run.glob("checkpoint_epoch=*"))
    assert "selected epoch 0 of 1 trained (numbered from 0" in text  # the driver's summary reaches the client

    # the run name is the resume key: a new submission id, the same name, one more epoch
    _ok(_submit(head, "job-run-attempt2", *args, "optim.epochs=2"))
    h2 = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in h2] == [0, 1]  # epoch 0 is not trained again
    assert [h["session"] for h in h2] == [0, 1] and h2[1]["resumed_from"] == 0

    # the same submission id again is refused by Ray (the job record exists); nothing runs
    again = _submit(head, "job-run", *args, "optim.epochs=3")
    assert again.returncode != 0 and "job-run" in again.stdout + again.stderr
    assert json.loads((run / "history.json").read_text()) == h2


def test_a_client_without_the_token_is_refused(head):
    out = _submit(head, "no-token", "jobs/train.py", "--smoke-test", "--run-name", "no-token", token=False)
    text = (out.stdout + out.stderr).lower()
    assert out.returncode != 0 and "missing authentication token" in text, text[-3000:]  # refused for that
    bad = head.tmp / "bad-token"  # token mode on, another token
    bad.write_text("0" * 64)
    wrong = _submit(head, "wrong-token", "-c", "print(1)", RAY_AUTH_TOKEN_PATH=str(bad))
    assert wrong.returncode != 0 and "invalid authentication token" in (wrong.stdout + wrong.stderr).lower()
    # neither attempt created a job
    jobs = head.ray("job", "list")
    assert jobs.returncode == 0 and "no-token" not in jobs.stdout and "wrong-token" not in jobs.stdout
