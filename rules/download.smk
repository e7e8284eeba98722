rule download:
    input:
        demo=demo_marker,
    output:
        manifest="results/{model}/checkpoint.json",
    log:
        "logs/{model}/download.log",
    benchmark:
        "benchmarks/{model}/download.tsv"
    conda:
        "../envs/download.yaml"
    params:
        repo_id=lambda wc: model_entry(wc)["repo_id"],
        revision=lambda wc: model_entry(wc)["revision"],
        local_path=lambda wc: model_entry(wc)["local_path"],
        hub_cache=hub_cache,
        offline=lambda wc: model_entry(wc)["offline"] or model_entry(wc)["demo"],
        demo=lambda wc: model_entry(wc)["demo"],
    message:
        "Resolving {params.repo_id}@{params.revision}"
    script:
        "../scripts/download.py"
