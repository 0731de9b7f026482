"""The package's structure holds: what ``import kdgqa`` and the CLI's help load, no import
circles and no private names imported across modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "kdgqa"


def _imported(code: str) -> set[str]:
    """Module names that running ``code`` in a fresh interpreter imports (-X importtime)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code],
                          capture_output=True, text=True, timeout=300, check=True)
    names = set()
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_import_kdgqa_loads_neither_torch_nor_the_study_stack():
    loaded = _imported("import kdgqa")
    assert "kdgqa" in loaded
    assert not {n for n in loaded if n.startswith("kdgqa.study")}
    assert "torch" not in loaded


def test_core_api_loads_no_study_module():
    loaded = _imported("import kdgqa; kdgqa.GroupedQueryAttention; kdgqa.convert; kdgqa.load;"
                       " kdgqa.export_mha; kdgqa.available_schemes")
    assert "torch" in loaded
    assert not {n for n in loaded if n.startswith("kdgqa.study")}


def test_cli_parser_imports_no_torch_timm_or_transformers():
    loaded = _imported("from kdgqa.cli import build_parser; build_parser()")
    assert not loaded & {"torch", "timm", "transformers"}


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _imports(tree: ast.Module, *, top_level: bool) -> list[ast.ImportFrom | ast.Import]:
    nodes = tree.body if top_level else list(ast.walk(tree))
    found: list[ast.ImportFrom | ast.Import] = []
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks never run
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
    return found


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for name, tree in _modules().items():
        for node in _imports(tree, top_level=False):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdgqa"):
                offenders += [f"{name}: {node.module}.{a.name}" for a in node.names
                              if a.name.startswith("_") and a.name != "__version__"]
    assert not offenders


def test_module_imports_form_no_circle():
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        targets = set()
        for node in _imports(tree, top_level=True):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kdgqa"):
                base = node.module or ""
                for alias in node.names:  # `from kdgqa.schemes import static` is a module
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("kdgqa")}
        graph[name] = {t for t in targets if t in modules and t != name}

    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path, node, nxt]))
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


#: ``kdgqa.__all__`` before the package was reorganised into layers: all must still import.
PUBLIC_BEFORE_THE_REDESIGN = [
    "SCHEMES", "ConversionError", "ExperimentConfig", "GroupedQueryAttention", "QueryAllocator",
    "__version__", "apportion", "available_schemes", "build_allocator", "convert",
    "counts_to_kv_index", "create_timm_vit", "even_counts", "export_mha", "load", "load_config",
    "load_model", "proportional_counts", "run_experiment", "save_pretrained",
    "set_stats_reducer", "start_epoch", "write_report",
]


def test_every_public_name_of_before_still_imports():
    import kdgqa

    assert set(PUBLIC_BEFORE_THE_REDESIGN) <= set(kdgqa.__all__)
    for name in kdgqa.__all__:
        assert getattr(kdgqa, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from kdgqa import *", namespace)  # the star import is the point
    assert set(kdgqa.__all__) <= set(namespace)
