"""The one table formatter, and the parity log written with it."""

import pytest

from gemma_edge.measure.device_parity import render_parity_log
from gemma_edge.workflow.table import markdown_table, text_table


def test_text_tables_align_each_column_as_asked_and_keep_cells_as_written():
    table = text_table(["prompt", "matched"], [["a long prompt", "8/8"], ["x", "12/16"], ["y", "0010"]], "lr")
    head, rule, *rows = table.splitlines()
    assert len({len(line.rstrip()) for line in [head, rule, *rows]}) == 1  # the right-aligned column ends together
    assert rows[0].startswith("a long prompt") and rows[2].endswith("0010")  # "0010" is not read as a number
    with pytest.raises(ValueError, match="2 columns"):
        text_table(["a", "b"], [["1"]], "lr")


def test_markdown_tables_mark_alignment_in_their_separator_row():
    lines = markdown_table(["step", "wall s"], [["export", "80.0"]], "lr").splitlines()
    assert lines[1].startswith("|:") and lines[1].endswith(":|")
    assert [cell.strip() for cell in lines[2].strip("|").split("|")] == ["export", "80.0"]


def test_the_parity_log_has_a_row_and_the_tokens_of_every_prompt():
    rows = [
        {
            "prompt": "The capital of France is",
            "matches_host_pte": True,
            "matched_host_fp32": 8,
            "host_fp32_tokens": [7] * 8,
            "first_divergence_from_fp32": None,
            "device_tokens": [5, 6],
            "host_pte_tokens": [5, 6],
        },
        {
            "prompt": "Count: one, two",
            "matches_host_pte": False,
            "matched_host_fp32": 3,
            "host_fp32_tokens": [7] * 8,
            "first_divergence_from_fp32": 3,
            "device_tokens": [5, 7],
            "host_pte_tokens": [5, 6],
        },
    ]
    log = render_parity_log("pi5", rows)
    assert [line.split()[-3:] for line in log.splitlines()[3:5]] == [["yes", "8/8", "-"], ["NO", "3/8", "3"]]
    assert "  device: [5, 6]" in log and "  device: [5, 7]" in log and "  host:   [5, 6]" in log
    assert "1/2 prompts identical to the host's run of the same .pte" in log
