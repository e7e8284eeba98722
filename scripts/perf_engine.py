"""Snakemake step: time prefill and decode of one engine (.pte, eager FP32 or llama.cpp) on this host."""

from gemma_edge.steps import measure
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    measure.perf_engine(
        snakemake.wildcards.engine,
        snakemake.input.artifact,
        snakemake.input.checkpoint,
        snakemake.params.spec,
        snakemake.output.result,
    )


with rule_log(snakemake.log[0], "perf_engine"):
    main(snakemake)
