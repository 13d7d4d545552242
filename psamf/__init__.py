"""psamf: PSA-MF (Personality-Sentiment Aligned Multi-Level Fusion) trained and tuned on Ray."""

__version__ = "0.1.0"

import os as _os

if not _os.environ.get("RAY_ADDRESS"):
    # Before anything imports ray (Ray reads it at import): keep the embedded Ray's 127.0.0.1 node IP, so that
    # every Ray process binds to loopback only. See psamf.runtime.
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
