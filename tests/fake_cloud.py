"""Ray's fake multi-node provider, plus two things a cloud does that it does not: report a lost machine, and take
its time to boot a new one.

When a cloud VM dies (a spot preemption, a hardware fault), the provider stops listing it, so the autoscaler
replaces it. Ray's `FakeMultiNodeProvider` keeps listing a node whose raylet was killed, and the v1 autoscaler then
counts it as a node still starting, forever. This subclass drops a node from its list once its raylet has exited
(and kills what is left of it), which is what `tests/test_autoscaling.py` needs to rehearse a lost node.

A fake node is up in seconds; a cloud VM takes minutes, more when capacity is short. With `hold_launches_file` in
the provider config, a launch waits while that file exists: the autoscaler counts the node as launching (its
status shows it pending), as it would a VM that is still booting. The test that rehearses an elastic run holds the
replacement of a lost node back this way until the run has trained on fewer workers.

Loaded by the autoscaler's monitor process (`provider: {type: external, module: tests.fake_cloud.FakeCloudProvider}`).
"""

from __future__ import annotations

import logging
import os
import time

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

log = logging.getLogger(__name__)


class FakeCloudProvider(FakeMultiNodeProvider):
    MAX_HOLD_S = 900  # a forgotten hold file must not hang the autoscaler's launcher for ever

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # runs in the autoscaler's launcher thread, outside the provider's lock: the autoscaler's updates go on
        hold = self.provider_config.get("hold_launches_file")
        start = time.monotonic()
        if hold and os.path.exists(hold):
            log.warning("launch held back while %s exists (a cloud that is slow to boot a VM)", hold)
            while os.path.exists(hold) and time.monotonic() - start < self.MAX_HOLD_S:
                time.sleep(0.5)
        return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)

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
