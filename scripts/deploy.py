"""Snakemake step: upload the .pte, tokenizer and peer engines to the device, atomically and sha256-checked."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    config, target = snakemake.config, snakemake.params.target  # housekeeping read here: changing it re-runs nothing
    device.deploy(
        target,
        snakemake.params.settings,
        snakemake.input.pte,
        snakemake.input.checkpoint,
        snakemake.output.deployed,
        snakemake.params.peers,
        device.configured_variant(config),
        device.housekeeping(config, target),
    )


with rule_log(snakemake.log[0], "deploy"):
    main(snakemake)
