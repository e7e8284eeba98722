"""The XNNPACK operators a .pte's delegates run on this CPU, named by XNNPACK itself, from one traced
decode call (ExecuTorch's event tracer, ETDump, read back with the deserializer the wheel ships).

XNNPACK chooses a fully-connected kernel per linear when the program loads, from the CPU's
features and the weights' layout, and names the operator it created after it. For the INT4
linears: `Fully Connected (NC, QP8, F32, QB4W)` is KleidiAI's path (Arm CPUs with the dot-product
or i8mm extensions, when ExecuTorch was built with KleidiAI, as its aarch64 wheel is),
`(NC, QD8, F32, QB4W)` / `(NC, QDU8, F32, QB4W)` XNNPACK's generic dynamically quantized one.
Emulation cannot time a kernel, but it does show which one the device's runtime picks.
"""

from __future__ import annotations

import re
import tempfile
from collections import Counter
from pathlib import Path

FULLY_CONNECTED = "Fully Connected"
KLEIDIAI = "QP8"  # the packed dynamically quantized LHS only KleidiAI's kernels take


def operator_kind(name: str) -> str:
    """'Fully Connected (NC, QD8, F32, QB4W) GEMM #12' -> 'Fully Connected (NC, QD8, F32, QB4W) GEMM'."""
    return re.sub(r" #\d+$", "", name)


def layout(kind: str) -> list[str]:
    """The layout and data types an operator's name gives: '... (NC, QD8, F32, QB4W) GEMM' ->
    ['NC', 'QD8', 'F32', 'QB4W']."""
    found = re.search(r"\(([^)]*)\)", kind)
    return [part.strip() for part in found.group(1).split(",")] if found else []


def load_traced(pte_path: Path):
    """The .pte loaded by the pybindings with ETDump on (and the LLM custom ops registered), its
    pages mapped as PteDecoder maps them."""
    from gemma_edge.device.bindings import runtime
    from gemma_edge.device.page_locks import unlock_program_pages

    unlock_program_pages()
    return runtime()._load_for_executorch(str(pte_path), enable_etdump=True)


def traced_decode_call(pte_path: Path) -> tuple[str, Counter]:
    """One prefill call and one decode call of `pte_path` with ETDump on; the decode call's XNNPACK
    operators by kind, and the method that decoded."""
    import torch
    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc

    from gemma_edge.device.runtime import DECODE_METHOD

    module = load_traced(pte_path)
    method = DECODE_METHOD if DECODE_METHOD in module.method_names() else "forward"
    module.run_method("forward", (torch.tensor([[2, 5]], dtype=torch.long), torch.arange(2, dtype=torch.long)))
    module.run_method(method, (torch.tensor([[7]], dtype=torch.long), torch.tensor([2], dtype=torch.long)))
    with tempfile.TemporaryDirectory(prefix="etdump-") as scratch:
        path = Path(scratch, "decode.etdp")
        module.write_etdump_result_to_file(str(path))
        etdump = deserialize_from_etdump_flatcc(path.read_bytes())
    # One block of events per method call, in call order: the last is the decode call. XNNPACK's
    # operators are the events that carry a delegate's name for themselves.
    last = etdump.run_data[-1]
    kinds = Counter(
        operator_kind(event.profile_event.delegate_debug_id_str)
        for event in last.events or []
        if event.profile_event and event.profile_event.delegate_debug_id_str
    )
    return method, kinds


def fully_connected_paths(pte_path: Path) -> dict:
    """The fully-connected operators of one decode call by kind, and whether KleidiAI's kernels run
    any of them (`kleidiai`); `traced: false` with the reason where the runtime records no
    operators (a build without XNNPACK's profiler)."""
    method, kinds = traced_decode_call(pte_path)
    fully_connected = {kind: count for kind, count in sorted(kinds.items()) if kind.startswith(FULLY_CONNECTED)}
    if not kinds:
        return {"traced": False, "reason": "the runtime's event tracer recorded no XNNPACK operators", "method": method}
    return {
        "traced": True,
        "method": method,
        "fully_connected": fully_connected,
        "kleidiai": any(KLEIDIAI in layout(kind) for kind in fully_connected),
        "xnnpack_operators": sum(kinds.values()),
    }
