"""torch.export of the KV-cache decoder, saved safely and verified by reloading."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .artifacts import ArtifactError, atomic_output
from .decoder import KVCacheDecoder, dynamic_shapes, example_inputs

log = logging.getLogger(__name__)


def export_decoder(model: torch.nn.Module, max_seq_len: int) -> torch.export.ExportedProgram:
    """Export `model` wrapped with an in-graph KV cache, with a dynamic number of tokens per call."""
    decoder = KVCacheDecoder(model, max_seq_len).eval()
    with torch.no_grad():
        program = torch.export.export(
            decoder, example_inputs(), dynamic_shapes=dynamic_shapes(max_seq_len), strict=False
        )
    buffers = cache_buffers(program)
    if len(buffers) != 3 * len(decoder.cache.layers):
        raise RuntimeError("the KV cache is not held as module buffers in the exported program (lifted as constants?)")
    log.info("exported: %d graph nodes, %d KV-cache buffers", len(program.graph.nodes), len(buffers))
    return program


def cache_buffers(program: torch.export.ExportedProgram) -> list[str]:
    """The KV-cache tensors the program holds as (mutable) buffers rather than lifted constants."""
    return [name for name in program.graph_signature.buffers if name.startswith("cache_")]


def save_program(program: torch.export.ExportedProgram, path: Path) -> None:
    """Save through an open file handle, then reload and compare before the file is put in place.

    Given a pathlib.Path, torch.export.save once wrote truncated zips for programs over 2 GB and
    reported success; an open handle avoids that path, and the reload proves the file is whole.
    """
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.export.save(program, handle)
        reloaded = torch.export.load(str(tmp))
        check_same_program(program, reloaded, tmp)


def check_same_program(expected, actual, where) -> None:
    if str(expected.graph_module.code) != str(actual.graph_module.code):
        raise ArtifactError(f"{where}: the reloaded program's graph differs from the one saved")
    for kind in ("state_dict", "constants"):
        want, got = getattr(expected, kind), getattr(actual, kind)
        if want.keys() != got.keys():
            raise ArtifactError(f"{where}: the reloaded program's {kind} keys differ from the ones saved")
        for name, tensor in want.items():
            if isinstance(tensor, torch.Tensor) and not _same_tensor(tensor, got[name]):
                raise ArtifactError(f"{where}: tensor {name} differs after reloading")


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(a) or is_traceable_wrapper_subclass(b):
        if type(a) is not type(b):
            return False
        inner_a, _ = a.__tensor_flatten__()
        inner_b, _ = b.__tensor_flatten__()
        return inner_a == inner_b and all(_same_tensor(getattr(a, n), getattr(b, n)) for n in inner_a)
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)


def register_quantized_ops() -> None:
    """Quantized programs call torchao and quantized_decomposed ops; deserialising needs them defined."""
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401
    import torchao.quantization  # noqa: F401


def load_program(path: Path) -> torch.export.ExportedProgram:
    register_quantized_ops()
    try:
        return torch.export.load(str(path))
    except Exception as error:  # noqa: BLE001 - torch raises several types for a damaged zip
        raise ArtifactError(f"{path} is not a loadable exported program ({error}); re-run the export") from error


def max_abs_diff_on_prompt(program, model, max_seq_len: int, prompt_len: int = 6) -> float:
    """Logits difference between the exported program and eager, prefill then one decode step."""
    tokens = torch.arange(3, 3 + prompt_len, dtype=torch.long).unsqueeze(0)
    positions = torch.arange(prompt_len, dtype=torch.long)
    exported = program.module()
    eager = KVCacheDecoder(model, max_seq_len).eval()
    initial = {name: buffer.clone() for name, buffer in exported.named_buffers()}
    with torch.no_grad():
        worst = (exported(tokens, positions) - eager(tokens, positions)).abs().max().item()
        step = torch.tensor([[5]]), torch.tensor([prompt_len])
        worst = max(worst, (exported(*step) - eager(*step)).abs().max().item())
        for name, buffer in exported.named_buffers():  # leave the program's cache as exported
            buffer.copy_(initial[name])
    return worst
