"""Snakemake step: what the device is, from its own system Python, before anything is installed."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    target = snakemake.wildcards.target
    device.probe(target, snakemake.params.settings, snakemake.output.platform, device.housekeeping(snakemake.config, target))


with rule_log(snakemake.log[0], "probe"):
    main(snakemake)
