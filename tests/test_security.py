"""The embedded Ray that `psamf train` starts is closed to the network (issue 9, item 1).

Anyone who reaches a Ray port can run code in the workers and read their environment (S3 credentials
included), so every Ray process of the embedded instance must listen on loopback only, and a client without
the instance's token must be refused. The embedded Ray is started in a subprocess exactly as the CLI starts it
(`psamf.runtime.init_ray`, no `RAY_ADDRESS`, `RAY_AUTH_MODE` unset as for a user), so the session's shared
test Ray is not disturbed; the subprocess stops its own Ray with `ray.shutdown()`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest

from tests.rayhead import vendored_psutil

pytestmark = pytest.mark.integration

# Runs in the subprocess: start Ray like `psamf train`, keep a Ray Data pipeline's actors and two worker tasks
# alive while every listening socket of the driver's process tree (GCS, raylet, agents, workers) is listed,
# then hand the GCS address to the test and wait on stdin until the test's clients have tried it.
_DRIVER = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import psamf.runtime as rt
    rt.init_ray(2)
    import ray, psutil

    go = Path(sys.argv[1]) / "go"

    @ray.remote(num_cpus=1)
    def hold(i):
        while not go.exists():
            time.sleep(0.05)
        return i

    held = [hold.remote(i) for i in range(2)]
    rows = ray.data.range(16, override_num_blocks=4).map_batches(lambda b: {"id": b["id"] * 2}).take_all()
    while ray.available_resources().get("CPU", 0) > ray.cluster_resources()["CPU"] - 2:
        time.sleep(0.05)  # both hold() tasks are running in their workers
    me = psutil.Process()
    listeners = []
    for p in [me] + me.children(recursive=True):
        try:
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    # The process name, then the command line's end: a deep checkout's path can push the binary's
                    # name past any fixed-length prefix of the command line.
                    listeners.append([p.pid, p.name() + " " + " ".join(p.cmdline())[-80:], c.laddr.ip,
                                      c.laddr.port])
        except psutil.NoSuchProcess:
            pass
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    print("REPORT " + json.dumps({
        "listeners": listeners,
        "rows": len(rows),
        "gcs": ray.get_runtime_context().gcs_address,
        "auth_mode": os.environ.get("RAY_AUTH_MODE"),
        "token_path": token_path,
        "token_mode": oct(os.stat(token_path).st_mode & 0o777) if token_path else None,
        "token_dir_mode": oct(os.stat(os.path.dirname(token_path)).st_mode & 0o777) if token_path else None,
        "log_dir": getattr(rt, "session_log_dir", lambda: None)(),  # None before the helper existed
    }), flush=True)
    go.touch()
    assert sorted(ray.get(held)) == [0, 1]
    sys.stdin.readline()  # the test's clients are done
    ray.shutdown()
    print("STOPPED", flush=True)
    """
)

# Runs in another subprocess: connect to the GCS as a client would and run a task there.
_CLIENT = textwrap.dedent(
    """
    import sys
    import ray
    try:
        ray.init(address=sys.argv[1], log_to_driver=False)
        print("CONNECTED", ray.get(ray.remote(lambda: 41 + 1).remote()), flush=True)
    except Exception as e:
        print("REFUSED", type(e).__name__, str(e)[:300], flush=True)
    """
)


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test session's environment less its Ray pins (auth off, loopback node IP: psamf must do both
    itself, as for a user), with Ray's files under this test's own dir."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env.update(RAY_TMPDIR=str(tmp), HOME=str(tmp / "home"), PYTHONPATH=os.pathsep.join(sys.path))
    env.update(extra)
    return env


def _client(gcs: str, tmp: Path, **extra: str) -> str:
    # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: the client keeps 127.0.0.1 as given; without it Ray rewrites
    # 127.0.0.1 into the machine's routable address, where nothing listens any more.
    env = _env(tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", **extra)
    out = subprocess.run([sys.executable, "-c", _CLIENT, gcs], env=env, capture_output=True,
                         text=True, timeout=180)
    return out.stdout + out.stderr


def _non_loopback_ips() -> list[str]:
    psutil = vendored_psutil()
    return [a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(a.address)]


def _reachable(ip: str, port: int) -> bool:
    try:
        with socket.create_connection((ip, port), timeout=5):
            return True
    except OSError:
        return False


def test_embedded_ray_listens_on_loopback_only_and_refuses_clients_without_its_token():
    tmp = Path(tempfile.mkdtemp(prefix="psamf-sec-"))  # short: Ray's Unix socket paths live under it
    (tmp / "home").mkdir()  # no ~/.ray/auth_token there: the clients have only what the test gives them
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, str(tmp)], env=_env(tmp), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(600, _kill_tree, (driver,))  # a stalled driver's output ends: the assert fails
    watchdog.start()
    try:
        lines = []
        for line in driver.stdout:
            lines.append(line)
            if line.startswith("REPORT "):
                break
        assert lines and lines[-1].startswith("REPORT "), "driver did not start:\n" + "".join(lines[-60:])
        report = json.loads(lines[-1][len("REPORT "):])

        assert report["rows"] == 16
        listeners = report["listeners"]
        names = " ".join(cmd for _, cmd, _, _ in listeners)
        assert "gcs_server" in names and "raylet" in names, listeners  # the tree was really seen
        assert len({pid for pid, *_ in listeners}) >= 4, listeners  # driver, GCS, raylet, workers
        exposed = [entry for entry in listeners if not _is_loopback(entry[2])]
        assert not exposed, f"Ray processes listening on non-loopback addresses: {exposed}"
        assert report["gcs"].startswith("127.0.0.1:"), report["gcs"]
        ports = sorted({port for *_, port in listeners})
        reached = [(ip, port) for ip in _non_loopback_ips() for port in ports if _reachable(ip, port)]
        assert not reached, f"Ray ports reachable through a non-loopback address: {reached}"

        assert report["auth_mode"] == "token"
        token = Path(report["token_path"])
        assert report["token_mode"] == "0o600" and report["token_dir_mode"] == "0o700", report
        assert str(token).startswith(tempfile.gettempdir()) and not str(token).startswith(str(tmp / "home"))
        assert report["log_dir"] and report["log_dir"].startswith(str(tmp)), report["log_dir"]
        assert Path(report["log_dir"]).is_dir()

        refused = _client(report["gcs"], tmp, RAY_AUTH_MODE="token")
        assert "REFUSED" in refused and "CONNECTED" not in refused, refused
        assert "AuthenticationError" in refused or "token" in refused.lower(), refused
        accepted = _client(report["gcs"], tmp, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
        assert "CONNECTED 42" in accepted, accepted  # the same client with the token gets in

        out, _ = driver.communicate("\n", timeout=300)
        assert driver.returncode == 0 and "STOPPED" in out, out[-3000:]
        assert not token.parent.exists(), "the token directory outlived the driver"
    finally:
        watchdog.cancel()
        _kill_tree(driver)  # failed half way: stop only the processes this test started
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_tree(driver: subprocess.Popen) -> None:
    """Kill the driver and every process below it (its embedded Ray), if it still runs."""
    if driver.poll() is not None:
        return
    psutil = vendored_psutil()
    try:
        procs = psutil.Process(driver.pid).children(recursive=True) + [psutil.Process(driver.pid)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    driver.wait()
