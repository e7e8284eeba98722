"""Write docs/config.md, the reference of every config key, from the config schema, so the two
cannot disagree: one `##` section per top-level key, one table row per key (dotted path, type and
allowed values, default, description), in schema order.

    .venv/bin/python -m gemma_edge.workflow.config_reference                 # print it
    .venv/bin/python -m gemma_edge.workflow.config_reference --write docs/config.md
    .venv/bin/python -m gemma_edge.workflow.config_reference --check docs/config.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from gemma_edge.device.files import atomic_output
from gemma_edge.workflow.config import load_schema

REPO = Path(__file__).resolve().parents[3]
SCHEMA = REPO / "schemas/config.schema.yaml"
PAGE = "docs/config.md"
COMMAND = f".venv/bin/python -m gemma_edge.workflow.config_reference --write {PAGE}"
TYPE_OF = {bool: "boolean", int: "integer", float: "number", str: "string", type(None): "null"}

OVERRIDES = """\
To change a key, leave `config.yaml` alone: put the keys to change in a YAML file of overrides and
pass it with `snakemake --configfile overrides.yaml`. Snakemake merges it over `config.yaml` key by
key (nested keys merge, so `quantization: {group_size: 64}` keeps `quantization.embeddings`; later
files win), then the schema validates the result and fills every key left out with its default
below. `--config key=value` suits top-level strings only (`--config model=gemma-4-E2B`): it reads
a nested value as one string. A path `models.<name>.…` is a key of one entry of a map whose entry
names you choose."""


def resolve(root: dict, node: dict) -> dict:
    """`node` with a local `$ref` (`#/$defs/...`) replaced by its target; keywords beside the
    `$ref` win over the target's."""
    while "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/"):
            raise ValueError(f"only local $refs are supported, not {ref!r}")
        target = root
        for part in ref[2:].split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def compact(value: object) -> str:
    """A value as written in YAML flow style: strings bare (but for an empty one), the rest as JSON."""
    return value if isinstance(value, str) and value else json.dumps(value, ensure_ascii=False)


def type_names(node: dict) -> list[str]:
    types = node.get("type") or [TYPE_OF[type(v)] for v in node.get("enum", [])]
    return list(dict.fromkeys([types] if isinstance(types, str) else types))


BOUNDS = {
    "minimum": "≥ {}",
    "maximum": "≤ {}",
    "exclusiveMinimum": "> {}",
    "exclusiveMaximum": "< {}",
    "minLength": "length ≥ {}",
    "minItems": "≥ {} items",
    "pattern": "matches `{}`",
}


def constraints(node: dict) -> list[str]:
    """The values `node` allows beyond its type: enum, bounds, lengths, pattern."""
    out = ["one of " + ", ".join(f"`{compact(v)}`" for v in node["enum"])] if "enum" in node else []
    if "minimum" in node and "maximum" in node:
        out.append(f"{node['minimum']} to {node['maximum']}")
        node = {k: v for k, v in node.items() if k not in ("minimum", "maximum")}
    out += [text.format(node[key]) for key, text in BOUNDS.items() if key in node]
    out += ["no repeats"] * bool(node.get("uniqueItems"))
    if "pattern" in node.get("propertyNames", {}):
        out.append(f"names match `{node['propertyNames']['pattern']}`")
    return out


def type_text(root: dict, node: dict) -> str:
    names = type_names(node)
    items = resolve(root, node.get("items", {}))
    if "array" in names and items:
        names[names.index("array")] = "array of " + (" or ".join(type_names(items)) or "any")
    return "; ".join([" or ".join(names) or "any"] + constraints(node) + [f"each {c}" for c in constraints(items)])


def condition(if_schema: dict) -> str:
    """`when kind is ssh` for an `if` on a property's value; "" for one on the node's own type."""
    tests = [f"{k} is {compact(v['const'])}" for k, v in if_schema.get("properties", {}).items() if "const" in v]
    return " when " + " and ".join(tests) if tests else ""


def rows(root: dict, node: dict, path: str, required: str | None = None) -> Iterator[tuple[str, str, str, str]]:
    """(dotted path, type, default, description) of `node` and of every key under it; `required` is
    None for an optional key, else the condition ("" for always) under which it is required."""
    node = resolve(root, node)
    default = compact(node["default"]) if "default" in node else None
    shown = f"`{default}`" if default is not None else "required" + required if required is not None else "—"
    yield path, type_text(root, node), shown, " ".join(node.get("description", "").split())
    properties, needed = dict(node.get("properties", {})), {k: "" for k in node.get("required", [])}
    for part in [node, *(resolve(root, p) for p in node.get("allOf", []))]:
        if "if" in part and "then" in part:  # `then`'s keys are documented under this key
            then = resolve(root, part["then"])
            properties.update({k: v for k, v in then.get("properties", {}).items() if k not in properties})
            needed.update({k: condition(resolve(root, part["if"])) for k in then.get("required", []) if k not in needed})
    for key, child in properties.items():
        yield from rows(root, child, f"{path}.{key}", needed.get(key))
    if isinstance(node.get("additionalProperties"), dict):  # a map: entries under names you choose
        yield from rows(root, node["additionalProperties"], f"{path}.<name>")


def cell(text: str) -> str:
    """Text safe in a table cell: `|` escaped; `<` and `*` escaped outside code spans."""
    parts = text.split("`")
    parts[::2] = [re.sub(r"([<*])", lambda m: "&lt;" if m[1] == "<" else r"\*", p) for p in parts[::2]]
    return "`".join(parts).replace("|", r"\|")


def render(schema: dict, source: str = "schemas/config.schema.yaml") -> str:
    """The whole page for `schema` (read from `source`, which the notice names)."""
    lines = [
        "# Configuration reference",
        "",
        f"Generated from {source} by `{COMMAND}`; edit the schema, not this page.",
        "",
        " ".join(schema.get("description", "").split()),
        "",
        OVERRIDES,
        "",
    ]
    required = set(schema.get("required", []))
    for key, node in schema.get("properties", {}).items():
        lines += [f"## `{key}`", "", "| key | type | default | description |", "| --- | --- | --- | --- |"]
        for path, kind, default, description in rows(schema, node, key, "" if key in required else None):
            lines.append(f"| {cell(f'`{path}`')} | {cell(kind)} | {cell(default)} | {cell(description)} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma_edge.workflow.config_reference", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", type=Path, metavar="PATH", help="write the page to PATH (atomically)")
    action.add_argument("--check", type=Path, metavar="PATH", help="exit 1 if PATH differs from the page")
    args = parser.parse_args(argv)
    page = render(load_schema(SCHEMA), SCHEMA.relative_to(REPO).as_posix())
    if args.write:
        with atomic_output(args.write) as tmp:
            tmp.write_text(page, encoding="utf-8", newline="\n")
    elif args.check:
        current = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
        if current != page:
            print(
                f"{args.check} is out of date with {SCHEMA.relative_to(REPO)}: regenerate it with `{COMMAND}`.", file=sys.stderr
            )
            return 1
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
