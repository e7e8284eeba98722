"""Validate the workflow config against its JSON schema, with one clear sentence per problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def load_schema(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text(encoding="utf-8"))


def _key_path(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


# Keys that did nothing, removed: what a config that still has one is told instead of "unknown key".
REMOVED_KEYS = {
    "export.dtype": "the export is always float32 and quantization.group_size makes the INT4 variant; delete the key",
}


def describe_error(error) -> str:
    """Turn a jsonschema error into one sentence that names the offending key."""
    where = list(error.absolute_path)
    if error.validator == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        removed = [path for path in (_key_path(where + [k]) for k in extra) if path in REMOVED_KEYS]
        if removed:
            return f"config: {removed[0]} was removed: {REMOVED_KEYS[removed[0]]}"
        names = ", ".join(_key_path(where + [k]) for k in extra)
        return f"config: unknown key {names}"
    if error.validator == "required":
        return f"config: {_key_path(where)} is missing the required key {error.message.split()[0]}"
    if error.validator == "enum":
        allowed = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in error.validator_value)
        return f"config: {_key_path(where)} is {error.instance!r}, but must be one of {allowed}"
    if error.validator == "type":
        return f"config: {_key_path(where)} is {error.instance!r}, but must be of type {error.validator_value}"
    return f"config: {_key_path(where)}: {error.message}"


def validate_config(config: dict, schema_path: Path) -> dict:
    """Fill `config`'s absent keys with the schema's defaults, in place, and return it; or raise
    ConfigError naming the first bad key.

    Snakemake's `validate(..., set_default=True)` fills the defaults (models' entries included).
    Its error is jsonschema's whole report; the same validator's errors are read here first, so a
    bad key is one sentence naming it."""
    import jsonschema
    from snakemake.utils import validate

    validator = jsonschema.Draft202012Validator(load_schema(schema_path))
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(describe_error(errors[0]))
    validate(config, str(Path(schema_path).resolve()), set_default=True)
    if config["model"] not in config["models"]:
        known = ", ".join(sorted(config["models"]))
        raise ConfigError(f"config: model is {config['model']!r}, which is not an entry of models (known: {known})")
    clashes = sorted(set(config["targets"]) & (set(config["models"]) | {"demo-hub", "perf"}))
    if clashes:
        raise ConfigError(
            f"config: targets.{clashes[0]} has the name of a model (or demo-hub, perf); both live under results/, rename it"
        )
    unknown = [m for m in config["perf"]["projection"]["models"] if m not in config["models"]]
    if unknown:
        raise ConfigError(f"config: perf.projection.models names {unknown[0]!r}, which is not an entry of models")
    shapes = {(config["models"][m]["synthetic"] or {}).get("shape") for m in config["perf"]["projection"]["models"]}
    if len(shapes) != 1 or None in shapes:
        raise ConfigError(
            "config: perf.projection.models must all be synthetic models of one shape "
            "(models.<name>.synthetic.shape), the shape the projection extends to full depth"
        )
    unknown = [t for t in config["sweep"]["targets"] if t not in config["targets"]]
    if unknown:
        raise ConfigError(f"config: sweep.targets names {unknown[0]!r}, which is not an entry of targets")
    entry = config["models"][config["model"]]
    if entry["local_path"] and not Path(entry["local_path"]).is_dir():
        raise ConfigError(f"config: models.{config['model']}.local_path {entry['local_path']!r} is not a directory")
    return config


def step_memory_mb(config: dict, model: str, step: str) -> int:
    """The peak MB Snakemake reserves for a heavy `step` on `model`: the model entry's own
    memory_mb figure where it has one, else the top-level memory_mb (sized for the demo model)."""
    return config["models"][model].get("memory_mb", {}).get(step, config["memory_mb"][step])


# Context checks. Each is made by the rule that needs it, while Snakemake builds the jobs (so
# before any job runs, and only for what the requested targets need): a prompt plus its new
# tokens must fit the exported context, or the runtime fails deep inside with an error code.


def check_lengths_fit(config: dict, section: str) -> None:
    """`bench` or `perf`: its longest prompt plus its new tokens within export.max_seq_len."""
    longest = max(config[section]["prompt_lengths"]) + config[section]["new_tokens"]
    if longest > config["export"]["max_seq_len"]:
        raise ConfigError(
            f"config: {section}.prompt_lengths + {section}.new_tokens ({longest}) exceed "
            f"export.max_seq_len ({config['export']['max_seq_len']})"
        )


def prompt_token_counts(tokenizer_path: Path, prompts: list[str]) -> list[int]:
    """Positions each prompt takes: its tokens with BOS (added if the tokenizer does not)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return [
        max(len(tokenizer.encode(p, add_special_tokens=True).ids), len(tokenizer.encode(p, add_special_tokens=False).ids) + 1)
        for p in prompts
    ]


def checkpoint_prompt_counts(checkpoint_manifest: Path, prompts: list[str]) -> list[int] | None:
    """prompt_token_counts with the tokenizer of a downloaded checkpoint (its record,
    results/<model>/checkpoint.json), or None before the download or for a checkpoint without a
    tokenizer.json."""
    manifest = Path(checkpoint_manifest)
    if not manifest.exists():
        return None
    tokenizer = Path(json.loads(manifest.read_text(encoding="utf-8"))["path"]) / "tokenizer.json"
    return prompt_token_counts(tokenizer, prompts) if tokenizer.exists() else None


def check_prompts_fit(prompts: list[str], counts: list[int] | None, max_new_tokens: int, max_seq_len: int) -> None:
    """verify.prompts: each prompt's positions plus verify.max_new_tokens within max_seq_len.
    Without token counts (the tokenizer is not downloaded yet) a prompt takes at least two (BOS
    and one token); the context_check step counts them exactly before the model's first export,
    and the verify step before it loads anything."""
    bound = "" if counts else "at least "
    counts = counts or [2] * len(prompts)
    for index, (prompt, count) in enumerate(zip(prompts, counts)):
        if count + max_new_tokens > max_seq_len:
            raise ConfigError(
                f"config: verify.prompts[{index}] ({prompt[:40]!r}, {bound}{count} tokens) plus verify.max_new_tokens "
                f"({max_new_tokens}) exceed export.max_seq_len ({max_seq_len}): shorten the prompt, lower "
                "max_new_tokens or raise max_seq_len"
            )


# A device target's housekeeping keys: how it shares the device and its storage, never what a
# result is. The rules leave them out of the device steps' params (device_settings in
# rules/common.smk) and the step scripts read them from the config (reach/target.py, Housekeeping), so
# changing one re-runs no step.
HOUSEKEEPING_KEYS = ("keep_models", "keep_wheelhouse", "lock_timeout_s")


def requirement_pins(path: Path) -> dict[str, str]:
    """name -> version of each `name==version` line of a pip requirements file (comments, options
    and `-r` includes skipped), names in their normal form (lower case, `-` for `_` and `.`)."""
    pins = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = (part.strip() for part in line.split("==", 1))
            pins[normal_name(name)] = version
    return pins


def normal_name(name: str) -> str:
    """A package name in its normal form (PEP 503): lower case, runs of `-`, `_` and `.` as one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()
