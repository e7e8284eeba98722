"""Convert the workflow's checkpoint to a LiteRT-LM `.litertlm` with Google's own converter.

Runs in `.venv-litert` (bench/setup-litert.sh), never in the main venv: litert-torch brings jax,
ai-edge-litert and a protobuf of its own.

    python -m gemma_edge.peers.litert convert --checkpoint results/demo/checkpoint.json \\
        --out results/demo/litert/int4-g128/model.litertlm --quantization int4 --group-size 128

The converter is `litert_torch.generative.export_hf.export` (the `litert-torch export_hf`
command): it traces a prefill and a decode signature with the KV cache as model inputs, converts
them, the token embedder and the per-layer embedder to TFLite, quantizes each with
ai-edge-quantizer, and bundles them with the tokenizer into one `.litertlm` file. The tokenizer
goes in as the checkpoint's Hugging Face `tokenizer.json` (re-saved by transformers'
`save_pretrained`, stored zlib-compressed: section type `HF_Tokenizer_Zlib`), so our locally
built tokenizer needs no conversion; a SentencePiece model is used only when a checkpoint ships
`tokenizer.model`. `python -m litert_lm_builder.litertlm_peek_main --litertlm_file=X` lists the
sections: LLM metadata (BOS/stop tokens, max_num_tokens), executor metadata (KV cache buffers),
the tokenizer, and the prefill/decode, embedder and per-layer-embedder TFLite models.

Two workarounds with litert-torch 0.10.0 and transformers 5.24.0:
- litert-torch imports `tensorflow.lite.python.schema_py_generated` without depending on
  tensorflow; `install_tensorflow_schema_shim` serves ai-edge-litert's copy of the same module
  under that name (in this process only).
- It converts only the multimodal `gemma4` layout (`Gemma4ForConditionalGeneration`): a
  `gemma4_text` checkpoint fails to load with "LiteRTGemma4TextModel does not support setting
  experts implementation". `rewrap_as_multimodal` writes the same weights as a
  `Gemma4ForConditionalGeneration` with no vision or audio tower (keys `model.` ->
  `model.language_model.`), which computes identical logits.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from gemma_edge.device.files import atomic_output, read_json
from gemma_edge.workflow.manifest import package_versions, write_manifest

log = logging.getLogger(__name__)

LITERT_PACKAGES = ("torch", "transformers", "litert-torch", "litert-lm-api", "ai-edge-litert", "ai-edge-quantizer")
QUANTIZATIONS = ("int4", "int8", "fp32")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "generation_config.json",
)


def install_tensorflow_schema_shim() -> None:
    """Make `from tensorflow.lite.python import schema_py_generated` import ai-edge-litert's copy
    of TFLite's flatbuffer schema, without tensorflow being installed. Only the three package
    names on that path are registered, and none has a `__path__`, so any other tensorflow import
    still fails as it would without the shim."""
    try:
        import tensorflow.lite.python.schema_py_generated  # noqa: F401  (real tensorflow, or shim already in)

        return
    except ImportError:
        pass
    from ai_edge_litert import schema_py_generated

    names = ("tensorflow", "tensorflow.lite", "tensorflow.lite.python")
    modules = [types.ModuleType(name) for name in names]
    for module in modules:  # a spec without origin: torch's find_spec("tensorflow") then skips it
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    for parent, child in zip(modules, modules[1:]):
        setattr(parent, child.__name__.rsplit(".", 1)[1], child)
    modules[-1].schema_py_generated = schema_py_generated
    for module in modules:
        sys.modules.setdefault(module.__name__, module)
    sys.modules.setdefault("tensorflow.lite.python.schema_py_generated", schema_py_generated)


def rewrap_as_multimodal(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Write `checkpoint_dir` (a `Gemma4ForCausalLM`, model_type `gemma4_text`) into `out_dir` as a
    `Gemma4ForConditionalGeneration` with no vision or audio config: the config nests the text
    config, and every weight `model.X` becomes `model.language_model.X`. A checkpoint already in
    the multimodal layout is returned as it is."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import Gemma4Config, Gemma4TextConfig

    checkpoint_dir = Path(checkpoint_dir)
    config = json.loads((checkpoint_dir / "config.json").read_text())
    if config.get("model_type") != "gemma4_text":
        return checkpoint_dir
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text_config = Gemma4TextConfig.from_pretrained(checkpoint_dir)
    wrapped = Gemma4Config(
        text_config=text_config.to_dict(),
        vision_config=None,
        audio_config=None,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    wrapped.architectures = ["Gemma4ForConditionalGeneration"]
    wrapped.save_pretrained(out_dir)
    for shard in sorted(checkpoint_dir.glob("*.safetensors")):
        with safe_open(shard, "pt") as reader:
            tensors = {_multimodal_key(key): reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 - safe_open has keys() but no __iter__
            metadata = reader.metadata()
        save_file(tensors, out_dir / shard.name, metadata=metadata)
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text())
        mapping["weight_map"] = {_multimodal_key(k): v for k, v in mapping["weight_map"].items()}
        (out_dir / index.name).write_text(json.dumps(mapping, indent=2))
    for name in TOKENIZER_FILES:
        if (checkpoint_dir / name).exists():
            shutil.copyfile(checkpoint_dir / name, out_dir / name)
    return out_dir


def _multimodal_key(key: str) -> str:
    return "model.language_model." + key[len("model.") :] if key.startswith("model.") else key


def linears_not_divisible(model_dir: Path, group_size: int) -> list[str]:
    """Names (last attribute) of the checkpoint's linear layers whose input width `group_size` does
    not divide: like our quantize step, they stay FP32 (ai-edge-quantizer would refuse them). The
    model is built on the meta device, so no weight is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(getattr(config, "text_config", None) or config)
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module.in_features % group_size
        }
    )


def quantization_recipe(quantization: str, group_size: int, fp32_linears: list[str] = ()) -> tuple[list | None, str]:
    """ai-edge-quantizer's recipe nearest ours, and a sentence saying what it is.

    `int4`: what the .pte uses (torchao 8da4w): INT4 weights per group of `group_size` input
    channels (ai-edge-quantizer's BLOCKWISE_<N>) in every fully connected layer, with activations
    quantized to INT8 at run time (`compute_precision: INTEGER`, XNNPACK's qd8 x qb4w kernels), and
    INT8 per-channel (per-row) embedding tables, as our `embedding_byte`. The linears named in
    `fp32_linears` (input width not a multiple of the group size) are left unquantized.
    `int8`: ai-edge-quantizer's `dynamic_wi8_afp32` (INT8 per-channel weights, dynamic INT8
    activations) for every supported op. `fp32`: no quantization."""
    if quantization == "fp32":
        return None, "none: FP32 weights and activations"
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe, recipe_manager

    if quantization == "int8":
        return (
            recipe.dynamic_wi8_afp32(),
            "ai-edge-quantizer dynamic_wi8_afp32: INT8 per-channel weights, dynamic INT8 activations",
        )
    if quantization != "int4":
        raise ValueError(f"unknown quantization {quantization!r}; expected one of {', '.join(QUANTIZATIONS)}")
    granularity = getattr(qtyping.QuantGranularity, f"BLOCKWISE_{group_size}", None)
    if granularity is None:
        raise ValueError(f"ai-edge-quantizer has no {group_size}-wide blocks (it offers 32, 64, 128 and 256)")
    fully_connected = qtyping.TFLOperationName.FULLY_CONNECTED
    manager = recipe_manager.RecipeManager()
    manager.add_dynamic_config(regex=".*", operation_name=fully_connected, num_bits=4, granularity=granularity)
    manager.add_dynamic_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.EMBEDDING_LOOKUP,
        num_bits=8,
        granularity=qtyping.QuantGranularity.CHANNELWISE,
    )
    for name in fp32_linears:  # later rules win; tensor names read "...Linear_<attribute>;..."
        manager.add_quantization_config(
            regex=f"Linear_{name}(;|$)", operation_name=fully_connected, algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE
        )
    kept = f"; FP32: {', '.join(fp32_linears)} (input width not a multiple of {group_size})" if fp32_linears else ""
    return manager.get_quantization_recipe(), (
        f"INT4 weights in blocks of {group_size} with dynamic INT8 activations for fully connected layers; "
        f"INT8 per-channel embedding tables (ai-edge-quantizer dynamic configs){kept}"
    )


def convert_checkpoint(
    checkpoint_manifest: Path,
    out: Path,
    quantization: str = "int4",
    group_size: int = 128,
    max_seq_len: int = 128,
    prefill_length: int = 64,
) -> dict:
    """Write `out` (.litertlm) from the checkpoint the workflow downloaded, and its manifest.

    `max_seq_len` is the KV cache length (litert-torch's `cache_length`); `prefill_length` the
    prefill signature's width (longer prompts are prefilled in several calls)."""
    install_tensorflow_schema_shim()
    from litert_torch.generative.export_hf import export as litert_export

    out = Path(out)
    checkpoint = read_json(checkpoint_manifest)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".litert-") as scratch:
        scratch = Path(scratch)
        model_dir = rewrap_as_multimodal(Path(checkpoint["path"]), scratch / "checkpoint")
        fp32_linears = linears_not_divisible(model_dir, group_size) if quantization == "int4" else []
        recipe, recipe_text = quantization_recipe(quantization, group_size, fp32_linears)
        recipe_arg = "none"  # None would mean litert-torch's default, dynamic_wi8_afp32
        if recipe is not None:
            recipe_arg = str(scratch / "recipe.json")
            Path(recipe_arg).write_text(json.dumps(recipe, indent=2))
        export_dir = scratch / "export"
        log.info("converting %s with litert-torch (quantization: %s)", model_dir, recipe_text)
        litert_export.export(
            model=str(model_dir),
            output_dir=str(export_dir),
            quantization_recipe=recipe_arg,
            cache_length=max_seq_len,
            prefill_lengths=[prefill_length],
            externalize_embedder=True,
            bundle_litert_lm=True,
        )
        bundles = sorted(export_dir.rglob("*.litertlm"))
        if len(bundles) != 1:
            raise RuntimeError(f"litert-torch wrote {len(bundles)} .litertlm files in {export_dir}, expected one")
        with atomic_output(out) as tmp:
            shutil.move(bundles[0], tmp)
    seconds = time.perf_counter() - started
    params = {
        "quantization": quantization,
        "group_size": group_size if quantization == "int4" else None,
        "max_seq_len": max_seq_len,
        "prefill_length": prefill_length,
    }
    extra = {
        "recipe": recipe_text,
        "recipe_json": recipe,
        "fp32_linears": fp32_linears,
        "convert_s": seconds,
        "engine": "litert-lm",
        "litert_versions": package_versions(LITERT_PACKAGES),
        "checkpoint_commit": checkpoint.get("commit"),
    }
    manifest = write_manifest(out, {"checkpoint": Path(checkpoint_manifest)}, params, extra)
    log.info(
        "wrote %s (%.1f MB) in %.1f s, peak RSS %.0f MB", out, manifest["size_bytes"] / 1e6, seconds, manifest["peak_rss_mb"]
    )
    return manifest


RECIPE = re.compile(r"(?P<quantization>fp32|int8|int4)(-g(?P<group_size>\d+))?$")
CONVERT_TIMEOUT_S = 4 * 3600


class ConverterMissing(RuntimeError):
    """LiteRT-LM's converter is not installed where the workflow looks for it."""


def parse_recipe(recipe: str) -> tuple[str, int | None]:
    """`int4-g128` -> ("int4", 128); `fp32` and `int8` carry no group size."""
    match = RECIPE.match(recipe)
    if not match or (match["quantization"] == "int4") != bool(match["group_size"]):
        raise ValueError(f"unknown LiteRT-LM recipe {recipe!r}: expected fp32, int8 or int4-g<group size>")
    return match["quantization"], int(match["group_size"]) if match["group_size"] else None


def converter_python(configured: Path) -> str:
    """This interpreter when it has litert-torch (the rule's own conda environment), else the
    configured virtualenv's (bench/setup-litert.sh)."""
    if importlib.util.find_spec("litert_torch") is not None:
        return sys.executable
    if not Path(configured).is_file():
        raise ConverterMissing(f"LiteRT-LM's converter is not set up ({configured} is missing): run bench/setup-litert.sh once")
    return str(configured)


def convert_in(python: str, checkpoint_manifest: Path, out: Path, recipe: str, max_seq_len: int) -> None:
    """Run `convert` in `python`'s environment; its output goes where this process's does (the
    rule's log). The converter writes `out` and its manifest atomically itself."""
    quantization, group_size = parse_recipe(recipe)
    argv = [
        python,
        "-m",
        "gemma_edge.peers.litert",
        "convert",
        "--checkpoint",
        str(checkpoint_manifest),
        "--out",
        str(out),
        "--quantization",
        quantization,
        "--max-seq-len",
        str(max_seq_len),
    ]
    if group_size:
        argv += ["--group-size", str(group_size)]
    import_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [import_root, os.environ.get("PYTHONPATH")]))}
    log.info("converting with %s (%s, max_seq_len %d)", python, recipe, max_seq_len)
    done = subprocess.run(argv, env=env, timeout=CONVERT_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"LiteRT-LM's conversion to {recipe} failed (exit {done.returncode}): see its output above")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gemma_edge.peers.litert")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="checkpoint manifest -> .litertlm and its manifest")
    convert.add_argument("--checkpoint", required=True, type=Path, help="results/<model>/checkpoint.json")
    convert.add_argument("--out", required=True, type=Path)
    convert.add_argument("--quantization", choices=QUANTIZATIONS, default="int4")
    convert.add_argument("--group-size", type=int, default=128)
    convert.add_argument("--max-seq-len", type=int, default=128)
    convert.add_argument("--prefill-length", type=int, default=64)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    convert_checkpoint(args.checkpoint, args.out, args.quantization, args.group_size, args.max_seq_len, args.prefill_length)
    return 0


if __name__ == "__main__":
    sys.exit(main())
