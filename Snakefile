# Gemma 4 -> ExecuTorch: download, export, quantize, lower and verify a .pte, every step cached.
import os
import sys
from pathlib import Path

from snakemake.utils import min_version

min_version("9.0")

# Every step runs in a fresh interpreter (`script:`), which would otherwise draw a random string-hash
# seed: torch.export and ExecuTorch iterate sets of names in places, so graph node order and the
# .pte's value ids followed it. One fixed seed for every job (cluster jobs re-read this file too)
# makes the same config, pins and machine give the same bytes (docs/design.md, "Reproducible bytes on one machine").
# Set here, never read from the user, so it needs no `envvars:` entry.
os.environ.update(PYTHONHASHSEED="0")

sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from gemma_edge.workflow import stale_lock, terminal  # noqa: E402
from gemma_edge.workflow.config import validate_config  # noqa: E402

# One sentence on the terminal per failed step (its log has the rest), and Ctrl-C told from a failure:
# the terminal itself is the logger plugin profiles/ name (snakemake_logger_plugin_gemma_edge).
terminal.install(workflow)

# A run killed outright (SIGKILL: the OOM killer, a power cut) leaves its lock on this folder, and
# snakemake would refuse the same command: taken over when no other snakemake works here (stale_lock).
# Only by the run itself: a cluster job reads this file too, on a node that cannot see the run.
if workflow.is_main_process and stale_lock.take_over():
    print("Removed the lock a killed snakemake run left on this folder: resuming.", file=sys.stderr)


# config.yaml beside this Snakefile holds the defaults, found from any working directory; Snakemake
# merges --configfile files and --config values over it. Then the schema validates it and fills
# the keys left out (a bad key stops the run with one sentence naming it).
configfile: Path(workflow.basedir) / "config.yaml"


validate_config(config, Path(workflow.basedir) / "schemas/config.schema.yaml")


include: "rules/common.smk"
include: "rules/perf_common.smk"
include: "rules/demo.smk"
include: "rules/download.smk"
include: "rules/export.smk"
include: "rules/quantize.smk"
include: "rules/lower.smk"
include: "rules/verify.smk"
include: "rules/deploy.smk"
include: "rules/litert.smk"
include: "rules/report.smk"
include: "rules/perf.smk"
include: "rules/quality.smk"


rule all:
    default_target: True
    input:
        parity_path(),


# `snakemake perf`: the configured model and variant's performance table (rules/perf.smk).
rule perf:
    input:
        perf_path(),
    localrule: True


# `snakemake projection`: every step's cost, extrapolated by parameter count to full depth.
rule projection:
    input:
        projection_path(),
    localrule: True


onsuccess:
    print(terminal.done_message(workflow.dag.targetjobs))


onerror:
    print(terminal.run_failed_message(log))
