"""Snakemake step: write the GGUF llama.cpp benchmarks from the downloaded checkpoint."""

from gemma_edge.steps import peers
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    peers.gguf(
        snakemake.params.converter,
        snakemake.input.checkpoint,
        snakemake.wildcards.gguf_type,
        snakemake.threads,
        snakemake.output.gguf,
        snakemake.output.manifest,
    )


with rule_log(snakemake.log[0], "gguf"):
    main(snakemake)
