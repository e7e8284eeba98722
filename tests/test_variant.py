"""A variant's folder names, built and read back in one place (gemma_edge.variant)."""

import re

import pytest

from gemma_edge import variant


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
