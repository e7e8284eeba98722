"""Snakemake step: upload the .pte, tokenizer and peer engines to the device, atomically and sha256-checked."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    config, i = snakemake.config, snakemake.input
    target = device.target_of(config, snakemake.params.target, snakemake.params.settings)
    configured = device.configured_variant(config)  # the variant whose newest deployment the device keeps
    device.deploy(target, i.pte, i.checkpoint, snakemake.output.deployed, snakemake.params.peers, configured)


with rule_log(snakemake.log[0], "deploy"):
    main(snakemake)
