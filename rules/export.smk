rule export:
    input:
        checkpoint=rules.download.output.manifest,
    output:
        program="results/{model}/fp32/program.pt2",
        manifest="results/{model}/fp32/program.pt2.manifest.json",
    log:
        "logs/{model}/fp32/export.log",
    benchmark:
        "benchmarks/{model}/fp32/export.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("export"),
    params:
        max_seq_len=config["export"]["max_seq_len"],
        dtype=config["export"]["dtype"],
        attention=config["export"]["attention"],
    message:
        "torch.export of {wildcards.model} with an in-graph KV cache of {params.max_seq_len} positions"
    script:
        "../scripts/export.py"
