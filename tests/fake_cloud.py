"""Ray's fake multi-node provider, plus the one thing a cloud does that it does not: report a lost machine.

When a cloud VM dies (a spot preemption, a hardware fault), the provider stops listing it, so the autoscaler
replaces it. Ray's `FakeMultiNodeProvider` keeps listing a node whose raylet was killed, and the v1 autoscaler then
counts it as a node still starting, forever. This subclass drops a node from its list once its raylet has exited
(and kills what is left of it), which is what `tests/test_autoscaling.py` needs to rehearse a lost node. Loaded by the
autoscaler's monitor process (`provider: {type: external, module: tests.fake_cloud.FakeCloudProvider}`).
"""

from __future__ import annotations

import logging

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

log = logging.getLogger(__name__)


class FakeCloudProvider(FakeMultiNodeProvider):
    def non_terminated_nodes(self, tag_filters):
        with self.lock:
            for node_id, entry in list(self._nodes.items()):
                node = entry.get("node")  # the head's entry has none
                raylets = node.all_processes.get("raylet", []) if node is not None else []
                if raylets and all(info.process.poll() is not None for info in raylets):
                    log.warning("node %s: its raylet is gone; reporting the machine lost", node_id)
                    self._nodes.pop(node_id)
                    node.kill_all_processes(check_alive=False, allow_graceful=False)  # what is left of it
        return super().non_terminated_nodes(tag_filters)
