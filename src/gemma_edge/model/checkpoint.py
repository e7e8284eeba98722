"""A downloaded Gemma 4 checkpoint, loaded: its config, and its text decoder once its files match
their manifest (for export, verify, quality and the eager engine). For export, a bf16
checkpoint's tensors are read one at a time (a block of rows at a time for the per-layer
embedding table), so the whole model never exists twice in memory."""

from __future__ import annotations

import json
import math
import os
import types
from pathlib import Path

import torch
from torch import nn

from gemma_edge.device.files import read_json
from gemma_edge.model import hub


def read_text_config_dict(folder: Path) -> dict:
    """The text part of a checkpoint's config.json (multimodal Gemma 4 nests it under text_config)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return config.get("text_config", config)


def load_checkpoint(checkpoint_manifest: Path, bf16_tables: bool = False):
    """Verify the downloaded files against their recorded sha256, then load the eager FP32 model.

    With `bf16_tables`, a bf16 checkpoint keeps its embedding tables in bf16 (`load_for_export`):
    the same logits, bit for bit, from about 5.5 GB less memory at E2B's size."""
    manifest = read_json(checkpoint_manifest)
    folder = hub.verify_checkpoint(manifest)
    return (load_for_export(folder) if bf16_tables else load_text_model(folder, torch.float32)), manifest


def load_text_model(folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load the text decoder of a Gemma 4 checkpoint (text-only or multimodal) in eval mode, no grads."""
    from transformers import AutoConfig, Gemma4ForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "text_config") and config.model_type != "gemma4_text":
        model = _load_text_from_multimodal(folder, config.text_config, dtype)
    else:
        model = Gemma4ForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval().requires_grad_(False)


def stored_dtypes(folder: Path) -> set[torch.dtype]:
    """The dtypes the checkpoint's safetensors files store their floating-point tensors in."""
    with StoredTensors(folder) as stored:
        return {dtype for dtype in stored.dtypes() if dtype.is_floating_point}


def load_for_export(folder: Path) -> nn.Module:
    """The text decoder in FP32, except its embedding tables, which keep the checkpoint's bf16.

    E2B's two tables hold 2.75 B of its 4.63 B parameters: kept in the bf16 they are stored in
    (upcasting bf16 to FP32 is exact, so every result is the FP32 model's, bit for bit), the
    exported program is 5.5 GB smaller. Three more things keep the largest single tensors small,
    because saving a program costs about twice its largest tensor on top of the program:
      - the 2.35 B-entry per-layer table becomes one [vocab, 256] table per layer;
      - the lm_head stays tied to the bf16 token table and upcasts it in the graph (quantize turns
        the pair into one INT4 linear), instead of being a 1.6 GB FP32 copy;
      - transformers maps the bf16 checkpoint without reading it; each stored tensor is then read
        on its own with pread (not through the mapping, whose pages would otherwise all stay
        resident) and upcast, so the whole model never exists twice.
    A checkpoint not stored wholly in bf16 is loaded in FP32 as it is.
    """
    folder = Path(folder)
    if stored_dtypes(folder) != {torch.bfloat16}:
        return load_text_model(folder, torch.float32)
    model = load_text_model(folder, torch.bfloat16)
    text = model.model
    tied_head = model.lm_head.weight is text.embed_tokens.weight
    done = {model.lm_head} if tied_head else set()
    with StoredTensors(folder) as stored:
        if getattr(text, "embed_tokens_per_layer", None) is not None:
            text.embed_tokens_per_layer = PerLayerTables.read(
                stored, "model.embed_tokens_per_layer", text.embed_tokens_per_layer, text.config.num_hidden_layers
            )
            done.update(text.embed_tokens_per_layer.modules())
        for module_name, module in model.named_modules():
            if module in done:
                continue
            tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
            for name, tensor in tensors:
                if not tensor.is_floating_point():
                    continue
                value = stored.read(f"{module_name}.{name}", tensor)
                if module is not text.embed_tokens:
                    value = value.to(torch.float32)
                setattr(module, name, nn.Parameter(value, requires_grad=False) if isinstance(tensor, nn.Parameter) else value)
    text.embed_tokens.embed_scale = torch.tensor(text.embed_tokens.scalar_embed_scale, dtype=torch.float32)  # bf16 rounded it
    text.embed_tokens.forward = types.MethodType(_lookup_in_fp32, text.embed_tokens)
    if tied_head:
        model.lm_head.weight = text.embed_tokens.weight
        model.lm_head.forward = types.MethodType(_linear_in_fp32, model.lm_head)
    else:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().to(torch.float32), requires_grad=False)
    model.config.dtype = torch.float32
    return model


class PerLayerTables(nn.Module):
    """Gemma 4's per-layer embedding table as one bf16 table per layer, looked up in FP32.

    The stored table is [vocab, layers * 256] (4.7 GB in bf16 for E2B, its largest tensor); split
    by layer, no tensor is larger than the token table. The lookup concatenates the layers' rows,
    which is the stored table's row, so the result is unchanged."""

    def __init__(self, tables: list[torch.Tensor], embed_scale: float):
        super().__init__()
        self.tables = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tables])
        self.register_buffer("embed_scale", torch.tensor(embed_scale, dtype=torch.float32), persistent=False)

    @classmethod
    def read(cls, stored: StoredTensors, name: str, packed: nn.Embedding, layers: int, rows_per_read: int = 8192):
        """Read the packed table `name` a block of rows at a time into `layers` tables."""
        rows, width = packed.weight.shape
        if width % layers:
            raise ValueError(f"{name} has width {width}, not a multiple of {layers} layers")
        per_layer = width // layers
        tables = [torch.empty(rows, per_layer, dtype=torch.bfloat16) for _ in range(layers)]
        for start in range(0, rows, rows_per_read):
            block = stored.read_rows(f"{name}.weight", start, min(rows, start + rows_per_read))
            if block.shape[1] != width or block.dtype != torch.bfloat16:
                raise ValueError(f"{name} is stored as {block.dtype} with width {block.shape[1]}, expected bfloat16 and {width}")
            for layer, table in enumerate(tables):
                table[start : start + len(block)] = block[:, layer * per_layer : (layer + 1) * per_layer]
        return cls(tables, packed.scalar_embed_scale)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = [nn.functional.embedding(input_ids, table).to(torch.float32) for table in self.tables]
        return torch.cat(rows, dim=-1) * self.embed_scale


class StoredTensors:
    """A checkpoint's safetensors, read with pread into fresh tensors (no memory mapping): a
    tensor at a time, or a block of a tensor's rows.

    Kept over safetensors' own lazy reader (`safe_open(...).get_slice(name)[rows]`) by measurement
    (a one-off script, in the repository's history: the export step at E2B's widths and 8 layers, a 2.73 GB bf16
    checkpoint, 2026-11-27): peak RSS 3,959 MiB after loading and 5,527 MiB for the whole step
    with this reader, 4,863 and 7,260 MiB with safe_open, for the same program (same sha256).
    safe_open reads through a memory mapping whose pages stay resident once touched, so the
    whole checkpoint is counted on top of its copies."""

    DTYPES = {
        "F64": torch.float64,
        "F32": torch.float32,
        "BF16": torch.bfloat16,
        "F16": torch.float16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }

    def __init__(self, folder: Path):
        self.paths = sorted(Path(folder).glob("*.safetensors"))

    def __enter__(self):
        self.files, self.entries = [], {}
        try:
            for path in self.paths:
                handle = open(path, "rb")
                self.files.append(handle)
                header_len = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(header_len))
                header.pop("__metadata__", None)
                for key, entry in header.items():
                    self.entries[key] = (handle, 8 + header_len, entry)
        except (OSError, ValueError) as error:
            self.__exit__()
            raise ValueError(f"{path} is not a readable safetensors file ({error})") from error
        return self

    def __exit__(self, *exc):
        for handle in self.files:
            handle.close()

    def dtypes(self) -> set[torch.dtype]:
        return {self.DTYPES[entry["dtype"]] for _, _, entry in self.entries.values()}

    def read(self, name: str, loaded: torch.Tensor) -> torch.Tensor:
        """The stored tensor behind model tensor `name` (text-only or multimodal key), else `loaded`
        itself (buffers computed at init)."""
        key = self._key(name)
        if key is None:
            return loaded.detach()
        shape = self.entries[key][2]["shape"]
        if tuple(shape) != tuple(loaded.shape):
            raise ValueError(f"{key} is stored with shape {tuple(shape)}, the model expects {tuple(loaded.shape)}")
        return self.read_rows(name, 0, shape[0] if shape else 1).reshape(shape)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of the stored tensor `name` (each row is contiguous in the file)."""
        key = self._key(name)
        if key is None:
            raise KeyError(f"{name} is not in the checkpoint")
        handle, data_start, entry = self.entries[key]
        dtype, shape = self.DTYPES[entry["dtype"]], entry["shape"] or [1]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        begin, end = entry["data_offsets"]
        if (end - begin) != shape[0] * row_bytes:
            raise ValueError(f"{key}: the header's offsets do not match its shape {shape}")
        out = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        _pread_into(handle.fileno(), out.numpy(), data_start + begin + start * row_bytes, key)
        return out.view(dtype).reshape(stop - start, *shape[1:])

    def _key(self, name: str) -> str | None:
        for key in (name, name.replace("model.", "model.language_model.", 1)):
            if key in self.entries:
                return key
        return None


def _pread_into(fd: int, buffer, offset: int, what: str) -> None:
    """Fill `buffer` from the file at `offset` (one pread returns at most about 2 GiB)."""
    view, done = memoryview(buffer).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise ValueError(f"{what}: the file ends before the tensor does (truncated checkpoint?)")
        done += got


def _lookup_in_fp32(self, input_ids: torch.Tensor) -> torch.Tensor:
    return nn.functional.embedding(input_ids, self.weight).to(torch.float32) * self.embed_scale


def _linear_in_fp32(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(hidden_states, self.weight.to(torch.float32))


def _load_text_from_multimodal(folder: Path, text_config, dtype: torch.dtype) -> nn.Module:
    """Take the language model and head out of a multimodal Gemma 4 checkpoint (E2B ships as one)."""
    from transformers import AutoModelForImageTextToText, Gemma4ForCausalLM

    full = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype)
    with torch.device("meta"):
        model = Gemma4ForCausalLM(text_config)
    model.model = full.model.language_model
    model.lm_head = full.lm_head
    del full  # the vision and audio towers are not exported
    return model
