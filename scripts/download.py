"""Snakemake step: resolve the checkpoint through huggingface_hub and hash its files."""

from gemma_edge import pipeline
from gemma_edge.steplog import rule_log


def main(snakemake):
    p = snakemake.params
    pipeline.download(p.repo_id, p.revision, p.hub_cache, p.offline, p.local_path, snakemake.output.manifest, p.demo)


with rule_log(snakemake.log[0], "download"):
    main(snakemake)
