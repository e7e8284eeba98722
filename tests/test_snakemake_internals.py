"""What the workflow uses of Snakemake beyond its documented interfaces, pinned on the installed
Snakemake by a real run, so an upgrade that moves one fails here rather than for a user:

- `workflow.is_main_process` (Snakefile: only the run itself takes over a stale lock);
- `workflow.register_resource` (rules/: one bench per device, one host benchmark at a time);
- `workflow.deployment_settings.deployment_method` (rules/common.smk: is --sdm conda on);
- `workflow.execution_settings.no_hooks` (workflow/terminal.py: does `onerror` run: in the run
  itself, not in a job's own Snakemake process);
- `workflow.dag.targetjobs` (Snakefile's `onsuccess`: the files asked for).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, sys
from snakemake_interface_executor_plugins.settings import DeploymentMethod

# One write per line: Snakemake logs from its own thread, and print() writes a line in pieces.
sys.stderr.write(f"main process: {workflow.is_main_process}\\n")
workflow.register_resource("device_probe", 1)


def settings_seen(wildcards):
    # An input function runs in the run's own process once its settings are in place, as the
    # terminal's formatter and rules/common.smk read them.
    seen = {
        "no_hooks": workflow.execution_settings.no_hooks,
        "conda": DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method,
    }
    sys.stderr.write(f"run: {json.dumps(seen)}\\n")
    return []


rule probe:
    input:
        settings_seen,
    output:
        "probe.json",
    resources:
        device_probe=1,
    run:
        # A job's own process (how Snakemake runs `run:` jobs, and every cluster job): hooks off.
        with open(output[0], "w") as handle:
            json.dump({"no_hooks": workflow.execution_settings.no_hooks}, handle)


onsuccess:
    print("targets:", sorted(str(path) for job in workflow.dag.targetjobs for path in job.output))
"""


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "Snakefile").write_text(PROBE)
    snakemake = str(Path(sys.executable).with_name("snakemake"))
    command = [snakemake, "-s", str(tmp_path / "Snakefile"), "-d", str(tmp_path), "--cores", "1", "--forceall", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result


def test_the_internals_the_workflow_reads_are_where_it_reads_them(tmp_path):
    result = run(tmp_path)
    assert "main process: True" in result.stderr
    assert 'run: {"no_hooks": false, "conda": false}' in result.stderr
    assert json.loads((tmp_path / "probe.json").read_text()) == {"no_hooks": True}  # the job's process
    assert "targets: ['probe.json']" in result.stdout


def test_the_rules_see_conda_deployment_asked_for(tmp_path):
    result = run(tmp_path, "--sdm", "conda", "--dry-run")  # a dry run: no conda on this host is needed
    assert 'run: {"no_hooks": false, "conda": true}' in result.stderr
