# The demo model: built and trained locally, then laid out as a Hugging Face cache entry so the
# download step resolves it through the real huggingface_hub code, offline.


rule demo_checkpoint:
    input:
        corpus=workflow_file("resources/demo_corpus.txt"),
    output:
        marker="results/demo-hub/{repo}.json",
    log:
        "logs/demo/{repo}.log",
    benchmark:
        "benchmarks/demo/{repo}.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        hub_cache=lambda wc, output: str(Path(output.marker).parent),
        repo_id=lambda wc: wc.repo.replace("--", "/", 1),
        train_steps=config["demo"]["train_steps"],
        synthetic=lambda wc: demo_entry(wc)["synthetic"],
        seed=config["demo"]["seed"],
    message:
        "Building the local Gemma 4 {params.repo_id} and seeding it into a hub cache"
    script:
        "../scripts/demo_checkpoint.py"
