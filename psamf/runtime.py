"""Starting or joining Ray, the same way for every psamf entry point (prepare, train, evaluate, demo).

With no `RAY_ADDRESS`: an embedded local Ray with `max(4, workers + 2, os.cpu_count())` logical CPUs (on a
small machine deliberately oversubscribed: Ray Data read tasks need CPUs the training workers do not hold).
It is closed to the network in two ways, because anyone who reaches a Ray port can run code in the workers
and read their environment (S3 credentials included):

- every Ray process of it (GCS, raylet, core workers, agents) binds to 127.0.0.1. Ray binds its gRPC servers
  to the node IP, and on Linux it turns a requested 127.0.0.1 into the machine's routable address unless
  `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, which Ray reads when it is imported: `psamf/__init__.py` sets it,
  and `init_ray` refuses to start if Ray was imported before psamf and would bind elsewhere;
- token authentication with a token generated for this instance (256 bits, in a file of mode 0600 in a
  private 0700 directory, passed as `RAY_AUTH_TOKEN_PATH`, removed when the process exits; Ray then turns
  token mode on for the new local cluster and exports `RAY_AUTH_MODE=token` to it). The token is never
  logged and never reaches a run config. A `RAY_AUTH_MODE` set by the user is respected as it is (with
  `token`, the user's own `RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` / ~/.ray/auth_token is used).

With `RAY_ADDRESS` (always set inside `ray job submit`): join that cluster.

The embedded Ray is quiet by default: worker logs are not streamed to the console (`log_to_driver=False`; they
stay in this instance's own session directory, `session_log_dir()`; `/tmp/ray/session_latest` may be another
process's session on a shared host) and the driver's own Ray INFO lines and Ray's deprecation warnings are
hidden, so the console shows psamf's progress (the driver prints each epoch from the run's history.json; see
`psamf.train`). Errors still surface: a failed worker raises in the driver with its traceback. Set
`PSAMF_RAY_LOGS=1` to stream everything. On a cluster, worker logs always stream (they belong in the job log).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("psamf.runtime")

LOOPBACK = "127.0.0.1"
# Ray's switch for multi-node clusters; "0" makes it keep a requested 127.0.0.1 as the node IP (read at import).
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

_EMBEDDED: dict = {"started": False, "quiet": False, "session_dir": None}


def embedded() -> bool:
    """True when psamf runs (or would run) on its own embedded local Ray."""
    return _EMBEDDED["started"] or not os.environ.get("RAY_ADDRESS")


def quiet() -> bool:
    """True when this process started a quiet embedded Ray (worker logs not streamed; see the module docstring)."""
    return _EMBEDDED["quiet"]


def quiet_tune_console() -> None:
    """Ray Tune's console output off for psamf's searches and grids, which print their own line per trial and
    summary: with Ray's new output engine (`RAY_AIR_NEW_OUTPUT`, default on) even `verbose=0` prints a
    "Configuration for experiment" box and a TensorBoard hint pointing at Ray's temporary session directory
    instead of the run directories. Set RAY_AIR_NEW_OUTPUT=1 yourself to get Ray's output back."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


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


def session_log_dir() -> str | None:
    """The log directory of the embedded Ray this process started (worker logs live there), else None.

    Taken from what `ray.init` returned for this instance, not from /tmp/ray/session_latest, which names
    whichever Ray session started last on the host (another user's or another run's on a shared machine).
    """
    d = _EMBEDDED["session_dir"]
    return os.path.join(d, "logs") if d else None


def _write_private_token() -> Path:
    """Generate a token for this instance in a new 0700 directory, file mode 0600; removed at exit.

    `O_EXCL` with mode 0600 at creation, so the token is never readable by others, not even briefly.
    """
    d = Path(tempfile.mkdtemp(prefix="psamf-ray-auth-"))  # mkdtemp: mode 0700, owned by us
    atexit.register(shutil.rmtree, d, True)
    path = d / "auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def _configure_auth() -> str:
    """Token auth with a fresh private token unless the user chose a mode; returns the mode in force.

    RAY_AUTH_MODE is left unset on purpose: Ray reads it into its cached config when it is imported, and with
    it unset `ray.init` of a new local cluster (Ray >= 2.59) switches token mode on itself, refreshes that
    config and exports RAY_AUTH_MODE=token to its processes. It takes the token from RAY_AUTH_TOKEN_PATH.
    """
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:  # explicit choice (tests pin "disabled"; a user may bring their own token)
        return mode
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(_write_private_token())
    # Ray's "token authentication is enabled, set RAY_AUTH_MODE=disabled to opt out" is our choice, not news.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return "token"


def _require_loopback(what: str, host: str) -> None:
    if host not in (LOOPBACK, "localhost", "::1"):
        raise RuntimeError(
            f"the embedded Ray would bind to {host} ({what}), not {LOOPBACK}: Ray was imported before psamf "
            f"could set {SINGLE_NODE_ENV}=0. Set {SINGLE_NODE_ENV}=0 in the environment, or import psamf "
            "before ray, or start Ray yourself and set RAY_ADDRESS.")


def embedded_cpus(cpus: float) -> int:
    """The embedded Ray's logical CPUs for work that reserves `cpus`: at least that plus two (room for Ray Data's
    tasks beside the workers: the CPU-starvation hang), at least 4, and at least the machine's cores."""
    return max(4, math.ceil(cpus) + 2, os.cpu_count() or 1)


def _start_embedded(cpus: float) -> None:
    """Start the loopback-only, token-protected embedded Ray (see the module docstring)."""
    import ray

    _require_loopback("node IP before start", ray.util.get_node_ip_address())
    auth = _configure_auth()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    n = embedded_cpus(cpus)
    quiet_logs = os.environ.get("PSAMF_RAY_LOGS", "0") != "1"
    if quiet_logs:
        _quiet_driver()
    ctx = ray.init(address="local", _node_ip_address=LOOPBACK, num_cpus=n, include_dashboard=False,
                   log_to_driver=not quiet_logs, logging_level=logging.WARNING if quiet_logs else logging.INFO,
                   object_store_memory=min(2 * 1024**3, max(200 * 1024**2, _mem_bytes() // 10)))
    gcs_host = ray.get_runtime_context().gcs_address.rsplit(":", 1)[0]
    if gcs_host != LOOPBACK:
        ray.shutdown()
        _require_loopback("GCS address", gcs_host)
    _EMBEDDED.update(started=True, quiet=quiet_logs, session_dir=ctx.address_info.get("session_dir"))
    log.info("started an embedded local Ray on %s (%d logical CPUs, auth %s)%s", LOOPBACK, n, auth,
             f"; worker logs in {session_log_dir()} (PSAMF_RAY_LOGS=1 streams them)" if quiet_logs else "")


def init_ray(cpus: float = 2) -> None:
    """Start or join Ray, unless already initialised (see the module docstring). `cpus`: what the work about to
    run reserves (workers x CPUs per worker); an embedded Ray gets at least that plus two logical CPUs."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        _start_embedded(cpus)
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if not sys.stderr.isatty():
        from ray.util.debug import log_once

        log_once("ray_data_progress_manager_disabled")  # we turned the bars off on purpose: skip Ray Data's warning


def reclaim_orphaned_placement_groups() -> int:
    """Remove placement groups whose creating actor is dead. Returns how many were removed.

    Why: a Tune trial stopped early (ASHA) is killed together with the Ray Train controller it owns; the
    controller's worker placement group is job-scoped in Ray, so it outlives the controller. Ray Train 2.60 has a
    `PlacementGroupCleaner` for this, but it asks the state API (served by the dashboard) whether the controller is
    alive, and psamf's embedded Ray runs without a dashboard: the placement group stays and, on a small machine,
    reserves the CPUs the next trial needs, so the search hangs (seen here with 4 logical CPUs; cf. Ray issue
    #54305). Only placement groups created by an actor (not by a driver), not detached, whose creator the GCS
    reports dead, are removed: nothing alive can still use them. Reads the GCS table through Ray's private
    accessor (Ray is pinned to 2.60.*); any failure is logged and ignored.
    """
    import ray

    if not ray.is_initialized():
        return 0
    try:
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        accessor = ray._private.state.state._global_state_accessor
        removed = 0
        for raw in accessor.get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            creator = pg.creator_actor_id
            if (pg.state != gcs_pb2.PlacementGroupTableData.CREATED or pg.is_detached or not pg.creator_actor_dead
                    or not creator or set(creator) == {0xFF}):
                continue
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
        if removed:
            log.info("removed %d placement group(s) left by stopped Ray Train runs", removed)
        return removed
    except Exception as e:  # noqa: BLE001 - a best-effort cleanup must never fail the caller
        log.debug("could not reclaim orphaned placement groups: %s", e)
        return 0


def placement_group_reclaimer(interval_s: float = 2.0):
    """A Ray Tune callback that runs `reclaim_orphaned_placement_groups` at most every `interval_s` seconds of the
    Tune loop and after every trial ends (psamf's searches and study grids use it)."""
    import time

    from ray.tune import Callback

    class _Reclaimer(Callback):
        def __init__(self) -> None:
            self.last = 0.0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            now = time.monotonic()
            if now - self.last >= interval_s:
                self.last = now
                reclaim_orphaned_placement_groups()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            reclaim_orphaned_placement_groups()

    return _Reclaimer()


# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default 2 s), and only a
# poll registers what a worker reported. psamf's workers wait for each epoch's report to be registered (so a worker
# that dies right after it cannot lose the checkpoint), so with the default every epoch ends on the controller's
# 2-second clock, and the controller sees the end of a run or a dead worker up to 2 s late. Ray reads the variable in
# the process that calls `fit()` and passes it on to the controller it starts (docs/benchmarks.md, "The controller's
# poll interval").
POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_POLL_S = 0.25


def poll_interval(configured: float = DEFAULT_POLL_S) -> float:
    """The poll interval a `fit()` gets: `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S` when the user set it, else `configured`
    (`run.controller_poll_s`)."""
    raw = os.environ.get(POLL_ENV)
    if raw is None:
        return configured
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{POLL_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{POLL_ENV}={raw!r} must be > 0 seconds")
    return value


_POLL_LOCK = threading.Lock()
_POLL_STATE = {"active": 0, "ours": False}  # fits in progress in this process; whether we set the variable


class Interrupted(Exception):
    """Ctrl+C or a stop signal ended a command's work part-way; what it had written stays valid (checkpoints,
    finished runs). The command line answers it with one line and exit status 130."""


def fit_trainer(trainer: Any, poll_s: float = DEFAULT_POLL_S, *, what: str = "the run") -> Any:
    """`trainer.fit()` with its Ray Train controller polling the workers every `poll_s` seconds (unless the user set
    `RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`, which wins). The variable is set only while fits run, which is when Ray
    reads it, and this process's environment is left as it was; fits that overlap in threads share the first one's
    value.

    Ctrl+C: in the main thread Ray Train's own SIGINT handler aborts the run and then ends `fit()` with `sys.exit`
    (and Ray's SIGTERM handler with `sys.exit(15)`), with its log line hidden by the quiet console; that, and a
    KeyboardInterrupt in local mode, become `Interrupted` naming `what`."""
    with _POLL_LOCK:
        if _POLL_STATE["active"] == 0:
            _POLL_STATE["ours"] = POLL_ENV not in os.environ
            if _POLL_STATE["ours"]:
                os.environ[POLL_ENV] = repr(float(poll_s))
            else:
                poll_interval()  # a bad user value fails here, with its name, not inside Ray's controller
        _POLL_STATE["active"] += 1
    try:
        return trainer.fit()
    except (SystemExit, KeyboardInterrupt):
        if threading.current_thread() is not threading.main_thread():
            raise
        raise Interrupted(f"{what} was interrupted (Ctrl+C or a stop signal); the checkpoints it wrote are kept, "
                          "and the same command resumes it from the latest one") from None
    finally:
        with _POLL_LOCK:
            _POLL_STATE["active"] -= 1
            if _POLL_STATE["active"] == 0 and _POLL_STATE["ours"]:
                os.environ.pop(POLL_ENV, None)
