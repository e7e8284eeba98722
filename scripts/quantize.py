"""Snakemake step: INT8 dynamic activations + INT4 per-group weights on the exported program."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    p = snakemake.params
    host.quantize(snakemake.input.program, p.group_size, p.embeddings, snakemake.output.program, snakemake.output.manifest)


with rule_log(snakemake.log[0], "quantize"):
    main(snakemake)
