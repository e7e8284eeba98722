# Device stages: they talk to the device over SSH (or run locally), so they run on the machine
# that drives the workflow, never on a cluster node, and one benchmark at a time.


localrules:
    provision,
    deploy,
    bench,


rule provision:
    output:
        device="results/{target}/device.json",
    log:
        "logs/targets/{target}/provision.log",
    benchmark:
        "benchmarks/targets/{target}/provision.tsv"
    conda:
        "../envs/deploy.yaml"
    params:
        settings=target_settings,
    message:
        "Provisioning {wildcards.target}: runtime versions and device facts"
    script:
        "../scripts/provision.py"


rule deploy:
    input:
        pte=selected_variant("model.pte"),
        checkpoint=checkpoint_manifest(),
        device=rules.provision.output.device,
    output:
        deployed="results/{target}/deployed.json",
    log:
        "logs/targets/{target}/deploy.log",
    benchmark:
        "benchmarks/targets/{target}/deploy.tsv"
    conda:
        "../envs/deploy.yaml"
    params:
        settings=target_settings,
    message:
        "Uploading {input.pte} to {wildcards.target}"
    script:
        "../scripts/deploy.py"


rule bench:
    input:
        deployed=rules.deploy.output.deployed,
        device=rules.provision.output.device,
        pte_manifest=selected_variant("model.pte.manifest.json"),
        host_parity=selected_variant("parity.json"),
        checkpoint=checkpoint_manifest(),
    output:
        bench=report(
            "results/{target}/bench.json",
            caption="../report/bench.rst",
            category="Benchmarks",
        ),
        parity_log="results/{target}/parity.log",
        parity="results/{target}/parity.json",
    log:
        "logs/targets/{target}/bench.log",
    benchmark:
        "benchmarks/targets/{target}/bench.tsv"
    conda:
        "../envs/deploy.yaml"
    params:
        settings=target_settings,
        bench=config["bench"],
    resources:
        device_bench=1,
    message:
        "Benchmarking decode on {wildcards.target}"
    script:
        "../scripts/bench.py"
