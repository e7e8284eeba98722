"""Snakemake step: download the device's wheels on this host, for the device's platform."""

from gemma_edge.steps import device
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    device.wheelhouse(
        snakemake.input.platform,
        snakemake.params.pins,
        snakemake.output.wheels,
        snakemake.params.torch_index,
        snakemake.output.record,
    )


with rule_log(snakemake.log[0], "wheelhouse"):
    main(snakemake)
