"""Snakemake step: perplexity and KL divergence of a .pte or a GGUF against eager FP32 on a held-out text."""

from gemma_edge.steps import measure
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    i, p = snakemake.input, snakemake.params
    measure.quality(
        p.engine,
        i.artifact,
        i.checkpoint,
        i.text,
        p.text,
        p.settings,
        p.gates,
        p.synthetic,
        snakemake.threads,
        snakemake.output.quality,
        snakemake.output.manifest,
    )


with rule_log(snakemake.log[0], "quality"):
    main(snakemake)
