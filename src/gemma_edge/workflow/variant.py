"""A .pte variant's one spelling. Its folder under results/<model>/ names the quantization,
`int4-g<group size>` or `fp32`, and the XNNPACK mode, `xnnpack-auto`, `-fused` or `-perop`;
the workflow's paths, wildcards and labels are built and read back here and nowhere else.

`per_op_mode` is the config's value end to end: "auto", True or False (lowering.per_op_mode),
and `mode_dir`/`per_op_mode_of` only translate it to and from the folder name.
"""

from __future__ import annotations

import re

MODE_DIRS = {"auto": "auto", True: "perop", False: "fused"}
QUANT_PATTERN = r"fp32|int4-g\d+"
MODE_PATTERN = "|".join(MODE_DIRS.values())


def quant_dir(group_size: int | None) -> str:
    """`int4-g128` for an INT4 variant of that group size, `fp32` for None."""
    return f"int4-g{group_size}" if group_size else "fp32"


def group_size_of(quant: str) -> int | None:
    """The group size a quant folder name says (None for fp32)."""
    match = re.fullmatch(QUANT_PATTERN, quant)
    if not match:
        raise ValueError(f"{quant!r} is not a quantization folder: expected fp32 or int4-g<group size>")
    return int(quant.removeprefix("int4-g")) if quant != "fp32" else None


def mode_dir(per_op_mode) -> str:
    return MODE_DIRS[per_op_mode]


def per_op_mode_of(mode: str):
    """lowering.per_op_mode ("auto", True or False) from an `xnnpack-<mode>` folder's <mode>."""
    return next(value for value, name in MODE_DIRS.items() if name == mode)


def lowered(quant: str, mode: str) -> str:
    """<quant>/xnnpack-<mode>: a lowered variant's folders under its model's."""
    return f"{quant}/xnnpack-{mode}"


def variant_dir(model: str, group_size: int | None, per_op_mode) -> str:
    """<model>/<quant>/xnnpack-<mode>, relative to results/ (or results/<target>/)."""
    return f"{model}/{lowered(quant_dir(group_size), mode_dir(per_op_mode))}"


# The same paths with Snakemake's wildcards in them, for the rules: results/{VARIANT}/model.pte.
LOWERED = lowered("{quant}", "{mode}")
VARIANT = "{model}/" + LOWERED
QUANTIZED = "{model}/" + quant_dir("{group_size}")


def label(group_size: int | None, per_op_mode_used: bool) -> str:
    """A .pte's name in tables and plots: `int4-g128 fused`, `fp32 per-op`, …"""
    return f"{quant_dir(group_size)} {'per-op' if per_op_mode_used else 'fused'}"
