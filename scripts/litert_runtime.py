"""Snakemake step: the litert-lm-api wheel for the target's CPU, fetched on this host."""

from pathlib import Path

from gemma_edge import litert_runtime
from gemma_edge.artifacts import read_json
from gemma_edge.steplog import rule_log


def main(snakemake):
    litert_runtime.runtime_for_device(
        Path(snakemake.input.requirements),
        read_json(snakemake.input.device),
        Path(snakemake.output.wheel),
        Path(snakemake.output.record),
    )


with rule_log(snakemake.log[0], "litert_runtime"):
    main(snakemake)
