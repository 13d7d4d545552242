"""An autoscaling multi-node Ray cluster simulated on this machine (issue 10, item 2).

The cluster is `cluster/local/autoscaling.yaml` as shipped (Ray's fake multi-node provider: each node a local
raylet; the autoscaler starts and stops them as it would VMs), with its GCS port and idle timeout set for the test.
The head has no CPUs (like `cluster/vm/aws.yaml`'s); training workers need the `accel` resource that only
`gpu_worker` nodes have, so every run makes the autoscaler add nodes from 0. Shards, runs and searches live on the
moto S3 server: the fake nodes share this machine's disk, real nodes share nothing. Node counts are read from the
autoscaler's own status (`ray status`), never assumed from timings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.rayhead import LocalHead, vendored_psutil

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
IDLE_TIMEOUT_MIN = 0.2  # 12 s: the shipped file's 0.5 min, shortened for CI
SEARCH_IDLE_TIMEOUT_MIN = 3.0  # the search test: no node is removed between its trials


def _status(head: LocalHead) -> dict[str, int]:
    """Active node counts by node type, from the autoscaler's status: the text `ray status` prints, read from the
    dashboard's /api/cluster_status (the same formatter; no `ray` process per poll, see LocalHead.api)."""
    deadline = time.time() + 60
    # "No cluster status. It may take a few seconds ..." until the autoscaler's first report after the head starts
    while "Active:" not in (text := head.api("/api/cluster_status?format=1")["data"]["clusterStatus"]):
        assert time.time() < deadline, text
        time.sleep(1)
    active = text.split("Active:", 1)[1].split("Pending:", 1)[0]
    return {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+(\S+)\s*$", active, re.M)}


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    cfg = yaml.safe_load((REPO / "cluster/local/autoscaling.yaml").read_text())
    h = LocalHead(num_cpus=0)
    cfg["provider"]["gcs_address"] = h.gcs_address
    cfg["idle_timeout_minutes"] = IDLE_TIMEOUT_MIN
    # the shipped provider, plus a cloud's behaviour: a node whose raylet died is reported gone (tests/fake_cloud.py)
    assert cfg["provider"]["type"] == "fake_multinode"
    cfg["provider"].update(type="external", module="tests.fake_cloud.FakeCloudProvider",
                           hold_launches_file=str(h.tmp / "hold-launches"))
    (h.tmp / "autoscaling.yaml").write_text(yaml.safe_dump(cfg))
    h._args += [f"--autoscaling-config={h.tmp / 'autoscaling.yaml'}", '--resources={"TRAIN_DRIVER": 4}']
    # a lost node is declared dead after 10 s without a heartbeat (default 30 s), then replaced
    h._extra_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    h.start()
    try:
        yield _cluster_data(h, s3_server, tmp_path_factory)
    finally:  # also when the set-up below fails: the head, its autoscaler and fake nodes are stopped
        h.stop()


def _cluster_data(h: LocalHead, s3_server: str, tmp_path_factory) -> tuple[LocalHead, str, str]:
    import boto3

    bucket = f"psamf-as-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    pkl = synthesize("mosi", "mmsa", tmp_path_factory.mktemp("as") / "synth", seed=4, scale=0.08)["pickle"]
    data = f"s3://{bucket}/shards"
    prepare({"format": "mmsa", "input": str(pkl), "dataset": "mosi"}, data, tokenizer="psamf:tiny",
            personality_tokenizer="psamf:tiny", max_text_len=32)
    assert _status(h) == {"ray.head.default": 1}  # nothing but the head before any work
    return h, bucket, data


class Watch:
    """Polls the autoscaler's status while a job runs: the peak of each node type, and whether demand was left
    pending while the group was at its maximum."""

    def __init__(self, head: LocalHead):
        self.head, self.peak, self.samples = head, {}, []

    def poll(self) -> dict[str, int]:
        s = _status(self.head)
        self.samples.append((time.time(), s))
        for k, v in s.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        return s


def _submit_no_wait(head: LocalHead, sid: str, script: str, *args: str, env: dict[str, str] | None = None) -> None:
    """Submit without a working_dir: the fake nodes share one session directory, and a fake node's termination
    took the unpacked working_dir (the job driver's cwd) with it in our runs, which a real cluster's separate disks
    never do. So the code comes from the installed package, as on a cluster whose image carries psamf, with the
    project's runtime env otherwise (its env vars)."""
    env_vars = {**yaml.safe_load((REPO / "cluster/runtime_env.yaml").read_text())["env_vars"], **(env or {})}
    out = subprocess.run(
        [str(Path(sys.executable).with_name("ray")), "job", "submit", "--no-wait", "--submission-id", sid,
         "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", sys.executable, str(REPO / script), *args],
        cwd=REPO, env=head.env(RAY_API_SERVER_ADDRESS=head.dashboard), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _job_status(head: LocalHead, sid: str) -> str:
    """The job's status as `ray job status` reads it (the Jobs REST API): PENDING, RUNNING, SUCCEEDED, ..."""
    return head.api(f"/api/jobs/{sid}")["status"]


def _wait_job(head: LocalHead, sid: str, watch: Watch, timeout_s: float = 900, on_poll=None) -> str:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        watch.poll()
        if on_poll is not None:
            on_poll()
        st = _job_status(head, sid)
        if st in ("SUCCEEDED", "FAILED", "STOPPED"):
            return st
        time.sleep(2)
    raise AssertionError(f"job {sid} still running after {timeout_s} s")


def _logs(head: LocalHead, sid: str, tail: int | None = 8000) -> str:
    out = head.api(f"/api/jobs/{sid}/logs")["logs"]
    return out if tail is None else out[-tail:]


def _s3_json(uri: str):
    import s3fs

    return json.loads(s3fs.S3FileSystem().cat_file(uri.removeprefix("s3://")))


TRAIN = ["jobs/train.py", "--config", str(REPO / "jobs/configs/tiny-synth.yaml"), "run.num_workers=2",
         "run.worker_resources={accel: 1}", "optim.batch_size=32"]


def _nodes(head: LocalHead) -> list[dict]:
    """Every node the GCS knows (Ray's state API, as `ray list nodes` reads it): id, alive, its `accel`."""
    rows = head.api("/api/v0/nodes?detail=1&limit=1000")["data"]["result"]["result"]
    return [{"id": n["node_id"], "alive": n["state"] == "ALIVE", "accel": n["resources_total"].get("accel", 0)}
            for n in rows]


def _kill_node(node_id: str) -> int:
    """SIGKILL one fake node's raylet, as a VM's loss kills it: its workers go with it. Returns the raylet's pid."""
    psutil = vendored_psutil()
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.info["name"] == "raylet" and f"--node_id={node_id}" in cmd:
            os.kill(p.info["pid"], signal.SIGKILL)
            return p.info["pid"]
    raise AssertionError(f"no raylet of node {node_id}")


def test_a_training_job_scales_up_from_zero_goes_on_with_fewer_workers_while_a_lost_node_is_replaced_and_scales_back_to_zero(cluster):  # noqa: E501
    """One elastic job (`run.min_workers=1`, `run.num_workers=2`: Ray Train's elastic worker count), four behaviours.
    The worker group grows from 0 to the 2 nodes the run needs. One node is killed once the run trains on both; its
    replacement is held back in launch (a cloud that is slow to boot a VM, tests/fake_cloud.py), and the run goes on
    from its latest checkpoint with 1 worker on the surviving node. When the replacement is let through, the run
    may grow back to 2 workers (Ray Train's decision, below). After the job the idle nodes go and the group is back
    at 0. Every epoch is recorded once, with the world size that trained it."""
    head, bucket, data = cluster
    hold = head.tmp / "hold-launches"
    w = Watch(head)
    sid = "as-elastic"
    runs = f"s3://{bucket}/runs"
    # The first restart after the loss asks for 2 workers: Ray Train sizes it from its autoscaling coordinator's
    # view of the cluster, refreshed every 20 s, which still holds the lost node. That group's placement waits
    # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default, 10 s here: it bounds the placement group's wait alone,
    # not the workers' start) and the next try sizes from a fresh view.
    _submit_no_wait(head, sid, *TRAIN, "--run-name", sid, f"data.uri={data}", f"run.storage_path={runs}",
                    "optim.epochs=13", "run.max_failures=5", "run.min_workers=1", "run.elastic_resize_interval_s=5",
                    env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
    ev: dict[str, object] = {}

    def step():
        try:
            hist = _s3_json(f"{runs}/{sid}/history.json")
        except FileNotFoundError:
            return
        if "killed" not in ev:
            # training on both nodes: lose one, hold its replacement. Two 2-worker records, not one: rank 0 writes an
            # epoch's record before its checkpoint is reported (a Tune scheduler may stop a trial at the report), so
            # a kill right after the first record can land before any checkpoint exists; the run then starts over
            # and rewrites history.json from epoch 0. Once the second record is written, the first epoch's
            # checkpoint has been reported.
            if len(hist) >= 2 and hist[-1]["world_size"] == hist[-2]["world_size"] == 2:
                nodes = [n for n in _nodes(head) if n["alive"] and n["accel"] > 0]
                assert len(nodes) == 2, nodes
                hold.touch()
                ev.update(killed=_kill_node(nodes[0]["id"]), t_kill=time.time(), before={n["id"] for n in nodes},
                          at_epoch=len(hist))
        elif "released" not in ev:
            if any(h["world_size"] == 1 for h in hist[ev["at_epoch"] - 1:]):  # the run went on with 1 worker
                ev["active_while_held"] = _status(head).get("gpu_worker", 0)
                hold.unlink()
                ev.update(released=len(hist), t_release=time.time())
        elif "replacement" not in ev:
            new = {n["id"] for n in _nodes(head) if n["alive"] and n["accel"] > 0} - ev["before"]
            if new:
                ev.update(replacement=sorted(new)[0], t_replacement=time.time())
        elif "t_grown" not in ev and hist[-1]["world_size"] == 2:
            ev["t_grown"] = time.time()

    try:
        assert _wait_job(head, sid, w, on_poll=step) == "SUCCEEDED", _logs(head, sid)
    finally:
        hold.unlink(missing_ok=True)
    assert "released" in ev, ev  # the run trained with 1 worker after the loss
    hist = _s3_json(f"{runs}/{sid}/history.json")
    assert [h["epoch"] for h in hist] == list(range(13)), hist  # every epoch once
    sizes, sessions = [h["world_size"] for h in hist], [h["session"] for h in hist]
    k, r = ev["at_epoch"], ev["released"]
    t0 = ev["t_kill"]
    # in full on failure (pytest shortens a non-string message): what happened when, and Ray Train's resize decisions
    decisions = [x for x in _logs(head, sid, None).splitlines() if "Deciding" in x or "Attempting to start" in x]
    why = (f"world sizes {sizes}, sessions {sessions}, events {({x: y for x, y in ev.items() if x != 'before'})}, "
           f"seconds after the kill: {({x: round(y - t0) for x, y in ev.items() if x.startswith('t_')})}\n"
           + "\n".join(decisions)[-4000:])
    # the first epoch trained by 1 worker after the loss: epoch k - 2's checkpoint was reported before the kill, so
    # the run resumed from it or from a later one (the run may also have started on 1 worker, when one node came up
    # before the other)
    one = k - 1 + sizes[k - 1:].index(1)
    # 2 workers until the loss (an epoch may finish before the loss is noticed), then 1 before the replacement was
    # let through
    assert sizes[k - 2] == 2 and k - 1 <= one < r, why
    phases = [x for i, x in enumerate(sizes[k - 2:]) if i == 0 or x != sizes[k - 3 + i]]
    # Growing back is Ray Train's decision: its policy sees the new node once its autoscaling coordinator's 20 s view
    # does, and restarts the group at its next check. It did, 40-49 s after the replacement was up, in 4 of the 5
    # runs of this test whose sizes were recorded (docs/ray-operations.md); in the fifth the run ended on 1 worker,
    # 14 epochs after the loss. So the test wants 2, then 1 while the replacement was held, then 2 again or the end
    # of the run: never any other size, never a change back to 1; each change a restart from the latest checkpoint.
    assert phases in ([2, 1], [2, 1, 2]), why
    assert sessions[one - 1] < sessions[one], why  # going on with 1 worker was a restart from a checkpoint
    if phases == [2, 1, 2]:
        two = one + sizes[one:].index(2)  # the first epoch after growing back
        assert sessions[one] < sessions[two], why
    assert all(h["resumed_from"] is not None for h in hist[one:]), hist
    assert ev["active_while_held"] == 1, why  # the autoscaler's status: one gpu_worker while the run went on
    while "replacement" not in ev and time.time() - ev["t_release"] < 120:  # a run that ended on 1 worker
        step()
        time.sleep(2)
    assert ev.get("replacement"), why  # the autoscaler replaced the lost node: a gpu_worker that did not exist before
    m = _s3_json(f"{runs}/{sid}/metrics.json")
    assert m["test"]["n"] > 0 and m["test"]["mae"] > 0 and m["selection"]["epochs_trained"] == 13
    # two Ray Train workers, one `accel` each, one per gpu_worker node: the group grew from 0 to exactly 2
    assert w.peak.get("gpu_worker") == 2 and all(s.get("gpu_worker", 0) <= 2 for _, s in w.samples), w.samples
    # idle nodes go after the idle timeout: the autoscaler's status shows the group back at 0, the head alone
    ended = time.time()
    while time.time() - ended < 180:
        if w.poll().get("gpu_worker", 0) == 0:
            break
        time.sleep(2)
    assert w.samples[-1][1] == {"ray.head.default": 1}, w.samples[-5:]
    print(why, "\nelastic timeline (s after the kill): "
          + ", ".join(f"{n} {ev[t] - ev['t_kill']:.0f}" for n, t in
                      [("released", "t_release"), ("replacement up", "t_replacement"), ("grown", "t_grown")]
                      if t in ev) + f"; world sizes {sizes}; sessions {sessions}")


def test_a_search_with_more_trials_than_fit_grows_the_cluster_to_its_maximum_and_no_further(cluster, tmp_path):
    head, bucket, data = cluster
    # This test does not watch scale-down. With the 12 s timeout, the autoscaler removed gpu_worker nodes as idle
    # while trials were still waiting to place their worker groups on them, then added new ones (its log: "Removing
    # 2 nodes of type gpu_worker (idle)" right after adding them). The autoscaler rereads its config file at every
    # update, so a longer timeout takes effect for this test alone.
    from psamf.storage import atomic_open

    conf = head.tmp / "autoscaling.yaml"
    old_conf = yaml.safe_load(conf.read_text())
    with atomic_open(conf, "w") as f:  # the monitor never reads a half-written file
        yaml.safe_dump({**old_conf, "idle_timeout_minutes": SEARCH_IDLE_TIMEOUT_MIN}, f)
    try:
        _search_grows_the_cluster_to_its_maximum(head, bucket, data, tmp_path)
    finally:  # the module's cluster is shared: a test run after this one gets the timeout it was started with
        with atomic_open(conf, "w") as f:
            yaml.safe_dump(old_conf, f)


def _search_grows_the_cluster_to_its_maximum(head, bucket, data, tmp_path) -> None:
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({
        "base": {"preset": "tiny", "overrides": {"data.uri": data, "optim.epochs": 1, "optim.batch_size": 32,
                                                 "run.worker_resources": {"accel": 1}}},
        "metric": "val_mae", "mode": "min", "num_samples": 3, "search": "random", "scheduler": "none",
        "workers_per_trial": 1, "max_concurrent_trials": 3, "seed": 0,
        "space": {"optim.lr_main": {"loguniform": [1.0e-3, 1.0e-2]}},
    }))
    w = Watch(head)
    sid = "as-search"
    # the search file travels by path: this machine's disk is the head's
    _submit_no_wait(head, sid, "jobs/tune.py", "--config", str(search), "--name", sid,
                    "--storage", f"s3://{bucket}/searches")
    assert _wait_job(head, sid, w) == "SUCCEEDED", _logs(head, sid)
    # three trials want an `accel` each; gpu_worker's max_workers is 2: the group reached 2 and never more
    assert w.peak.get("gpu_worker") == 2 and all(s.get("gpu_worker", 0) <= 2 for _, s in w.samples), w.samples
    import pyarrow.parquet as pq
    import s3fs

    with s3fs.S3FileSystem().open(f"{bucket}/searches/{sid}/trials.parquet", "rb") as f:
        trials = pq.read_table(f).to_pylist()
    assert len(trials) == 3 and all(t["status"] == "finished" and t["epochs_run"] == 1 for t in trials), trials
    # the search's own outputs: the best trial, chosen on validation, evaluated once on test
    m = _s3_json(f"s3://{bucket}/searches/{sid}/metrics.json")
    assert m["best_trial"] in {t["trial_id"] for t in trials} and m["test"]["n"] > 0 and "mae" in m["test"]
    assert m["selection"]["metric"] == "val_mae"


