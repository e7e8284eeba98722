"""Snakemake step: make sure the device can run the benchmark; record its facts."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    i = snakemake.input
    target = device.target_of(snakemake.config, snakemake.wildcards.target, snakemake.params.settings)
    device.provision(target, snakemake.output.device, i.get("platform"), i.get("wheelhouse"), i.get("wheels"))


with rule_log(snakemake.log[0], "provision"):
    main(snakemake)
