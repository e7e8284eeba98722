"""The shape of every weight-bytes result (pte_weights, gguf_weights, litertlm_weights): the bytes a
decoded token reads, by part, and every byte of the file accounted for."""

from __future__ import annotations


def attributed(artifact: str, parts: dict, tables: list[dict], file: dict, attribution: str, **facts) -> dict:
    """A weight_bytes result: the bytes a decoded token reads (the sum of `parts`) and by part, the
    embedding tables it reads a row of, facts of the format, and `file`, which accounts for every
    byte of the file (with the tables' whole bytes added)."""
    return {
        "artifact": artifact,
        "bytes_per_token": sum(parts.values()),
        "parts": parts,
        "embedding_tables": tables,
        **facts,
        "file": {**file, "embedding_tables_bytes": sum(t["bytes"] for t in tables)},
        "attribution": attribution,
    }
