"""Snakemake step: time LiteRT-LM's prefill and decode of the .litertlm on this host."""

from gemma_edge.steps import measure
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    measure.perf_litert(snakemake.input.model, snakemake.params.spec, snakemake.input.requirements, snakemake.output.result)


with rule_log(snakemake.log[0], "perf_litert"):
    main(snakemake)
