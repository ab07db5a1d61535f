"""Imports go one way: engine uses data/ and mining/, never the reverse (issue 14).

The shared helpers both sides need (``kdistill.distributed``, ``kdistill.console``,
``kdistill.images``) are leaves: they import nothing from the package's layers. Inside
``data/``, each stage imports only the stages below it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "kdistill"
LAYERS = ("data", "mining", "engine", "methods")


def imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of the ``kdistill`` modules ``path`` imports (top level or inside
    functions), with ``from .x import y`` also naming ``...x.y`` (y may be a module)."""
    package = ["kdistill", *path.relative_to(PKG).with_suffix("").parts[:-1]]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {n for n in names if n == "kdistill" or n.startswith("kdistill.")}


def in_layer(name: str, layer: str) -> bool:
    return name == f"kdistill.{layer}" or name.startswith(f"kdistill.{layer}.")


@pytest.mark.parametrize("source, name", [
    ("from ..engine import distributed as dist\n", "kdistill.engine.distributed"),
    ("def f():\n    from ..engine.callbacks import log\n", "kdistill.engine.callbacks"),
    ("import kdistill.engine.run\n", "kdistill.engine.run"),
    ("from kdistill import engine\n", "kdistill.engine"),
])
def test_the_check_sees_relative_absolute_and_nested_imports(source, name):
    assert name in imported_modules(PKG / "data" / "probe.py", source)


@pytest.mark.parametrize("layer", ["data", "mining"])
def test_data_and_mining_do_not_import_engine(layer):
    bad = {f"{path.relative_to(PKG.parent)}: {name}"
           for path in sorted((PKG / layer).rglob("*.py"))
           for name in imported_modules(path) if in_layer(name, "engine")}
    assert not bad, "kdistill.engine imported from below it:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("leaf", ["distributed.py", "console.py", "images.py"])
def test_shared_helpers_are_leaves(leaf):
    bad = {name for name in imported_modules(PKG / leaf) for layer in LAYERS if in_layer(name, layer)}
    assert not bad, f"kdistill/{leaf} must not import the package's layers: {sorted(bad)}"



#: data/ in three stages, each importing only the stages below it (issue 14): sources (which
#: files; the readers of sharded formats it routes to, shards and arrow, sit just below it),
#: datasets (how an item is made; views and softlabels make items too), loader (how batches
#: are formed). transforms holds the pixel operations items use; it imports no stage.
DATA_STAGE = {"shards": -1, "arrow": -1, "fmnist": -1, "sources": 0, "transforms": 0, "datasets": 1,
              "views": 1, "softlabels": 1, "streams": 2, "loader": 3}


def data_imports(module: str) -> set[str]:
    """The other ``kdistill.data`` modules (or the package itself) data/``module``.py imports."""
    return {name for name in imported_modules(PKG / "data" / f"{module}.py")
            if in_layer(name, "data") and not name.startswith(f"kdistill.data.{module}")}


def stage_of(name: str) -> int | None:
    parts = name.split(".")
    return DATA_STAGE.get(parts[2]) if len(parts) > 2 else None


def test_every_data_module_has_a_stage():
    modules = {p.stem for p in (PKG / "data").glob("*.py")} - {"__init__"}
    assert modules == set(DATA_STAGE), f"give each data module a stage in DATA_STAGE: {modules ^ set(DATA_STAGE)}"


@pytest.mark.parametrize("module", ["shards", "arrow", "fmnist", "transforms"])
def test_bottom_data_modules_import_no_other_data_module(module):
    assert not data_imports(module), f"data/{module}.py imports {sorted(data_imports(module))}"


@pytest.mark.parametrize("module", sorted(DATA_STAGE))
def test_data_modules_import_only_stages_below(module):
    bad = {name for name in data_imports(module)
           if stage_of(name) is None or stage_of(name) >= DATA_STAGE[module]}
    assert not bad, f"data/{module}.py imports data modules not below its stage: {sorted(bad)}"


def test_datasets_does_not_import_loader_nor_loader_sources():
    assert not {n for n in data_imports("datasets") if n.startswith("kdistill.data.loader")}, \
        "data/datasets.py makes items; batches (data/loader.py) are formed above it"
    assert not {n for n in data_imports("loader") if n.startswith("kdistill.data.sources")}, \
        "data/loader.py reaches files only through data/datasets.py"


def test_only_the_commands_import_report():
    """``report/`` sits on top (beside cli.py and demo.py): no layer below imports it."""
    bad = {f"{path.relative_to(PKG.parent)}: {name}"
           for layer in (*LAYERS, "models", "losses", "deploy")
           for path in sorted((PKG / layer).rglob("*.py"))
           for name in imported_modules(path) if in_layer(name, "report")}
    assert not bad, "kdistill.report imported from below it:\n" + "\n".join(sorted(bad))
