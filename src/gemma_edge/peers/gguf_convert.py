"""GGUF for llama.cpp: its own converter (convert_hf_to_gguf.py) on the checkpoint the workflow
downloaded, then llama.cpp's quantizer."""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from gemma_edge.device.files import atomic_output, read_json
from gemma_edge.workflow.manifest import package_versions

log = logging.getLogger(__name__)

GGUF_TYPES = {"q4_0": 2, "q4_k_m": 15, "q8_0": 7, "f16": 1}  # llama_ftype values (llama.h)


def convert_to_gguf(converter: Path, checkpoint_manifest: Path, gguf_type: str, threads: int, out: Path) -> dict:
    """Write `out` (GGUF at `gguf_type`) from the checkpoint the workflow downloaded."""
    converter = Path(converter)
    if not converter.is_file():
        raise FileNotFoundError(
            f"llama.cpp's converter is not at {converter}: run bench/setup-llamacpp.sh once (it builds "
            "llama-cpp-python from source and unpacks its convert_hf_to_gguf.py)"
        )
    checkpoint = read_json(checkpoint_manifest)
    with tempfile.TemporaryDirectory(dir=Path(out).parent, prefix=".gguf-") as scratch:
        f32 = Path(scratch) / "model-f32.gguf"
        command = [sys.executable, str(converter), checkpoint["path"], "--outtype", "f32", "--outfile", str(f32)]
        log.info("converting: %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True)
        log.info("converter output:\n%s", done.stdout[-4000:] + done.stderr[-8000:])
        if done.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
        with atomic_output(out) as tmp:
            quantize_gguf(f32, tmp, gguf_type, threads)
    # The converter by name and release, not by path: manifests never name this checkout.
    return {
        "gguf_type": gguf_type,
        "converter": converter.name,
        "checkpoint_commit": checkpoint.get("commit"),
        "llama_cpp_python": package_versions(("llama_cpp_python",))["llama_cpp_python"],
    }


def quantize_gguf(source: Path, out: Path, gguf_type: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_TYPES[gguf_type]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama_model_quantize to {gguf_type} failed with status {status}")
