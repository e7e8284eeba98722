"""Snakemake step: publish the configured variant's benchmark at results/<target>/."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    device.publish({snakemake.input[key]: snakemake.output[key] for key in ("bench", "parity_log", "parity")})


with rule_log(snakemake.log[0], "current_bench"):
    main(snakemake)
