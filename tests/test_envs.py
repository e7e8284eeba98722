"""Each rule's conda environment pins the same versions as requirements.txt."""

import re
import textwrap
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


MAIN_REQUIREMENTS = ("requirements.txt", "requirements-bench.txt")
LITERT_REQUIREMENTS = "requirements-litert.txt"


def pinned_requirements(files=(*MAIN_REQUIREMENTS, LITERT_REQUIREMENTS)) -> dict[str, str]:
    """The pins of requirements.txt, the benchmark's requirements-bench.txt (which includes it) and
    LiteRT-LM's requirements-litert.txt (whose shared pins agree: test_litert_venv_shares_the_main_pins)."""
    pins = {}
    for file in files:
        for line in (REPO / file).read_text().splitlines():
            line = line.split("#")[0].strip()
            if line and not line.startswith("-r"):
                assert "==" in line, f"{file}: {line} is not pinned with =="
                name, version = line.split("==")
                pins[normalise(name)] = version
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def env_pins(path: Path) -> dict[str, str]:
    spec = yaml.safe_load(path.read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for entry in pip:
        if entry.startswith("-"):
            continue
        assert "==" in entry, f"{path.name}: {entry} is not pinned with =="
        name, version = entry.split("==")
        pins[normalise(name)] = version
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
            assert re.search(r"\n\s*benchmark:", rule), f"rule {name} has no benchmark"
    assert seen >= 11


def test_litert_venv_shares_the_main_pins():
    """.venv-litert (requirements-litert.txt) reads checkpoints with the same torch, transformers,
    tokenizers and safetensors releases as .venv; a looser torch pin would pull PyPI's CUDA build."""
    main = pinned_requirements(MAIN_REQUIREMENTS)
    litert = pinned_requirements((LITERT_REQUIREMENTS,))
    shared = {name: version for name, version in litert.items() if name in main}
    assert {"torch", "transformers", "tokenizers", "safetensors"} <= set(shared)
    assert shared == {name: main[name] for name in shared}
