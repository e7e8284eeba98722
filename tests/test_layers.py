"""The package's layers (docs/architecture.md): which code runs where, and what each may import.

Lowest first. A module imports modules of its own layer and of layers below it, never above, so a
layer can be read, tested and moved without the ones above it. The device layer runs on the device
as uploaded, so it imports only the standard library, the runtime the device installs (torch,
executorch with its tokenizers, litert_lm) and itself. Imports inside functions count: a circle
or a wrong-way import there works only until someone moves it to the top.
"""

import ast
import sys

import pytest

from conftest import REPO
from gemma_edge.reach import runner

PACKAGE = REPO / "src" / "gemma_edge"
LAYERS = ("device", "workflow", "model", "build", "peers", "measure", "reach", "steps")
DEVICE_MAY_IMPORT = set(sys.stdlib_module_names) | {"torch", "executorch", "pytorch_tokenizers", "litert_lm", "gemma_edge"}


def module_name(path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imported(path) -> set[str]:
    """Every module `path` imports, at any depth of its code, as absolute dotted names."""
    inside = path.is_relative_to(PACKAGE.parent)  # a step script imports absolutely only
    package = (module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_name(path)) if inside else ""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            # `from gemma_edge.device import files` imports the module gemma_edge.device.files
            names.update(
                f"{base}.{alias.name}" if base.count(".") < 2 and base.startswith("gemma_edge") else base for alias in node.names
            )
    return names


def layer_of(name: str) -> str | None:
    """The layer of a gemma_edge module (None for gemma_edge itself or anything outside it)."""
    parts = name.split(".")
    if parts[0] != "gemma_edge" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LAYERS else f"unknown:{parts[1]}"


def modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def graph() -> dict[str, set[str]]:
    return {module_name(p): {n for n in imported(p) if n.startswith("gemma_edge.")} for p in modules()}


def import_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle once, as the module path from its alphabetically first module back to it."""
    circles = []

    def walk(start, path):
        for name in sorted(edges.get(path[-1], ())):
            if name == start:
                circles.append(path + [start])
            elif name > start and name not in path:
                walk(start, path + [name])

    for start in sorted(edges):
        walk(start, [start])
    return circles


def test_the_checks_find_what_they_look_for(tmp_path):
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []
    source = PACKAGE / "device" / "files.py"
    assert "json" in imported(source) and "gemma_edge.workflow.manifest" not in imported(source)
    manifest = imported(PACKAGE / "workflow" / "manifest.py")
    assert "gemma_edge.device.files" in manifest
    assert layer_of("gemma_edge.device.files") == "device" and layer_of("torch") is None


def test_every_module_sits_in_a_known_layer():
    stray = [module_name(p) for p in modules() if layer_of(module_name(p)) not in (*LAYERS, None)]
    assert stray == [], f"modules outside the layers {LAYERS}: {stray}"
    assert {layer_of(module_name(p)) for p in modules()} - {None} == set(LAYERS)


def test_no_layer_imports_a_higher_one():
    wrong = []
    for name, targets in graph().items():
        here = LAYERS.index(layer_of(name)) if layer_of(name) else len(LAYERS)
        wrong += [f"{name} -> {t}" for t in targets if layer_of(t) in LAYERS and LAYERS.index(layer_of(t)) > here]
    assert wrong == []


def test_modules_import_one_another_without_a_circle():
    assert import_circles(graph()) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "device").glob("*.py")), ids=lambda p: p.name)
def test_the_device_imports_only_its_runtime_and_itself(path):
    outside = sorted(
        n for n in imported(path) if n.split(".")[0] not in DEVICE_MAY_IMPORT or (layer_of(n) not in (None, "device"))
    )
    assert outside == [], f"{path.name} would fail on a device, which has only the uploaded device package"


def test_the_device_gets_the_whole_device_package():
    uploaded = {p.relative_to(PACKAGE.parent).as_posix() for p in runner.runner_files()}
    assert uploaded == {
        "gemma_edge/__init__.py",
        *(p.relative_to(PACKAGE.parent).as_posix() for p in (PACKAGE / "device").glob("*.py")),
    }
    assert "gemma_edge/device/device_bench.py" in uploaded


@pytest.mark.parametrize("script", sorted((REPO / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_every_step_script_goes_through_the_steps(script):
    """A step script unpacks what Snakemake hands it and calls gemma_edge.steps, the one way in
    (its log comes from gemma_edge.workflow.steplog)."""
    allowed = ("gemma_edge.steps", "gemma_edge.workflow.steplog")
    others = sorted(n for n in imported(script) if n.startswith("gemma_edge") and not n.startswith(allowed))
    assert others == []


def test_every_name_imported_from_the_package_exists():
    """What the package, its logger plugin, the step scripts, the benchmark tools and the tests
    import from gemma_edge is there, at any depth of their code (an import inside a function fails
    only when it runs)."""
    import importlib

    missing = []
    plugin = PACKAGE.parent / "snakemake_logger_plugin_gemma_edge"
    for path in sorted(
        {
            *PACKAGE.rglob("*.py"),
            *plugin.glob("*.py"),
            *(REPO / "scripts").glob("*.py"),
            *(REPO / "bench").glob("*.py"),
            *(REPO / "tests").glob("*.py"),
        }
    ):
        if "__pycache__" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("gemma_edge"):
                module = importlib.import_module(node.module)
                missing += [
                    f"{path.relative_to(REPO)}: {node.module}.{alias.name}"
                    for alias in node.names
                    if not hasattr(module, alias.name)
                    and not (hasattr(module, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}"))
                ]
    assert missing == []
