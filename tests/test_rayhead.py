"""The test helper that starts real Ray heads (tests/rayhead.py) picks ports Ray accepts."""

from __future__ import annotations

import shutil

from tests.rayhead import LocalHead, ephemeral_low


def test_the_worker_port_range_never_holds_another_port_of_the_head_nor_an_ephemeral_port():
    """Ray refuses a head whose worker-port range holds one of its other ports ("Ray component worker_ports is
    trying to use a port number ... used by other components", seen in CI): every pick must avoid them. And a
    range inside the kernel's ephemeral range lets an outgoing connection take a port Ray has just handed to a job
    driver ("Address already in use", seen in CI): every range must end below it, and above Ray's default range."""
    for _ in range(500):
        h = LocalHead()
        try:
            args = dict(a.split("=", 1) for a in h._args if a.startswith("--") and "=" in a)
            lo, hi = int(args["--min-worker-port"]), int(args["--max-worker-port"])
            others = [int(v) for k, v in args.items() if k.endswith("-port") and "worker-port" not in k]
            assert len(others) == 9 and hi - lo == 200 and 20000 <= lo and hi < ephemeral_low()
            assert not [p for p in others if lo <= p <= hi], (lo, hi, others)
        finally:
            shutil.rmtree(h.tmp)
