"""Bytes of weights a decoded token reads, from the artifacts' own tensors: the `.pte`'s segments,
the GGUF's tensor table and the `.litertlm`'s TFLite sections.

One decode step reads every linear weight whole (with its quantization scales), the lm_head whole
(the logits of every vocabulary entry), but only one row of each embedding table: the token
embedding and Gemma 4's per-layer input embeddings (2.35 B of E2B's parameters), looked up by the
token id. The KV cache and activations are not weights and are not counted (at a 64-token context
E2B's cache read is under a megabyte). Every byte of the file is attributed to exactly one part,
so the parts add up to the file's size.

Runs on the host (the .pte needs executorch's deserializer and its bundled flatc; the .litertlm
only the `flatbuffers` runtime, litertlm_file); the device benchmark receives the numbers in its spec.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gemma_edge.measure.gguf_weights import gguf_weight_bytes
from gemma_edge.measure.litertlm_weights import litertlm_weight_bytes
from gemma_edge.measure.pte_weights import pte_weight_bytes

log = logging.getLogger(__name__)


def weight_bytes(path: Path) -> dict | None:
    """pte_weight_bytes, gguf_weight_bytes or litertlm_weight_bytes, by the file's suffix; None
    for other formats."""
    if str(path).endswith(".pte"):
        return pte_weight_bytes(Path(path))
    if str(path).endswith(".gguf"):
        return gguf_weight_bytes(Path(path))
    if str(path).endswith(".litertlm"):
        return litertlm_weight_bytes(Path(path))
    return None


def readable_weight_bytes(path: Path) -> dict | None:
    """weight_bytes(path), or None (and a warning) for a file it cannot attribute: the fraction is
    then left out, and the deploy or benchmark goes on."""
    try:
        return weight_bytes(path)
    except (ValueError, OSError) as error:
        log.warning("weight bytes per token of %s not counted: %s", path, error)
        return None
