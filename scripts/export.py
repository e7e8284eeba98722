"""Snakemake step: torch.export the decoder with its KV cache as module buffers."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    p = snakemake.params
    host.export(snakemake.input.checkpoint, p.max_seq_len, p.attention, snakemake.output.program, snakemake.output.manifest)


with rule_log(snakemake.log[0], "export"):
    main(snakemake)
