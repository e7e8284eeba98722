# The sweep's answer: one table and five plots, shown by `snakemake --report report.html`.


rule summary:
    input:
        benches=sweep_benches(),
        qualities=sweep_qualities(),
    output:
        csv=report("results/summary.csv", caption="../report/summary.rst", category="Sweep"),
        json="results/summary.json",
        decode=report("results/plots/decode.png", caption="../report/decode.rst", category="Sweep"),
        prefill=report("results/plots/prefill.png", caption="../report/prefill.rst", category="Sweep"),
        size=report("results/plots/size.png", caption="../report/size.rst", category="Sweep"),
        parity=report("results/plots/parity.png", caption="../report/parity_plot.rst", category="Sweep"),
        quality=report("results/plots/quality.png", caption="../report/quality_plot.rst", category="Sweep"),
    log:
        "logs/summary.log",
    benchmark:
        "benchmarks/summary.tsv"
    localrule: True
    conda:
        "../envs/report.yaml"
    params:
        benchmarks=lambda wc, input: len(input.benches),
        qualities=lambda wc, input: len(input.qualities),
    message:
        "Summarising {params.benchmarks} benchmark(s) and {params.qualities} quality result(s) into results/summary.csv and plots"
    script:
        "../scripts/summary.py"
