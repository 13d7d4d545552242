"""Shared fixtures: one local Ray for the whole test run, one moto S3 server on 127.0.0.1.

Environment set here, before anything can start Ray (see docs/ray-operations.md §3, §10):
token auth pinned off for the embedded test cluster, usage stats off, AWS credentials and
endpoint for the moto server so Ray workers see them too. The test cluster listens on 127.0.0.1 only,
like psamf's own embedded Ray (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is read when ray is imported: without it
Ray turns a requested 127.0.0.1 into the machine's routable address; see psamf.runtime).
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# SIGTERM (a CI cancel, `timeout`) unwinds like Ctrl+C, so fixture teardowns run: the Ray heads of tests/rayhead.py
# are `ray start` daemons, not children that die with this process, and would otherwise keep running
signal.signal(signal.SIGTERM, signal.default_int_handler)


def _held_port() -> tuple[socket.socket, int]:
    """A free port on 127.0.0.1, and the socket that holds it. The port goes into the environment now (Ray
    workers inherit it), and the socket itself becomes the moto server's, so that no other process (a Ray
    worker, the other pytest-xdist worker) can ever be given the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


_S3_PORT_HOLDER, S3_PORT = _held_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ENDPOINT_URL_S3": S3_ENDPOINT,
    "AWS_EC2_METADATA_DISABLED": "true",
}
for _k, _v in AWS_TEST_ENV.items():
    os.environ[_k] = _v


@pytest.fixture(autouse=True)
def _restore_logging():
    """Put the root and `psamf` loggers back as they were after each test. The commands call
    `logging.basicConfig`, and a local-mode training run gives the `psamf` logger a handler of its own
    (`psamf.train`); both bind the `sys.stderr` of the moment, which under `capsys` is a capture stream that is
    closed when the test ends. Left in place, a later test in the same process would log into that closed
    stream ("--- Logging error ---") and miss its own output, depending on which tests ran before it."""
    import logging

    loggers = (logging.getLogger(), logging.getLogger("psamf"))
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto server) on 127.0.0.1 for the whole session. Yields its endpoint URL."""
    import logging
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    # the server serves on the held socket itself: the port is never free, so no other bind can take it (with a
    # close-then-bind, werkzeug's bind failure is a sys.exit in the server thread and moto's start() waits forever)
    _S3_PORT_HOLDER.listen(128)
    server = make_server("127.0.0.1", S3_PORT, DomainDispatcherApplication(create_backend_app), threaded=True,
                         request_handler=MotoRequestHandler, fd=_S3_PORT_HOLDER.fileno())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield S3_ENDPOINT
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.fixture
def refusing_port() -> int:
    """A port on 127.0.0.1 where a connection is refused: bound for the whole test and never listening, so no other
    process can be given it (a port bound and closed again is free for the next port-0 bind on the machine)."""
    s, port = _held_port()
    yield port
    s.close()


def pytest_sessionfinish(session, exitstatus):
    _S3_PORT_HOLDER.close()  # held since import, whether or not a test started the server


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket per test; yields its name."""
    import uuid

    import boto3

    name = f"psamf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster():
    """One embedded Ray for every test that needs it. 6 logical CPUs on a 2-core machine, on purpose: more than the
    2 training workers and Ray Data's reads need (fewer hang reads: docs/ray-operations.md §2), and enough for two
    one-worker trials of a study or search side by side ((6 - 1 for Ray Data) // (1 worker + 1 driver) = 2). A Ray
    Train run spends much of its time starting processes and waiting, so two at once finish sooner on 2 cores: the
    study grid test took 110 s against 164 s with 4 logical CPUs (one trial at a time)."""
    import shutil
    import tempfile

    import ray

    if ray.is_initialized():
        yield ray
        return
    # its own temp dir (short: Ray's socket paths live under it), so two test sessions on one machine, or the two
    # pytest-xdist workers of `make test`, never share /tmp/ray's session_latest
    temp_dir = tempfile.mkdtemp(prefix="psamf-ray-")
    ray.init(
        address="local",
        _node_ip_address="127.0.0.1",
        _temp_dir=temp_dir,
        num_cpus=6,
        object_store_memory=200 * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
        # no runtime_env: the variables above are in os.environ before Ray starts, so the raylet and every worker
        # inherit them. A job-level runtime_env would start each worker through setup_worker.py (a second Python
        # interpreter per worker process): about 7 s more for one 3-split materialisation on this machine.
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """Synthetic MOSI-shaped data set (about 190 / 34 / 100 utterances, `psamf:tiny` tokens, 32 per transcript),
    prepared once for the session and shared read-only by the integration modules. Returns (uri, manifest)."""
    from psamf.prepare import prepare
    from psamf.synth import synthesize

    root = tmp_path_factory.mktemp("data")
    paths = synthesize("mosi", "mmsa", root / "synth", seed=0, scale=0.15)
    out = str(root / "shards")
    man = prepare({"format": "mmsa", "input": str(paths["pickle"]), "dataset": "mosi"}, out,
                  tokenizer="psamf:tiny", personality_tokenizer="psamf:tiny", max_text_len=32)
    return out, man
