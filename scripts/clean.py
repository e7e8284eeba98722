"""Snakemake step: remove everything the workflow put on a device but its virtualenv."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    device.clean(device.target_of(snakemake.config, snakemake.params.target, snakemake.params.settings))


with rule_log(snakemake.log[0], "clean"):
    main(snakemake)
