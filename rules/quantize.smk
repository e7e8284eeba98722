rule quantize:
    input:
        program=rules.export.output.program,
    output:
        program="results/{model}/int4-g{group_size}/program.pt2",
        manifest="results/{model}/int4-g{group_size}/program.pt2.manifest.json",
    log:
        "logs/{model}/int4-g{group_size}/quantize.log",
    benchmark:
        "benchmarks/{model}/int4-g{group_size}/quantize.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("quantize"),
    params:
        group_size=lambda wc: int(wc.group_size),
        embeddings=config["quantization"]["embeddings"],
    message:
        "INT8 dynamic activations + INT4 weights, group size {wildcards.group_size}"
    script:
        "../scripts/quantize.py"
