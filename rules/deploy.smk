# Device stages. They talk to a device over SSH (or run on this machine), so they are local
# rules: never sent to a cluster. Each target gets its own deploy and bench rules so that each
# can hold that device's resource (device_<target>=1, registered in rules/common.smk): two
# benchmarks never share a device, while different devices benchmark in parallel.


rule probe:
    output:
        platform="results/{target}/platform.json",
    log:
        "logs/targets/{target}/probe.log",
    benchmark:
        "benchmarks/targets/{target}/probe.tsv"
    localrule: True
    conda:
        "../envs/deploy.yaml"
    params:
        settings=target_settings,
    message:
        "Probing {wildcards.target}: machine, Python, glibc, CPU, memory and disk, before anything is installed"
    script:
        "../scripts/probe.py"


# The device's Python packages, resolved and downloaded on this host for the device's platform, so
# that a device without internet can be provisioned and every device gets the same bytes.
rule wheelhouse:
    input:
        platform=rules.probe.output.platform,
    output:
        wheels=directory("results/{target}/wheelhouse"),
        record="results/{target}/wheelhouse.json",
    log:
        "logs/targets/{target}/wheelhouse.log",
    benchmark:
        "benchmarks/targets/{target}/wheelhouse.tsv"
    localrule: True
    conda:
        "../envs/deploy.yaml"
    params:
        pins=runtime_pins(),
        torch_index=config["wheelhouse"]["torch_index"],
    message:
        "Downloading {wildcards.target}'s wheels (executorch, torch and their dependencies) on this host"
    script:
        "../scripts/build_wheelhouse.py"


rule provision:
    input:
        unpack(provision_inputs),
    output:
        device="results/{target}/device.json",
    log:
        "logs/targets/{target}/provision.log",
    benchmark:
        "benchmarks/targets/{target}/provision.tsv"
    localrule: True
    conda:
        "../envs/deploy.yaml"
    params:
        settings=target_settings,
    message:
        "Provisioning {wildcards.target}: runtime from the wheelhouse, device facts and pre-flight checks"
    script:
        "../scripts/provision.py"


# llama.cpp's llama-bench for the device's CPU (its probed instruction set), built on this host from
# the pinned llama.cpp source and linked statically, so that it runs beside the .pte on the device.
rule llama_bench:
    input:
        device="results/{target}/device.json",
        sdist=llamacpp_sdist(),
    output:
        program=directory("results/{target}/llamacpp/bin"),
        record="results/{target}/llamacpp/llama-bench.json",
    log:
        "logs/targets/{target}/llama_bench.log",
    benchmark:
        "benchmarks/targets/{target}/llama_bench.tsv"
    localrule: True
    conda:
        "../envs/deploy.yaml"
    threads: 2
    params:
        version=llamacpp_version(),
    message:
        "Building llama.cpp's llama-bench for {wildcards.target}'s CPU (cached per CPU after the first build)"
    script:
        "../scripts/build_llama_bench.py"


for target_name in config["targets"]:

    rule:
        name:
            f"deploy_{target_name}"
        input:
            pte=f"results/{variant.VARIANT}/model.pte",
            checkpoint="results/{model}/checkpoint.json",
            device=f"results/{target_name}/device.json",
            peers=peer_files(target_name),
        output:
            deployed=f"results/{target_name}/{variant.VARIANT}/deployed.json",
        log:
            f"logs/targets/{target_name}/{variant.VARIANT}/deploy.log",
        benchmark:
            f"benchmarks/targets/{target_name}/{variant.VARIANT}/deploy.tsv"
        localrule: True
        conda:
            "../envs/deploy.yaml"
        resources:
            **{f"device_{target_name}": 1},
        params:
            target=target_name,
            settings=device_settings(target_name),
            peers=peer_plan(target_name),
        message:
            f"Uploading {{input.pte}} and the peers' programs and models to {target_name}"
        script:
            "../scripts/deploy.py"

    # On demand: `snakemake clean_<target>` removes everything the workflow put on the device but
    # its virtualenv, and this host's records of it. No output and no benchmark file (which would
    # be one), so it runs each time it is asked; its log says what it removed.
    rule:
        name:
            f"clean_{target_name}"
        log:
            f"logs/targets/{target_name}/clean.log",
        localrule: True
        conda:
            "../envs/deploy.yaml"
        resources:
            **{f"device_{target_name}": 1},
        params:
            target=target_name,
            settings=device_settings(target_name),
        message:
            f"Removing what the workflow put on {target_name}, all but its virtualenv"
        script:
            "../scripts/clean.py"

    rule:
        name:
            f"bench_{target_name}"
        input:
            deployed=f"results/{target_name}/{variant.VARIANT}/deployed.json",
            device=f"results/{target_name}/device.json",
            pte_manifest=f"results/{variant.VARIANT}/model.pte.manifest.json",
            host_parity=f"results/{variant.VARIANT}/parity.json",
            checkpoint="results/{model}/checkpoint.json",
        output:
            bench=report(
                f"results/{target_name}/{variant.VARIANT}/bench.json",
                caption="../report/bench.rst",
                category="Benchmarks",
                subcategory=target_name,
            ),
            parity_log=f"results/{target_name}/{variant.VARIANT}/parity.log",
            parity=f"results/{target_name}/{variant.VARIANT}/parity.json",
        log:
            f"logs/targets/{target_name}/{variant.VARIANT}/bench.log",
        benchmark:
            f"benchmarks/targets/{target_name}/{variant.VARIANT}/bench.tsv"
        # Ahead of the next deploy when both are ready: each deploy keeps only keep_models earlier
        # programs on the device, so a benchmark runs while its program is still there.
        priority: 1
        localrule: True
        conda:
            "../envs/deploy.yaml"
        resources:
            **{f"device_{target_name}": 1},
        params:
            target=target_name,
            settings=device_settings(target_name),
            bench=bench_settings,
        message:
            f"Benchmarking decode on {target_name}: the .pte, then each peer engine, one at a time"
        script:
            "../scripts/bench.py"


rule current_bench:
    input:
        bench=current_variant_file("bench.json"),
        parity_log=current_variant_file("parity.log"),
        parity=current_variant_file("parity.json"),
    output:
        bench="results/{target}/bench.json",
        parity_log="results/{target}/parity.log",
        parity="results/{target}/parity.json",
    log:
        "logs/targets/{target}/current_bench.log",
    benchmark:
        "benchmarks/targets/{target}/current_bench.tsv"
    localrule: True
    conda:
        "../envs/deploy.yaml"
    message:
        "results/{wildcards.target}/bench.json: the configured variant's benchmark"
    script:
        "../scripts/publish.py"
