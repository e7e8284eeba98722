"""Snakemake step: llama.cpp's llama-bench for the target's CPU, from the pinned llama.cpp source."""

from pathlib import Path

from gemma_edge import llamacpp_build
from gemma_edge.artifacts import read_json
from gemma_edge.steplog import rule_log


def main(snakemake):
    llamacpp_build.build_for_device(
        Path(snakemake.input.sdist),
        snakemake.params.version,
        read_json(snakemake.input.device),
        Path(snakemake.output.program),
        Path(snakemake.output.record),
    )


with rule_log(snakemake.log[0], "llama_bench"):
    main(snakemake)
