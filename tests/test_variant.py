"""A variant's folder names, built and read back in one place (gemma_edge.workflow.variant)."""

import re
from pathlib import Path

import pytest

from gemma_edge.workflow import variant


@pytest.mark.parametrize("per_op_mode", ["auto", True, False])
@pytest.mark.parametrize("group_size", [None, 32, 256])
def test_folder_names_read_back_to_the_config_values(group_size, per_op_mode):
    model, quant, mode = variant.variant_dir("tiny", group_size, per_op_mode).split("/")
    assert model == "tiny" and mode.startswith("xnnpack-")
    assert re.fullmatch(variant.QUANT_PATTERN, quant) and re.fullmatch(variant.MODE_PATTERN, mode.removeprefix("xnnpack-"))
    assert variant.group_size_of(quant) == group_size
    read_back = variant.per_op_mode_of(mode.removeprefix("xnnpack-"))
    assert read_back == per_op_mode and type(read_back) is type(per_op_mode)  # True stays a bool, not 1


def test_the_folder_names_and_labels_users_see():
    assert variant.variant_dir("demo", 128, "auto") == "demo/int4-g128/xnnpack-auto"
    assert variant.variant_dir("demo", None, True) == "demo/fp32/xnnpack-perop"
    assert variant.label(64, False) == "int4-g64 fused" and variant.label(None, True) == "fp32 per-op"
    with pytest.raises(ValueError, match="expected fp32 or int4-g<group size>"):
        variant.group_size_of("int8")


def test_the_rules_paths_are_the_same_names_with_wildcards():
    assert variant.VARIANT == "{model}/{quant}/xnnpack-{mode}" and variant.QUANTIZED == "{model}/int4-g{group_size}"
    filled = variant.VARIANT.format(model="demo", quant=variant.quant_dir(128), mode=variant.mode_dir("auto"))
    assert filled == variant.variant_dir("demo", 128, "auto")


def test_no_rule_spells_a_variant_folder_by_hand():
    """The rules build every variant path from this module, so a name changes in one place."""
    rules = Path(__file__).resolve().parents[1] / "rules"
    by_hand = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(rules.glob("*.smk"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"xnnpack-|int4-g", line.split("#", 1)[0].split('"""', 1)[0])
    ]
    assert by_hand == []
