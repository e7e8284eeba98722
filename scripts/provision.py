"""Snakemake step: make sure the device can run the benchmark; record its facts."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    i, target = snakemake.input, snakemake.wildcards.target
    device.provision(
        target,
        snakemake.params.settings,
        snakemake.output.device,
        i.get("platform"),
        i.get("wheelhouse"),
        i.get("wheels"),
        device.housekeeping(snakemake.config, target),
    )


with rule_log(snakemake.log[0], "provision"):
    main(snakemake)
