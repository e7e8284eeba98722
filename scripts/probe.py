"""Snakemake step: what the device is, from its own system Python, before anything is installed."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    target = device.target_of(snakemake.config, snakemake.wildcards.target, snakemake.params.settings)
    device.probe(target, snakemake.output.platform)


with rule_log(snakemake.log[0], "probe"):
    main(snakemake)
