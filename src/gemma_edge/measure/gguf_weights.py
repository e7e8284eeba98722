"""Weight bytes per token of a GGUF, from its tensor table, read with llama.cpp's own reader
(`gguf`'s GGUFReader, which maps the file: only the header is read)."""

from __future__ import annotations

from pathlib import Path

from gemma_edge.measure.weight_parts import attributed


def read_gguf_tensors(path: Path) -> tuple[list[dict], dict]:
    """The tensor table of a GGUF (name, dims in ggml order: dims[0] is a row's length, type,
    bytes, offset in the file) and where its tensor data starts; ValueError if it is not one."""
    # Imported here: only the steps that read a GGUF (envs/perf.yaml, envs/deploy.yaml) install it.
    from gguf import GGML_QUANT_SIZES, GGUFReader

    try:
        reader = GGUFReader(str(path))
    except (ValueError, KeyError, IndexError) as error:  # a bad magic, type or truncated header
        raise ValueError(f"{path} is not a readable GGUF file: {error}") from error
    tensors = []
    for tensor in reader.tensors:
        block, block_bytes = GGML_QUANT_SIZES[tensor.tensor_type]
        dims = [int(d) for d in tensor.shape]
        tensors.append(
            {
                "name": tensor.name,
                "dims": dims,
                "type": tensor.tensor_type.name,
                "offset": int(tensor.data_offset),
                "bytes": int(tensor.n_bytes),
                "row_bytes": dims[0] // block * block_bytes,
            }
        )
    return tensors, {"data_offset": int(reader.data_offset)}


def gguf_weight_bytes(path: Path) -> dict:
    """Bytes a decode step of the GGUF reads, by part: `lm_head` (`output.weight`, or the token
    table `token_embd.weight` when the output is tied to it: read whole for the logits),
    `embedding_rows` (one row of `token_embd` and of `per_layer_token_embd`), `linear_weights` (every
    other tensor of two or more dimensions) and `other_constants` (norms and other vectors)."""
    tensors, metadata = read_gguf_tensors(path)
    names = {t["name"] for t in tensors}
    tied = "output.weight" not in names
    parts = {"linear_weights": 0, "lm_head": 0, "embedding_rows": 0, "other_constants": 0}
    tables = []
    for tensor in tensors:
        if tensor["name"] in ("token_embd.weight", "per_layer_token_embd.weight"):
            parts["embedding_rows"] += tensor["row_bytes"]
            tables.append(
                {
                    "name": tensor["name"],
                    "type": tensor["type"],
                    "dims": tensor["dims"],
                    "bytes": tensor["bytes"],
                    "row_bytes": tensor["row_bytes"],
                }
            )
            if tensor["name"] == "token_embd.weight" and tied:
                parts["lm_head"] += tensor["bytes"]
        elif tensor["name"] == "output.weight":
            parts["lm_head"] += tensor["bytes"]
        elif sum(d > 1 for d in tensor["dims"]) >= 2:
            parts["linear_weights"] += tensor["bytes"]
        else:
            parts["other_constants"] += tensor["bytes"]
    weights = sum(t["bytes"] for t in tensors)
    file_size = Path(path).stat().st_size
    file = {
        "size_bytes": file_size,
        "weights_bytes": weights,
        "header_bytes": metadata["data_offset"],
        # alignment padding between the tensors and after the last one
        "padding_bytes": file_size - metadata["data_offset"] - weights,
    }
    return attributed(
        "gguf",
        parts,
        tables,
        file,
        "token_embd and per_layer_token_embd one row per token; the lm_head (output.weight, or token_embd "
        "whole when tied) read whole; every other tensor whole; KV cache excluded",
        tied_output=tied,
        types=sorted({t["type"] for t in tensors}),
    )
