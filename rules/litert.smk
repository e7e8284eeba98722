# LiteRT-LM, Google's on-device LLM runtime, as a peer engine beside the .pte: the checkpoint
# converted on this host by litert-torch (in its own environment), and the litert-lm-api wheel for
# each target's CPU, both pushed to the device by the deploy step.


rule litert_model:
    input:
        checkpoint=rules.download.output.manifest,
    output:
        model="results/{model}/litert/model-{litert_recipe}.litertlm",
        manifest="results/{model}/litert/model-{litert_recipe}.litertlm.manifest.json",
    log:
        "logs/{model}/litert/model-{litert_recipe}.log",
    benchmark:
        "benchmarks/{model}/litert/model-{litert_recipe}.tsv"
    conda:
        "../envs/litert.yaml"
    threads: 2
    resources:
        mem_mb=memory_mb("litert"),
    params:
        python=litert_python(),
        max_seq_len=config["export"]["max_seq_len"],
    message:
        "LiteRT-LM's litert-torch converting {wildcards.model} to {wildcards.litert_recipe} (.litertlm)"
    script:
        "../scripts/litert_model.py"


rule litert_runtime:
    input:
        device="results/{target}/device.json",
        requirements=litert_requirements(),
    output:
        wheel=directory("results/{target}/litert/wheel"),
        record="results/{target}/litert/runtime.json",
    log:
        "logs/targets/{target}/litert_runtime.log",
    benchmark:
        "benchmarks/targets/{target}/litert_runtime.tsv"
    localrule: True
    conda:
        "../envs/deploy.yaml"
    message:
        "Fetching the litert-lm-api wheel for {wildcards.target}'s CPU (cached after the first time)"
    script:
        "../scripts/litert_runtime.py"
