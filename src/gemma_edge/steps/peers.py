"""The peers' steps, one function per rule: llama.cpp's GGUF and llama-bench for a device,
LiteRT-LM's .litertlm and its runtime for a device."""

from __future__ import annotations

import logging
from pathlib import Path

from gemma_edge.device.files import read_json
from gemma_edge.model import hub
from gemma_edge.workflow.manifest import write_manifest

log = logging.getLogger(__name__)


def gguf(converter: Path, checkpoint_manifest: Path, gguf_type: str, threads: int, out: Path, out_manifest: Path) -> dict:
    """llama.cpp's own converter on the downloaded checkpoint, then llama.cpp's quantizer."""
    from gemma_edge.peers.gguf_convert import convert_to_gguf

    hub.verify_checkpoint(read_json(checkpoint_manifest))
    facts = convert_to_gguf(Path(converter), Path(checkpoint_manifest), gguf_type, threads, Path(out))
    manifest = write_manifest(
        out,
        {"checkpoint": checkpoint_manifest},
        {"gguf_type": gguf_type},
        {"converter": facts["converter"]},
        manifest=out_manifest,
    )
    log.info("GGUF %s: %.1f MB", gguf_type, manifest["size_bytes"] / 1e6)
    return manifest


def llama_bench(sdist: Path, version: str, device_record: Path, out_dir: Path, out_record: Path) -> dict:
    """llama-bench built for the device's CPU (or the reason it cannot be)."""
    from gemma_edge.peers.llamacpp_build import build_for_device

    return build_for_device(Path(sdist), version, read_json(device_record), Path(out_dir), Path(out_record))


def litert_model(python: Path, checkpoint_manifest: Path, out: Path, recipe: str, max_seq_len: int) -> None:
    """The checkpoint as a .litertlm, converted by LiteRT-LM's own converter in its virtualenv."""
    from gemma_edge.peers import litert

    litert.convert_in(litert.converter_python(Path(python)), Path(checkpoint_manifest), Path(out), recipe, max_seq_len)


def litert_runtime(requirements: Path, device_record: Path, out_wheel: Path, out_record: Path) -> dict:
    """LiteRT-LM's runtime wheel for the device's platform (or the reason there is none)."""
    from gemma_edge.peers.litert_runtime import runtime_for_device

    return runtime_for_device(Path(requirements), read_json(device_record), Path(out_wheel), Path(out_record))
