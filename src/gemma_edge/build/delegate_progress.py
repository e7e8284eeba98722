"""A log line per XNNPACK delegate while lowering preprocesses it: which one, of how many.

Lowering E2B's 35 layers takes 15 to 30 minutes, nearly all of it in XNNPACK's per-delegate
preprocessing. ExecuTorch logs nothing there, so its step log (and the terminal's progress line,
`gemma_edge.workflow.progress`) would show one line for the whole wait. ExecuTorch has no progress
callback: the partitioner is subclassed to count the delegates it tags, and XnnpackBackend's
`preprocess` (a public static method, the one ExecuTorch calls per delegate) is wrapped while the
block runs. tests/test_lower.py pins both on the installed ExecuTorch.
"""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger(__name__)


@contextlib.contextmanager
def counted_xnnpack_partitioner(per_op_mode: bool):
    """An XnnpackPartitioner whose delegates are logged as XNNPACK preprocesses them."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend

    count = {"tagged": 0, "done": 0}
    started = time.monotonic()

    class CountingPartitioner(XnnpackPartitioner):
        def partition(self, exported_program):
            result = super().partition(exported_program)
            count["tagged"] += len(result.partition_tags)
            log.info("XNNPACK: %d delegates tagged so far", count["tagged"])
            return result

    original = XnnpackBackend.__dict__["preprocess"]

    def preprocess(edge_program, compile_specs):
        count["done"] += 1
        log.info("XNNPACK delegate %d of %d (%.0f s into lowering)", count["done"], count["tagged"], time.monotonic() - started)
        return original.__func__(edge_program, compile_specs)

    XnnpackBackend.preprocess = staticmethod(preprocess)
    try:
        yield CountingPartitioner(per_op_mode=per_op_mode)
    finally:
        XnnpackBackend.preprocess = original
