"""Snakemake step: lower an exported program to an XNNPACK .pte."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    host.lower(
        snakemake.input.program,
        snakemake.input.checkpoint,
        snakemake.params.per_op_mode,
        snakemake.params.decode_method,
        snakemake.output.pte,
        snakemake.output.manifest,
    )


with rule_log(snakemake.log[0], "lower"):
    main(snakemake)
