"""Snakemake step: remove everything the workflow put on a device but its virtualenv."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    target = snakemake.params.target
    device.clean(target, snakemake.params.settings, device.housekeeping(snakemake.config, target))


with rule_log(snakemake.log[0], "clean"):
    main(snakemake)
