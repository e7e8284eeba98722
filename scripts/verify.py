"""Snakemake step: token parity of the .pte against eager FP32 on the host."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    p = snakemake.params
    host.verify(
        snakemake.input.pte,
        snakemake.input.checkpoint,
        p.prompts,
        p.max_new_tokens,
        p.gates,
        snakemake.output.parity,
        snakemake.output.table,
    )


with rule_log(snakemake.log[0], "verify"):
    main(snakemake)
