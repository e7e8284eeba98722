"""The README's commands, as written: each is run verbatim by .ci/run or by a test, or it is one
that docs/testing.md names as not runnable on this machine, with the reason."""

from __future__ import annotations

import re
import subprocess

import pytest

from readme import EMULATOR_SECTION, REPO, fresh_checkout, readme_commands, run_readme_line

CI = REPO / ".ci/run"
TESTING = REPO / "docs/testing.md"

# Run as written by the end-to-end test below, in a fresh copy of the checkout.
RUN_HERE = {
    "Run the embedded default": [".venv/bin/snakemake --cores 2"],
    "Changing the group size": [
        "printf 'quantization:\\n  group_size: 64\\n' > g64.yaml",
        ".venv/bin/snakemake --cores 2 --configfile g64.yaml",
    ],
}


def not_runnable_here() -> dict[str, str]:
    """docs/testing.md's table of README commands not run on this machine: {command: reason}."""
    table = TESTING.read_text().split("## README commands not run here", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(.+?)` \| (.+?) \|$", table, flags=re.M))


def test_the_parser_reads_sections_blocks_continuations_and_skips_comments():
    text = "## A\nx\n```sh\n# a comment\nrun one \\\n    --flag\n```\n## B\n```\nnot sh\n```\n```sh\nrun two\n```\n"
    assert readme_commands(text) == {"A": ["run one --flag"], "B": ["run two"]}


def test_every_readme_command_is_run_by_ci_or_a_test_or_says_why_not():
    ci = {line.strip() for line in CI.read_text().splitlines()}
    unrunnable = not_runnable_here()
    commands = readme_commands()
    unaccounted = []
    for section, lines in commands.items():
        for line in lines:
            by_fixture = section == EMULATOR_SECTION and "-m gemma_edge.reach.emulator " in line  # tests/test_emulated.py
            packages = line.startswith("apt-get install")  # the next test: .ci/run installs them
            if not (line in ci or line in RUN_HERE.get(section, []) or line in unrunnable or by_fixture or packages):
                unaccounted.append(f"{section}: {line}")
    assert not unaccounted, f"README commands neither run nor explained in docs/testing.md: {unaccounted}"
    for section, lines in RUN_HERE.items():
        assert commands.get(section) == lines, f"README's '{section}' commands changed: update RUN_HERE"
    shown = {line for lines in commands.values() for line in lines}
    assert set(unrunnable) <= shown, f"docs/testing.md explains commands the README no longer shows: {set(unrunnable) - shown}"
    assert all(reason.strip() for reason in unrunnable.values())


def test_ci_installs_every_debian_package_the_readme_names():
    wanted = [line for lines in readme_commands().values() for line in lines if line.startswith("apt-get install")]
    assert wanted, "the README names no Debian packages any more"
    apt_line = CI.read_text().split("apt-get install", 1)[1].split(">/dev/null", 1)[0]
    installed = set(re.findall(r"[a-z0-9][a-z0-9.+-]+", apt_line))
    for line in wanted:
        packages = {word for word in line.split()[2:] if not word.startswith("-")}
        assert packages <= installed, f".ci/run does not install {packages - installed}"


@pytest.mark.e2e
def test_the_default_run_and_a_group_size_change_as_the_readme_shows_them(tmp_path):
    checkout = fresh_checkout(tmp_path / "checkout")
    (default,) = RUN_HERE["Run the embedded default"]
    run_readme_line(default, checkout)
    assert (checkout / "results/demo/int4-g128/xnnpack-auto/parity.json").exists()
    again = run_readme_line(default, checkout)
    assert "Nothing to be done" in again.stdout + again.stderr
    # The checkout copied whole with its timestamps, as `cp -a` does: nothing to do there either,
    # the demo model's rule included (its corpus is recorded relative to the working directory).
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(checkout), str(moved)], check=True)
    dry_run = run_readme_line(f"{default} -n", moved)
    assert "Nothing to be done" in dry_run.stdout + dry_run.stderr, dry_run.stdout[-3000:]

    results = [path for path in (checkout / "results").rglob("*") if path.is_file()]
    before = {path: path.stat().st_mtime_ns for path in results}
    timed_before = set((checkout / "benchmarks").rglob("*.tsv"))
    for line in RUN_HERE["Changing the group size"]:
        run_readme_line(line, checkout)
    timed = set((checkout / "benchmarks").rglob("*.tsv")) - timed_before
    ran = {path.relative_to(checkout / "benchmarks").as_posix() for path in timed}
    assert ran == {"demo/int4-g64/quantize.tsv", "demo/int4-g64/xnnpack-auto/lower.tsv", "demo/int4-g64/xnnpack-auto/verify.tsv"}
    assert (checkout / "results/demo/int4-g64/xnnpack-auto/parity.json").exists()
    rewritten = [path for path, mtime in before.items() if path.stat().st_mtime_ns != mtime]
    assert not rewritten, f"a group-size change rewrote {rewritten}"
