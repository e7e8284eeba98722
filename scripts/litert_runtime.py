"""Snakemake step: the litert-lm-api wheel for the target's CPU, fetched on this host."""

from gemma_edge.steps import peers
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    peers.litert_runtime(snakemake.input.requirements, snakemake.input.device, snakemake.output.wheel, snakemake.output.record)


with rule_log(snakemake.log[0], "litert_runtime"):
    main(snakemake)
