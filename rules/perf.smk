# The performance benchmark: the .pte, eager FP32 PyTorch and llama.cpp (GGUF written from the same
# checkpoint by llama.cpp's own converter) timed by one loop on this host, each engine in its own
# job, then one table beside what every workflow step cost. `snakemake perf` builds the table of
# the configured model and variant; eager and llama.cpp do not depend on the group size, so a
# group-size change re-runs only quantize -> lower -> the .pte's benchmark -> the table.


rule gguf:
    input:
        checkpoint=rules.download.output.manifest,
    output:
        gguf="results/{model}/llamacpp/model-{gguf_type}.gguf",
        manifest="results/{model}/llamacpp/model-{gguf_type}.gguf.manifest.json",
    log:
        "logs/{model}/llamacpp/gguf-{gguf_type}.log",
    benchmark:
        "benchmarks/{model}/llamacpp/gguf-{gguf_type}.tsv"
    conda:
        "../envs/perf.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("gguf"),
    params:
        converter=llamacpp_converter(),
    message:
        "llama.cpp's convert_hf_to_gguf.py on {wildcards.model}, then llama_model_quantize to {wildcards.gguf_type}"
    script:
        "../scripts/gguf.py"


rule perf_engine:
    input:
        artifact=perf_engine_artifact,
        checkpoint=rules.download.output.manifest,
    output:
        result="results/perf/{model}/{engine_variant}/{engine}.json",
    log:
        "logs/perf/{model}/{engine_variant}/{engine}.log",
    benchmark:
        "benchmarks/perf/{model}/{engine_variant}/{engine}.tsv"
    conda:
        "../envs/perf.yaml"
    threads: config["perf"]["threads"]
    resources:
        mem_mb=memory_mb("perf"),
        host_bench=1,
    params:
        spec=perf_spec,
    message:
        "Timing prefill and decode of {wildcards.engine} ({wildcards.engine_variant}) on this host"
    script:
        "../scripts/perf_engine.py"


# LiteRT-LM is timed by its own runtime's benchmark (the device's litert_bench, in a process of its
# own with the litert-lm-api wheel for this host), not by our step loop.
rule perf_litert:
    input:
        model="results/{model}/litert/model-{litert_recipe}.litertlm",
        requirements=litert_requirements(),
    output:
        result="results/perf/{model}/{litert_recipe}/litert.json",
    log:
        "logs/perf/{model}/{litert_recipe}/litert.log",
    benchmark:
        "benchmarks/perf/{model}/{litert_recipe}/litert.tsv"
    conda:
        "../envs/perf.yaml"
    threads: config["perf"]["threads"]
    resources:
        mem_mb=memory_mb("perf"),
        host_bench=1,
    params:
        spec=perf_spec,
    message:
        "Timing prefill and decode of LiteRT-LM ({wildcards.litert_recipe}) on this host"
    script:
        "../scripts/perf_litert.py"


rule perf_table:
    input:
        unpack(perf_table_inputs),
    output:
        json=f"results/perf/{variant.VARIANT}/perf.json",
        table=report(
            f"results/perf/{variant.VARIANT}/perf.md",
            caption="../report/perf.rst",
            category="Performance",
        ),
    log:
        f"logs/perf/{variant.VARIANT}/perf_table.log",
    benchmark:
        f"benchmarks/perf/{variant.VARIANT}/perf_table.tsv"
    localrule: True
    conda:
        "../envs/perf.yaml"
    params:
        step_benchmarks=perf_step_benchmarks,
    message:
        "Performance table of {wildcards.model} {wildcards.quant}: .pte vs eager FP32 vs llama.cpp vs LiteRT-LM"
    script:
        "../scripts/perf_table.py"


rule perf_projection:
    input:
        reports=perf_projection_inputs,
    output:
        json=f"results/perf/projection/{variant.LOWERED}/projection.json",
        table=report(
            f"results/perf/projection/{variant.LOWERED}/projection.md",
            caption="../report/projection.rst",
            category="Performance",
        ),
    log:
        f"logs/perf/projection/{variant.LOWERED}/projection.log",
    benchmark:
        f"benchmarks/perf/projection/{variant.LOWERED}/projection.tsv"
    localrule: True
    conda:
        "../envs/perf.yaml"
    params:
        shape=config["models"][config["perf"]["projection"]["models"][0]]["synthetic"]["shape"],
        layers=config["perf"]["projection"]["layers"],
    message:
        "Projecting every step's peak RSS and wall time to the {params.shape} shape at {params.layers} layers"
    script:
        "../scripts/perf_projection.py"
