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


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and port-0 binds (Linux: 32768 by default)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, 20000 + 201 + 1000)  # a kernel configured lower still leaves a 1000-port choice


def _pids_matching(needles: list[str]) -> list[int]:
    import ray  # noqa: F401  (Ray puts the psutil it vendors on sys.path)
    import psutil

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
        (self.gcs_port, self.dashboard_port, self.client_port, nm, om, agent_http, agent_grpc, rt_env, metrics,
         worker_lo) = free_ports(10)
        # worker ports: a 200-port range that holds none of the ports above (Ray refuses a clash: seen in CI once)
        # and lies below the kernel's ephemeral range. Ray checks a worker port is free when it hands it out, but a
        # driver binds it seconds later; inside the ephemeral range any outgoing connection can take it meanwhile
        # ("Address already in use" from a job driver's CoreWorker, seen in CI once). Ray's own default, 10002-19999,
        # stays free for the embedded Ray of other tests.
        others = (self.gcs_port, self.dashboard_port, self.client_port, nm, om, agent_http, agent_grpc, rt_env, metrics)
        span = ephemeral_low() - 201 - 20000
        worker_lo = 20000 + worker_lo % span
        while any(worker_lo <= p <= worker_lo + 200 for p in others):
            worker_lo = 20000 + (worker_lo + 201) % span
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
            # a random range, not checked port by port (a busy worker port is retried by Ray)
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
        import ray  # noqa: F401  (Ray puts the psutil it vendors on sys.path; a module that starts a head by the
        import psutil  # CLI alone, tests/test_jobs.py run by itself, has not imported Ray yet)

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
