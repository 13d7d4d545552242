"""A real Ray head for the cluster tests, started with `ray start` like a user's, and stopped by its own processes.

`LocalHead` gives the head its own temp dir (short: Ray's Unix sockets live under it), its own free ports for every
Ray listener, a fresh token in its own file (never `~/.ray/auth_token`: HOME points into the temp dir) and loopback
binding. `stop()` signals only the processes whose command line names this head's temp dir or its GCS address,
never `ray stop` (which would stop every Ray on the machine, the test session's own included).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and port-0 binds (Linux: 32768 by default)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 20000 + 201 + 1000)  # a kernel configured lower still leaves a 1000-port choice


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_block(n: int) -> int:
    """The first of `n` consecutive ports below the kernel's ephemeral range, each free now. The kernel never hands
    these out for a port-0 bind or an outgoing connection, so they stay free until Ray binds them (a port taken
    from a port-0 bind and closed lies in the ephemeral range: any port-0 bind on the machine can get it before
    Ray does). Under pytest-xdist each test process draws from its own slice, so two heads never share a port."""
    lo, hi = 20000, ephemeral_low()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    k, count = int(worker[2:] or 0), max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    width = (hi - lo) // count
    lo, hi = lo + k * width, lo + (k + 1) * width
    for _ in range(100):
        start = lo + secrets.randbelow(hi - lo - n)
        if all(_bindable(p) for p in range(start, start + n)):
            return start
    raise RuntimeError(f"no {n} free consecutive ports in {lo}-{hi}")


def vendored_psutil():
    """psutil as Ray ships it: it is not installed on its own, and importing Ray puts the copy Ray vendors on
    sys.path. A test process may not have imported Ray yet (tests/test_jobs.py run by itself starts its head by
    the CLI), so Ray is imported first every time."""
    import ray  # noqa: F401
    import psutil

    return psutil


def _pids_matching(needles: list[str]) -> list[int]:
    psutil = vendored_psutil()
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if p.info["pid"] != os.getpid() and any(n in cmd for n in needles):
            out.append(p.info["pid"])
    return out


class LocalHead:
    """`ray start --head` on 127.0.0.1 with token auth, in its own temp dir and on its own ports."""

    def __init__(self, num_cpus: int = 4, extra_args: tuple[str, ...] = (), extra_env: dict[str, str] | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="psamf-head-"))
        (self.tmp / "home").mkdir()
        self.token_path = self.tmp / "token"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        # every port of the head, listeners and the 201 worker ports, in one block below the kernel's ephemeral range
        # (a worker port inside it was taken by an outgoing connection before the job driver bound it, seen in CI
        # once: "Address already in use"); Ray's own default worker range, 10002-19999, stays free for the
        # embedded Ray of other tests
        base = port_block(9 + 201)
        (self.gcs_port, self.dashboard_port, self.client_port, nm, om, agent_http, agent_grpc, rt_env,
         metrics) = range(base, base + 9)
        worker_lo = base + 9
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.num_cpus = num_cpus
        self._args = [
            "--head", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--temp-dir={self.tmp / 'ray'}",
            f"--num-cpus={num_cpus}", "--disable-usage-stats", "--object-store-memory=200000000",
            f"--port={self.gcs_port}", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
            f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 200}",
            *extra_args,
        ]
        self._extra_env = dict(extra_env or {})

    def env(self, token: bool = True, **extra: str) -> dict[str, str]:
        """The environment of a client of this head (the test session's, less its Ray pins); without `token`,
        a client that has neither the mode nor the token."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")}
        env.update(HOME=str(self.tmp / "home"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONUNBUFFERED="1")
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path))
        env.update(extra)
        return env

    def start(self) -> "LocalHead":
        out = subprocess.run([RAY, "start", *self._args], env=self.env(**self._extra_env), capture_output=True,
                             text=True, timeout=180)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return self

    def ray(self, *args: str, token: bool = True, timeout: float = 900, **extra_env: str) -> subprocess.CompletedProcess:
        """Run the `ray` CLI against this head (`ray job ...` gets `--address` from RAY_API_SERVER_ADDRESS)."""
        env = self.env(token=token, RAY_API_SERVER_ADDRESS=self.dashboard, RAY_ADDRESS=self.gcs_address, **extra_env)
        return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)

    def api(self, path: str, timeout: float = 60) -> dict:
        """GET one of the dashboard's REST endpoints with this head's token (what `ray status`, `ray job status`
        and `ray job logs` read), in this process: a CLI call starts a Python that imports Ray, seconds of CPU
        taken from the jobs a test watches on a 2-core machine; this takes milliseconds."""
        req = urllib.request.Request(self.dashboard + path,
                                     headers={"Authorization": f"Bearer {self.token_path.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def pids(self) -> list[int]:
        """This head's processes: those whose command line names its temp dir or GCS address, and every process
        below them (Ray renames its agents, `ray::DashboardAgent`, `ray::RuntimeEnvAgent`, so that their command
        lines name neither, and they can outlive a killed raylet)."""
        psutil = vendored_psutil()
        pids = _pids_matching([str(self.tmp / "ray"), f"--address={self.gcs_address}",
                               f"--gcs-address={self.gcs_address}"])
        below = set()
        for pid in pids:
            try:
                below.update(c.pid for c in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        return pids + sorted(below - set(pids))

    def stop(self, grace_s: float = 3.0) -> list[int]:
        """What `ray stop` does, for this head's processes only. Returns the PIDs it signalled. The grace period is
        shorter than `ray stop`'s 16 s: the Python processes exit within a second of SIGTERM, the GCS and the raylet
        were still running 20 s after it (measured), and a test head keeps nothing that a SIGKILL could lose."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.5)
        for pid in pids:  # the GCS can hang on SIGTERM (hence `ray stop`'s SIGKILL after a grace period)
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (already exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return False
