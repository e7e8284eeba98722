"""torch.export of the KV-cache decoder, saved safely and verified by reloading."""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import os
import re
import sys
from pathlib import Path

import torch

from gemma_edge.device.files import ArtifactError
from gemma_edge.model.attention import register_executorch_llm_ops
from gemma_edge.model.decoder import KVCacheDecoder, dynamic_shapes, example_inputs, xnnpack_friendly_rmsnorm
from gemma_edge.workflow.steplog import log_memory

log = logging.getLogger(__name__)


def export_decoder(
    model: torch.nn.Module, max_seq_len: int, xnnpack_norms: bool = True, attention: str = "executorch"
) -> torch.export.ExportedProgram:
    """Export `model` wrapped with an in-graph KV cache, with a dynamic number of tokens per call.

    With `xnnpack_norms`, RMSNorms are first rewritten into ops XNNPACK delegates (this changes
    `model` itself: the drift check that follows compares against the rewritten arithmetic, and
    the verify step against a freshly loaded model). `attention` is KVCacheDecoder's."""
    if xnnpack_norms:
        log.info("RMSNorms rewritten for XNNPACK: %d", xnnpack_friendly_rmsnorm(model))
    decoder = KVCacheDecoder(model, max_seq_len, attention).eval()
    with torch.no_grad():
        program = torch.export.export(
            decoder, example_inputs(), dynamic_shapes=dynamic_shapes(decoder.tokens_per_call), strict=False
        )
    buffers = cache_buffers(program)
    if len(buffers) != len(decoder.cache_buffer_names()):
        raise RuntimeError("the KV cache is not held as module buffers in the exported program (lifted as constants?)")
    log.info(
        "exported: %d graph nodes, %d KV-cache buffers (%.1f MiB at %d positions, up to %d tokens per call%s)",
        len(program.graph.nodes),
        len(buffers),
        kv_cache_bytes_of(program) / 2**20,
        max_seq_len,
        decoder.tokens_per_call,
        f", rings of {2 * decoder.window} and windows of {decoder.window} on sliding layers" if decoder.window else "",
    )
    return program


def cache_buffers(program: torch.export.ExportedProgram) -> list[str]:
    """The KV-cache tensors the program holds as (mutable) buffers rather than lifted constants."""
    return [name for name in program.graph_signature.buffers if name.startswith("cache_")]


def _buffer_values(program: torch.export.ExportedProgram) -> dict:
    """Each buffer's fake value, from the graph's placeholders (shape and dtype, no data needed)."""
    by_input = program.graph_signature.inputs_to_buffers
    return {
        by_input[node.name]: node.meta["val"]
        for node in program.graph.nodes
        if node.op == "placeholder" and node.name in by_input
    }


def kv_cache_bytes_of(program: torch.export.ExportedProgram) -> int:
    """Bytes the program's KV cache (and ring positions) occupy: the same at any depth."""
    values = _buffer_values(program)
    return sum(values[name].numel() * values[name].element_size() for name in cache_buffers(program))


def tokens_per_call_of(program: torch.export.ExportedProgram) -> int:
    """The most tokens one call takes, read back from the program's dynamic `tokens` shape."""
    tokens = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name == "tokens"), None)
    if tokens is None or not isinstance(tokens.meta["val"].shape[1], torch.SymInt):
        raise ValueError("the program takes no dynamic `tokens` input: was it made by the export step?")
    return int(program.range_constraints[tokens.meta["val"].shape[1].node.expr].upper)


def context_length_of(program: torch.export.ExportedProgram) -> int:
    """max_seq_len: the positions a full-attention layer's cache holds.

    Without ring buffers a call takes up to max_seq_len - 1 tokens; with them, the full-length
    caches (`cache_keys_N`, laid out [1, positions, heads, dim]) say it."""
    values = _buffer_values(program)
    if not any(name.startswith("cache_ring_") for name in values):
        return tokens_per_call_of(program) + 1
    return int(next(v.shape[1] for name, v in values.items() if name.startswith("cache_keys_")))


def write_program(program: torch.export.ExportedProgram, path: Path) -> dict:
    """torch.export.save through an open file handle; returns what a reload must reproduce.

    Given a pathlib.Path, torch.export.save once wrote truncated zips for programs over 2 GB and
    reported success; an open handle avoids that path, and `check_reloaded` proves the file whole.
    Call both inside `atomic_output`, dropping every reference to the program in between, so that
    only one copy of the weights is in memory at a time.
    """
    normalise_metadata(program)
    with open(path, "wb") as handle:
        sink = _WriteErrorHeldBack(handle)
        torch.export.save(program, sink)
        if sink.error is not None:
            raise sink.error  # a full disk: atomic_output names the folder and its free space
    log_memory("torch.export.save")
    return program_fingerprint(program)


class _WriteErrorHeldBack(io.RawIOBase):
    """The file torch.export.save writes to, holding back the first OSError (a full disk) until it
    returns. Raised into torch's zip writer, the error leaves that writer inconsistent, and freeing
    it later aborts the whole process (std::terminate in ~PyTorchStreamWriter), so the step could
    not say what happened."""

    def __init__(self, handle):
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.handle.seekable()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.handle.seek(offset, whence)

    def tell(self) -> int:
        return self.handle.tell()

    def write(self, data) -> int:
        if self.error is None:
            try:
                self.handle.write(data)
            except OSError as error:
                self.error = error
        return memoryview(data).nbytes


def saved_bytes(program: torch.export.ExportedProgram) -> int:
    """The bytes of the program's tensors (weights, KV cache, constants), which torch.export.save
    writes in full: the least its file takes (the graph adds the rest: a fifth of the demo's FP32
    program, two thirds of its INT4 one)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    def size(tensor: torch.Tensor) -> int:
        if is_traceable_wrapper_subclass(tensor):
            inner, _ = tensor.__tensor_flatten__()
            return sum(size(getattr(tensor, name)) for name in inner)
        return tensor.numel() * tensor.element_size()

    tensors = [*program.state_dict.values(), *program.constants.values()]
    return sum(size(tensor) for tensor in tensors if isinstance(tensor, torch.Tensor))


# ---- the same program, the same bytes ---------------------------------------------------------

_TRACE_FILE = re.compile(r'File "([^"]+)"')


def normalise_metadata(program: torch.export.ExportedProgram) -> None:
    """Make what torch.export.save writes depend on the program alone, not on where or in which
    process it was made. Two per-node metadata fields torch serialises otherwise differ between
    identical runs (the archive's `.data/serialization_id` is a hash of the records, so it follows):

    - `stack_trace` names absolute source files (this checkout, the virtualenv's site-packages):
      each becomes relative to the import root it was found under (`gemma_edge/model/decoder.py`,
      `transformers/models/gemma4/modeling_gemma4.py`), or its bare name if under none.
    - `from_node` (provenance, written after a re-export such as the quantize step's) records each
      source graph by `id(graph)`, a memory address: the ids are renumbered 1, 2, … in order of
      first appearance. Only their equality carries meaning (ExecuTorch's debug handles group nodes
      by it), and renumbering keeps it.
    """
    from torch.fx.traceback import NodeSource

    roots = _import_roots()
    sources: dict[int, NodeSource] = {}  # unique NodeSource objects, in graph order

    def collect(items) -> None:
        for source in items or ():
            if isinstance(source, NodeSource) and id(source) not in sources:
                sources[id(source)] = source
                collect(source.from_node)

    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if trace := node.meta.get("stack_trace"):
                node.meta["stack_trace"] = relative_stack_trace(trace, roots)
            collect(node.meta.get("from_node"))
    renumbered: dict[int, int] = {}
    for source in sources.values():
        if source.node_info is not None:
            source.node_info.graph_id = renumbered.setdefault(source.node_info.graph_id, len(renumbered) + 1)
        source._dict = None  # NodeSource caches its serialised form


def _import_roots() -> list[str]:
    """Folders modules are imported from (this package's parent and sys.path), longest first, each
    both as given and with symlinks resolved."""
    roots = {str(Path(__file__).resolve().parents[2])}
    for entry in sys.path:
        if entry and os.path.isabs(entry) and os.path.isdir(entry):
            roots.update({os.path.normpath(entry), os.path.realpath(entry)})
    return sorted(roots, key=len, reverse=True)


def relative_stack_trace(trace: str, roots: list[str]) -> str:
    def relative(match: re.Match) -> str:
        path = match.group(1)
        if not os.path.isabs(path):
            return match.group(0)
        root = next((r for r in roots if path.startswith(r.rstrip(os.sep) + os.sep)), None)
        return f'File "{os.path.relpath(path, root) if root else os.path.basename(path)}"'

    return _TRACE_FILE.sub(relative, trace)


def check_reloaded(path: Path, fingerprint: dict) -> None:
    """Reload `path` and compare its graph and every tensor with the fingerprint taken at saving."""
    gc.collect()  # the caller has dropped the in-memory program: free it before loading the copy
    reloaded = load_program(path)
    log_memory("reloading the saved program")
    actual = program_fingerprint(reloaded)
    if actual["graph"] != fingerprint["graph"]:
        raise ArtifactError(f"{path}: the reloaded program's graph differs from the one saved")
    for kind in ("state_dict", "constants"):
        want, got = fingerprint[kind], actual[kind]
        if want.keys() != got.keys():
            raise ArtifactError(f"{path}: the reloaded program's {kind} keys differ from the ones saved")
        for name in want:
            if want[name] != got[name]:
                raise ArtifactError(f"{path}: tensor {name} differs after reloading")


def program_fingerprint(program: torch.export.ExportedProgram) -> dict:
    """The graph's code and, per tensor, its type, shape, dtype and the sha256 of its bytes."""
    return {
        "graph": str(program.graph_module.code),
        "state_dict": {n: tensor_digest(t) for n, t in program.state_dict.items() if isinstance(t, torch.Tensor)},
        "constants": {n: tensor_digest(t) for n, t in program.constants.items() if isinstance(t, torch.Tensor)},
    }


def tensor_digest(tensor: torch.Tensor):
    """Comparable summary of a tensor; torchao's tensor subclasses are summarised part by part."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(tensor):
        inner, _ = tensor.__tensor_flatten__()
        return [type(tensor).__name__, {n: tensor_digest(getattr(tensor, n)) for n in inner}]
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return [list(tensor.shape), str(tensor.dtype), hashlib.sha256(memoryview(data)).hexdigest()]


def register_program_ops() -> None:
    """Programs call ExecuTorch's LLM ops, and once quantized torchao's and quantized_decomposed ops;
    deserialising needs them defined."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
    import torchao.quantization  # noqa: F401

    register_executorch_llm_ops()


def load_program(path: Path) -> torch.export.ExportedProgram:
    register_program_ops()
    try:
        return torch.export.load(str(path))
    except Exception as error:  # noqa: BLE001 - torch raises several types for a damaged zip
        raise ArtifactError(f"{path} is not a loadable exported program ({error}); re-run the export") from error


def max_abs_diff_on_prompt(program, model, max_seq_len: int, attention: str = "executorch", prompt_len: int = 6) -> float:
    """Logits difference between the exported program and eager, prefill then one decode step."""
    tokens = torch.arange(3, 3 + prompt_len, dtype=torch.long).unsqueeze(0)
    positions = torch.arange(prompt_len, dtype=torch.long)
    exported = program.module()
    eager = KVCacheDecoder(model, max_seq_len, attention).eval()
    initial = {name: buffer.clone() for name, buffer in exported.named_buffers()}
    with torch.no_grad():
        worst = (exported(tokens, positions) - eager(tokens, positions)).abs().max().item()
        step = torch.tensor([[5]]), torch.tensor([prompt_len])
        worst = max(worst, (exported(*step) - eager(*step)).abs().max().item())
        for name, buffer in exported.named_buffers():  # leave the program's cache as exported
            buffer.copy_(initial[name])
    return worst
