"""Snakemake step: llama.cpp's llama-bench for the target's CPU, from the pinned llama.cpp source."""

from gemma_edge.steps import peers
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    peers.llama_bench(
        snakemake.input.sdist, snakemake.params.version, snakemake.input.device, snakemake.output.program, snakemake.output.record
    )


with rule_log(snakemake.log[0], "llama_bench"):
    main(snakemake)
