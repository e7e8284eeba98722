"""Each rule's conda environment pins the same versions as requirements.txt, and runs its rules."""

import re
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

import envs
from conftest import REPO, needs_litert, needs_llamacpp, write_config
from gemma_edge.workflow.config import normal_name

MAIN_REQUIREMENTS = ("requirements.txt", "requirements-bench.txt")
LITERT_REQUIREMENTS = "requirements-litert.txt"


def pinned_requirements(files=(*MAIN_REQUIREMENTS, LITERT_REQUIREMENTS)) -> dict[str, str]:
    """The pins of requirements.txt, the benchmark's requirements-bench.txt (which includes it) and
    LiteRT-LM's requirements-litert.txt (whose shared pins agree: test_litert_venv_shares_the_main_pins)."""
    pins = {}
    for file in files:
        for line in (REPO / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-"):  # -r includes, -e .
                assert "==" in line, f"{file}: {line} is not pinned with =="
                name, version = line.split("==")
                pins[normal_name(name)] = version
    return pins


def env_pins(path: Path) -> dict[str, str]:
    pins = {}
    for entry in envs.env_packages(path):
        assert "==" in entry, f"{path.name}: {entry} is not pinned with =="
        name, version = entry.split("==")
        pins[normal_name(name)] = version
    return pins


def test_every_env_agrees_with_requirements():
    required = pinned_requirements()
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs
    for env in envs:
        for name, version in env_pins(env).items():
            assert name in required, f"{env.name} pins {name}, which requirements*.txt do not"
            assert version == required[name], f"{env.name} pins {name}=={version}, requirements.txt has {required[name]}"
        assert "python=3.11" in yaml.safe_load(env.read_text())["dependencies"]


def rule_blocks(text: str):
    """(name, body) of each rule in a .smk file, including anonymous rules made in loops."""
    for block in re.split(r"\n(?=[ \t]*rule\b)", "\n" + text)[1:]:
        header, _, body = block.strip().partition(":")
        name = header.replace("rule", "").strip() or re.search(r"name:\s*\n?\s*(\S+)", body).group(1)
        yield name, "\n" + textwrap.dedent(body)


def test_every_rule_names_an_existing_env_a_log_and_a_benchmark():
    seen = 0
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for name, rule in rule_blocks(smk.read_text()):
            seen += 1
            env = re.search(r'conda:\s*\n\s*"\.\./(envs/[^"]+)"', rule)
            assert env, f"rule {name} has no conda env"
            assert (REPO / env.group(1)).exists(), f"rule {name}: {env.group(1)} is missing"
            assert re.search(r"\n\s*log:", rule), f"rule {name} has no log"
            # clean_<target> runs each time it is asked: a benchmark file, being an output, would stop that.
            on_demand = name.startswith('f"clean_')
            assert on_demand or re.search(r"\n\s*benchmark:", rule), f"rule {name} has no benchmark"
    assert seen >= 11


def test_litert_venv_shares_the_main_pins():
    """.venv-litert (requirements-litert.txt) reads checkpoints with the same torch, transformers,
    tokenizers and safetensors releases as .venv; a looser torch pin would pull PyPI's CUDA build."""
    main = pinned_requirements(MAIN_REQUIREMENTS)
    litert = pinned_requirements((LITERT_REQUIREMENTS,))
    shared = {name: version for name, version in litert.items() if name in main}
    assert {"torch", "transformers", "tokenizers", "safetensors"} <= set(shared)
    assert shared == {name: main[name] for name in shared}


# Each environment file's rules, run by Snakemake in a virtualenv made from that file alone (tests/envs.py),
# on the demo workflow's artifacts: the stages in the order the workflow's graph needs them, and
# what each asks for. Every rule that names the environment runs, but for those in NOT_RUN.
STAGES = [
    ("download", ["results/tiny/checkpoint.json"]),
    (
        "torch",
        [
            "results/demo-hub/local--gemma4-tiny-3l.json",
            "results/tiny/int4-g128/xnnpack-auto/parity.json",
            "results/tiny/int4-g128/xnnpack-auto/quality.json",
        ],
    ),
    ("litert", ["results/tiny/litert/model-int4-g128.litertlm"]),
    (
        "perf",
        [
            "results/tiny/llamacpp/quality-q4_0.json",
            "results/tiny/llamacpp/quality-q4_k_m.json",
            "results/perf/tiny/int4-g128/xnnpack-auto/perf.md",
        ],
    ),
    ("deploy", ["results/loopback/wheelhouse.json", "results/loopback/bench.json", "results/local/bench.json"]),
    ("report", ["results/summary.csv"]),
]
NOT_RUN = {  # with where the suite runs them instead (in the main virtualenv)
    "clean_loopback": "removes what the other device steps of the same run need: test_deploy runs it",
    "clean_local": "the local target has nothing on a device to remove: test_deploy runs clean_loopback",
    "perf_litert": "LiteRT-LM's host timing, minutes of conversion and timing: test_litert runs it",
    "perf_projection": "the projection needs two perf tables of models of one shape: test_perf runs it",
}
ENV_TARGETS = ["loopback", "local"]


def rules_by_env() -> dict[str, set[str]]:
    """Rule names per environment file, from rules/*.smk (a rule made per target once per target)."""
    found = {}
    for smk in sorted((REPO / "rules").glob("*.smk")):
        for name, rule in rule_blocks(smk.read_text()):
            env = Path(re.search(r'conda:\s*\n\s*"\.\./envs/([^"]+)\.yaml"', rule).group(1)).name
            name = re.sub(r'^f?"|"$', "", name)
            names = {name.replace("{target_name}", target) for target in ENV_TARGETS}
            found.setdefault(env, set()).update(names)
    return found


def rules_run(output: str) -> set[str]:
    """The rules of the jobs Snakemake reports finished."""
    return set(re.findall(r"^Finished jobid: \d+ \(Rule: (\w+)\)$", output, re.MULTILINE))


def test_every_env_is_one_stage_and_every_rule_is_run_or_says_why():
    stages = {env for env, _ in STAGES}
    assert stages == {path.stem for path in (REPO / "envs").glob("*.yaml")}
    assert set(NOT_RUN) <= set().union(*rules_by_env().values())


@pytest.fixture(scope="module")
def env_workdir(workflow, sshd, tmp_path_factory):
    """A copy of the demo workflow's folder, with a synthetic 3-layer model for the demo_checkpoint
    rule, a loopback device to probe and the local target to benchmark on, all kept small."""
    workdir = tmp_path_factory.mktemp("env-workflow")
    shutil.copytree(workflow["workdir"], workdir, symlinks=True, dirs_exist_ok=True)
    overrides = write_config(
        workdir / "envs-test.yaml",
        {
            "models": {"tiny3": {"repo_id": "local/gemma4-tiny-3l", "demo": True, "synthetic": {"shape": "tiny", "layers": 3}}},
            "targets": {
                "loopback": sshd.target(tmp_path_factory.mktemp("env-remote") / "gemma-edge"),
                "local": {"kind": "local", "threads": 2},
            },
            "bench": {"prompt_lengths": [8], "new_tokens": 4, "repetitions": 1, "warmup": 1},
            "perf": {"prompt_lengths": [8], "new_tokens": 4, "repetitions": 1, "litert": False},
            "sweep": {"group_sizes": [128], "per_op_modes": ["auto"], "targets": ["local"]},
            # The default: the workflow fixture's forced one-token method doubles the lowering,
            # and it is not what these environments are tested for.
            "lowering": {"decode_method": "auto"},
        },
    )
    return workdir, [str(workflow["config"]), str(overrides)]


@needs_llamacpp
@needs_litert
def test_each_env_runs_its_rules(env_workdir):
    workdir, configs = env_workdir
    driver = envs.driver_venv(pinned_requirements(MAIN_REQUIREMENTS))
    by_env = rules_by_env()
    for env, targets in STAGES:
        venv = envs.venv_with(env, envs.env_packages(REPO / "envs" / f"{env}.yaml"))
        expected = by_env[env] - set(NOT_RUN)
        result = envs.snakemake_in_env(
            driver,
            venv,
            workdir,
            "--cores",
            "2",
            "--configfile",
            *configs,
            "--allowed-rules",
            *sorted(by_env[env]),
            "--forcerun",
            *sorted(expected),
            "--",
            *targets,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"envs/{env}.yaml could not run its rules:\n{output[-6000:]}"
        assert rules_run(output) == expected, f"envs/{env}.yaml: ran {sorted(rules_run(output))}"
        for target in targets:
            assert (workdir / target).stat().st_size > 0


def test_every_env_takes_torch_from_the_configured_index():
    """torch's CPU index is stated in the schema (wheelhouse.torch_index's default); the env files,
    which cannot read it, and the wheelhouse's own default must say the same."""
    from gemma_edge.reach.wheel_resolver import DEFAULT_TORCH_INDEX
    from gemma_edge.workflow.config import load_schema

    index = load_schema(REPO / "schemas/config.schema.yaml")["properties"]["wheelhouse"]["properties"]["torch_index"]["default"]
    assert index == DEFAULT_TORCH_INDEX
    for path in sorted((REPO / "envs").glob("*.yaml")):
        pip = next((d["pip"] for d in yaml.safe_load(path.read_text())["dependencies"] if isinstance(d, dict)), [])
        urls = [line.split(None, 1)[1] for line in pip if line.startswith("--extra-index-url")]
        if any(normal_name(line.split("==")[0]) == "torch" for line in pip):
            assert urls == [index], path.name
