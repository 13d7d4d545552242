"""Starting or joining Ray, the same way for every psamf entry point (prepare, train, evaluate, demo).

With no `RAY_ADDRESS`: an embedded local Ray with `max(4, workers + 2, os.cpu_count())` logical CPUs (on a
small machine deliberately oversubscribed, ray-notes §3.3/§10.1: Ray Data read tasks need CPUs the training workers do not hold)
and token auth pinned off for this private, loopback-only instance unless `RAY_AUTH_MODE` is set
(Ray >= 2.59 would otherwise turn it on and write ~/.ray/auth_token). With `RAY_ADDRESS` (always set
inside `ray job submit`): join that cluster.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("psamf.runtime")

_EMBEDDED = {"started": False}


def embedded() -> bool:
    """True when psamf runs (or would run) on its own embedded local Ray."""
    return _EMBEDDED["started"] or not os.environ.get("RAY_ADDRESS")


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
        log.info("starting an embedded local Ray (%d logical CPUs)", n)
        ray.init(address="local", num_cpus=n, include_dashboard=False,
                 object_store_memory=min(2 * 1024**3, max(200 * 1024**2, _mem_bytes() // 10)))
        _EMBEDDED["started"] = True
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
