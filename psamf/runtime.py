"""Starting or joining Ray, the same way for every psamf entry point (prepare, train, evaluate, demo).

With no `RAY_ADDRESS`: an embedded local Ray with `max(4, workers + 2, os.cpu_count())` logical CPUs (on a
small machine deliberately oversubscribed, ray-notes §3.3/§10.1: Ray Data read tasks need CPUs the training workers do not hold)
and token auth pinned off for this private, loopback-only instance unless `RAY_AUTH_MODE` is set
(Ray >= 2.59 would otherwise turn it on and write ~/.ray/auth_token). With `RAY_ADDRESS` (always set
inside `ray job submit`): join that cluster.

The embedded Ray is quiet by default: worker logs are not streamed to the console (`log_to_driver=False`; they
stay in /tmp/ray/session_latest/logs) and the driver's own Ray INFO lines and Ray's deprecation warnings are
hidden, so the console shows psamf's progress (the driver prints each epoch from the run's history.json; see
`psamf.train`). Errors still surface: a failed worker raises in the driver with its traceback. Set
`PSAMF_RAY_LOGS=1` to stream everything. On a cluster, worker logs always stream (they belong in the job log).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("psamf.runtime")

_EMBEDDED = {"started": False, "quiet": False}


def embedded() -> bool:
    """True when psamf runs (or would run) on its own embedded local Ray."""
    return _EMBEDDED["started"] or not os.environ.get("RAY_ADDRESS")


def quiet() -> bool:
    """True when this process started a quiet embedded Ray (worker logs not streamed; see the module docstring)."""
    return _EMBEDDED["quiet"]


def _quiet_driver() -> None:
    import warnings

    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # Ray Data configures its own logger on first use
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray(\.|$)")


def _mem_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 1024**3


def init_ray(num_workers: int = 2) -> None:
    """Start or join Ray, unless already initialised (see the module docstring)."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        n = max(4, num_workers + 2, os.cpu_count() or 1)
        quiet_logs = os.environ.get("PSAMF_RAY_LOGS", "0") != "1"
        log.info("starting an embedded local Ray (%d logical CPUs)%s", n,
                 "; worker logs in /tmp/ray/session_latest/logs (PSAMF_RAY_LOGS=1 streams them)" if quiet_logs
                 else "")
        if quiet_logs:
            _quiet_driver()
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=not quiet_logs,
                 logging_level=logging.WARNING if quiet_logs else logging.INFO,
                 object_store_memory=min(2 * 1024**3, max(200 * 1024**2, _mem_bytes() // 10)))
        _EMBEDDED["started"] = True
        _EMBEDDED["quiet"] = quiet_logs
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if not sys.stderr.isatty():
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # we turned the bars off on purpose: skip Ray Data's warning
