"""Snakemake step: resolve the checkpoint through huggingface_hub and hash its files."""

from gemma_edge.steps import host
from gemma_edge.workflow.steplog import rule_log


def main(snakemake):
    p = snakemake.params
    host.download(p.repo_id, p.revision, p.hub_cache, p.offline, p.local_path, snakemake.output.manifest, p.demo)


with rule_log(snakemake.log[0], "download"):
    main(snakemake)
