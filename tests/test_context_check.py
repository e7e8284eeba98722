"""A context overflow on a fresh clone is refused as soon as the model's tokenizer exists, before
export (rule context_check, rules/export.smk), and a later change of verify.max_new_tokens re-runs
neither that check nor export: from then on the tokenizer exists and the check happens as the run
is planned (verify_prompts, rules/common.smk)."""

import re

import pytest

from conftest import snakemake, write_config
from test_workflow import jobs_of

# The sentence verify itself would give after export, quantize and lower (gemma_edge.workflow.config.check_prompts_fit).
OVERFLOW = re.compile(
    r"config: verify\.prompts\[\d+\] \('[^']*', \d+ tokens\) plus verify\.max_new_tokens \(120\) exceed "
    r"export\.max_seq_len \(128\): shorten the prompt, lower max_new_tokens or raise max_seq_len"
)
# What export and every later step of the default target write first: their logs and benchmark files.
LATER_STEPS = ("fp32", "int4-g128")


@pytest.mark.e2e
def test_a_fresh_clone_refuses_an_overflow_before_export_and_a_later_fix_reruns_no_export(tmp_path):
    workdir = tmp_path / "clone"
    workdir.mkdir()
    overflow = write_config(tmp_path / "long.yaml", {"verify": {"max_new_tokens": 120}})
    fits = write_config(tmp_path / "fits.yaml", {"verify": {"max_new_tokens": 20}})

    # Planned with no tokenizer yet (only a lower bound holds): the demo model is trained and
    # downloaded, then its tokenizer counts the prompts and the run stops there.
    refused = snakemake(workdir, "--cores", "2", "--configfile", str(overflow), check=False)
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0, output[-3000:]
    assert len(OVERFLOW.findall(output)) == 1, output[-3000:]
    assert re.search(
        r"^context_check failed: config: verify\.prompts\[\d+\] .*\(full log: logs/demo/context_check\.log\)$", output, re.M
    )
    assert "Traceback" not in output and "RuleException" not in output
    assert (workdir / "results/demo/checkpoint.json").exists()
    assert not (workdir / "results/demo/fp32/program.pt2").exists()
    for top in ("results", "logs", "benchmarks"):
        for step in LATER_STEPS:
            assert not (workdir / top / "demo" / step).exists(), f"{top}/demo/{step}"
    assert not re.search(r"\(Rule: (export|quantize|lower|verify)\)", output)

    # Back to a value that fits: the check passes and export runs, once.
    built = snakemake(workdir, "--cores", "2", "results/demo/fp32/program.pt2")
    assert re.search(r"\(Rule: context_check\)", built.stdout + built.stderr)
    assert (workdir / "results/demo/fp32/program.pt2").exists()

    # Now the plan itself counts with the tokenizer: another value that fits needs neither the check
    # nor export again (only the steps after export, which have not run yet), and the overflow is
    # refused before any job.
    for override in ([], ["--configfile", str(fits)]):
        dry = snakemake(workdir, "-n", *override)
        assert jobs_of(dry.stdout) == {"quantize": 1, "lower": 1, "verify": 1, "all": 1}, dry.stdout[-3000:]
    planned = snakemake(workdir, "-n", "--configfile", str(overflow), check=False)
    output = planned.stdout + planned.stderr
    assert planned.returncode != 0 and len(OVERFLOW.findall(output)) == 1, output[-3000:]
    assert "Job stats" not in output
