"""Snakemake step: build the tiny demo Gemma 4 and seed it into a local hub cache."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    p = snakemake.params
    host.build_demo(snakemake.input.corpus, p.hub_cache, p.repo_id, p.train_steps, p.seed, snakemake.output.marker, p.synthetic)


with rule_log(snakemake.log[0], "demo_checkpoint"):
    main(snakemake)
