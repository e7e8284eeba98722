"""docs/config.md is generated from the config schema (gemma_edge.workflow.config_reference): the committed
page must be what the generator writes now, and it must cover every key config.yaml sets."""

from conftest import DEFAULT_CONFIG, REPO
from gemma_edge.workflow.config import load_schema
from gemma_edge.workflow.config_reference import COMMAND, SCHEMA, main, render

PAGE = REPO / "docs/config.md"
MAPS = {"models", "targets"}  # top-level keys whose entries are named by the user: `models.<name>.…`


def leaf_keys(config: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every non-mapping value of `config`, a map's entry names as `<name>`."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            if path in MAPS:
                keys += [k for entry in value.values() for k in leaf_keys(entry, f"{path}.<name>")]
            else:
                keys += leaf_keys(value, path)
        else:
            keys.append(path)
    return sorted(set(keys))


def test_committed_page_is_what_the_generator_writes():
    expected = render(load_schema(SCHEMA))
    assert PAGE.read_text(encoding="utf-8") == expected, f"docs/config.md is out of date with the schema: run `{COMMAND}`"
    assert main(["--check", str(PAGE)]) == 0


def test_check_names_the_regenerate_command_when_the_page_differs(tmp_path, capsys):
    stale = tmp_path / "config.md"
    stale.write_text("# stale\n", encoding="utf-8")
    assert main(["--check", str(stale)]) == 1
    assert COMMAND in capsys.readouterr().err
    assert main(["--write", str(stale)]) == 0 and main(["--check", str(stale)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["config.md"]  # no temporary file left behind


def test_page_documents_every_key_the_shipped_config_sets():
    page = PAGE.read_text(encoding="utf-8")
    keys = leaf_keys(DEFAULT_CONFIG)
    assert "models.<name>.synthetic.layers" in keys and "targets.<name>.host" in keys  # the walk reaches into maps
    missing = [key for key in keys if f"| `{key}` |" not in page]
    assert not missing, f"config.yaml keys without a row in docs/config.md: {missing}"


def test_refs_into_defs_and_enums_render():
    schema = {
        "$defs": {"size": {"type": "integer", "enum": [32, 64], "default": 32, "description": "Weights per | scale."}},
        "properties": {
            "quant": {"type": "object", "description": "Quantization.", "properties": {"group": {"$ref": "#/$defs/size"}}},
            "boxes": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["kind"],
                    "properties": {"kind": {"enum": ["ssh", "local"], "description": "How it is reached."}},
                    "if": {"type": "object"},
                    "then": {"properties": {"port": {"type": ["integer", "null"], "minimum": 1}}},
                },
            },
        },
    }
    page = render(schema)
    assert "## `quant`" in page and "## `boxes`" in page
    assert "| `quant.group` | integer; one of `32`, `64` | `32` | Weights per \\| scale. |" in page
    assert "| `boxes.<name>.kind` | string; one of `ssh`, `local` | required | How it is reached. |" in page
    assert "| `boxes.<name>.port` | integer or null; ≥ 1 | — |  |" in page
