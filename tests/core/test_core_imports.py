"""Imports: no cycles, layers that point one way, loud CLI verb imports, one visible selector registry.

Layers, lowest first (a module may import its own layer and the ones below, never one above):

    core        curate.errors, curate._lazy, curate.schema
    io          curate.io (readers, writers, the feature store)
    pipeline    curate.pipeline, curate.report
    features    curate.features
    consumers   curate.curation, curate.influence
    selectors   curate.selectors
    preference  curate.preference
    cli         curate (the lazy public API), curate.cli, the verb modules (curate.cli.VERB_MODULES),
                curate.testing

The report shares the pipeline's layer: the runner writes ``report.html`` as the last output of a
run, and the report reads only io and ``curate.pipeline.outcome``. The verb
modules (``curate/cli/*.py``) are CLI code: they may use any layer, and nothing below the CLI
imports them. Imports inside one layer are free as long as they form no cycle. Function-level (lazy) imports count like module-level ones for
the layering; an upward one passes only when it is listed in :data:`ALLOWED_UPWARD` with the reason.

The graph is read from the source with ``ast``, resolved the way ``../shared/tools/import_cycles.py``
resolves it (``from pkg import name`` imports ``pkg`` and, when it is a module, ``pkg.name``; a
module importing one of its own parent packages is not an edge).
"""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

import curate
from curate.cli import VERB_MODULES

ROOT = Path(curate.__file__).resolve().parent

LAYERS: tuple[tuple[str, ...], ...] = (
    ("curate.errors", "curate._lazy", "curate.schema", "curate.validation"),
    ("curate.io",),
    ("curate.pipeline", "curate.report"),
    ("curate.features",),
    ("curate.curation", "curate.influence"),
    ("curate.selectors",),
    ("curate.preference",),
    ("curate", "curate.api", "curate.cli", "curate.testing", *VERB_MODULES),
)

# (importer, imported module) -> why a function-level import may point up a layer. Empty: every
# upward need so far was met by moving the shared piece down (the feature store to io, reason
# categories to pipeline.outcome, LM batching and checkpoints to their own feature modules).
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


# ------------------------------------------------------------------------------ the import graph
@dataclasses.dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    lazy: bool  # inside a function (runs when called, not when the module is imported)
    line: int


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_pkg: bool) -> None:
        self.base = module if is_pkg else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[tuple[str, bool, int]] = []

    def _scope(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_Import(self, node: ast.Import) -> None:
        self.found.extend((a.name, self.depth > 0, node.lineno) for a in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            anchor = self.base.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)] if node.level > 1 else anchor
            target = ".".join(anchor + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        self.found.append((target, self.depth > 0, node.lineno))
        self.found.extend((f"{target}.{a.name}", self.depth > 0, node.lineno) for a in node.names)


def import_edges(root: Path) -> tuple[set[str], list[Edge]]:
    """(modules of the package at ``root``, edges between them)."""
    files = {module_name(root, p): p for p in sorted(root.rglob("*.py"))}
    edges: set[Edge] = set()
    for mod, path in files.items():
        visitor = _Imports(mod, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        for target, lazy, line in visitor.found:
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != mod and not mod.startswith(target + "."):
                edges.add(Edge(mod, target, lazy, line))
    return set(files), sorted(edges, key=lambda e: (e.importer, e.line, e.imported))


def find_cycles(edges: list[Edge]) -> list[list[str]]:
    """Groups of modules that import one another (strongly connected components of size > 1)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.importer, set()).add(e.imported)
        graph.setdefault(e.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):  # Tarjan, iteratively (no recursion limit on deep chains)
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return sorted(out)


def layer_of(module: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    """Index of the layer holding ``module`` (the longest matching package wins); a root package
    entry holds only itself, not everything under it."""
    best: tuple[int, int] | None = None
    for i, names in enumerate(layers):
        for name in names:
            inside = module == name or ("." in name and module.startswith(name + "."))
            if inside and (best is None or len(name) > best[1]):
                best = (i, len(name))
    return None if best is None else best[0]


def layer_violations(edges: list[Edge], layers: tuple[tuple[str, ...], ...],
                     allowed: dict[tuple[str, str], str]) -> list[str]:
    out = []
    for e in edges:
        a, b = layer_of(e.importer, layers), layer_of(e.imported, layers)
        if a is None or b is None or b <= a:
            continue
        if e.lazy and (e.importer, e.imported) in allowed:
            continue
        kind = "function-level" if e.lazy else "module-level"
        out.append(f"{e.importer}:{e.line} imports {e.imported} ({kind}), a higher layer")
    return out


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# --------------------------------------------------------------------------- the real package
def test_no_import_cycles_at_module_level():
    _, edges = import_edges(ROOT)
    assert find_cycles([e for e in edges if not e.lazy]) == []


def test_no_import_cycles_through_function_level_imports():
    """What ``../shared/tools/import_cycles.py curate`` checks: a lazy import that closes a cycle is
    a design cycle even though Python can load it."""
    _, edges = import_edges(ROOT)
    assert find_cycles(edges) == []


def test_every_module_has_a_layer():
    modules, _ = import_edges(ROOT)
    assert sorted(m for m in modules if layer_of(m, LAYERS) is None) == []


def test_layers_point_one_way():
    _, edges = import_edges(ROOT)
    assert layer_violations(edges, LAYERS, ALLOWED_UPWARD) == []


def test_allow_list_has_no_stale_entries():
    _, edges = import_edges(ROOT)
    lazy = {(e.importer, e.imported) for e in edges if e.lazy}
    assert sorted(set(ALLOWED_UPWARD) - lazy) == []
    assert all(reason.strip() for reason in ALLOWED_UPWARD.values())


# ------------------------------------------------------------------ the checks can fail at all
def test_cycle_detector_finds_a_cycle_through_a_lazy_import(tmp_path):
    """The shape the runner and the report once had: the runner calls the report lazily and the
    report takes a helper from the runner."""
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "pipeline/__init__.py": "",
        "pipeline/runner.py": "def run():\n    from pkg.report import render\n    return render\n",
        "report/__init__.py": "from pkg.report.render import render\n",
        "report/render.py": "from . import stats\n\ndef render():\n    return stats\n",
        "report/stats.py": "from ..pipeline.runner import run\n",
    })
    _, edges = import_edges(root)
    assert find_cycles([e for e in edges if not e.lazy]) == []
    assert find_cycles(edges) == [["pkg.pipeline.runner", "pkg.report", "pkg.report.render", "pkg.report.stats"]]


def test_cycle_detector_finds_module_level_cycles_and_ignores_parents(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "from pkg import a\n",  # a package importing its child is no cycle
        "a.py": "import pkg.b\n",
        "b.py": "from pkg.a import x\nx = 1\n",
        "c.py": "import pkg\nfrom pkg import b\n",
    })
    _, edges = import_edges(root)
    assert find_cycles([e for e in edges if not e.lazy]) == [["pkg.a", "pkg.b"]]


def test_layer_check_flags_upward_imports_unless_allowed(tmp_path):
    root = _write(tmp_path / "pkg", {
        "__init__.py": "",
        "low/__init__.py": "",
        "low/m.py": "def f():\n    from pkg.high import g\n    return g\n",
        "low/n.py": "import pkg.high\n",
        "high/__init__.py": "from pkg.low import m\n\ndef g():\n    return m\n",
    })
    layers = (("pkg.low",), ("pkg.high",), ("pkg",))
    _, edges = import_edges(root)
    found = layer_violations(edges, layers, {})
    assert found == ["pkg.low.m:2 imports pkg.high (function-level), a higher layer",
                     "pkg.low.n:1 imports pkg.high (module-level), a higher layer"]
    allowed = {("pkg.low.m", "pkg.high"): "test"}
    assert layer_violations(edges, layers, allowed) == ["pkg.low.n:1 imports pkg.high (module-level), a higher layer"]


def test_layer_of_matches_the_longest_package_and_root_only_exactly():
    assert layer_of("curate.report.stats", LAYERS) == 2
    assert layer_of("curate.io.store", LAYERS) == 1
    assert layer_of("curate", LAYERS) == len(LAYERS) - 1
    assert layer_of("curate.newpackage.x", LAYERS) is None
    assert layer_of("curate.cli.features", LAYERS) == len(LAYERS) - 1
    assert layer_of("curate.cli.critiq", LAYERS) == len(LAYERS) - 1


def test_the_shared_cycle_tool_agrees():
    tool = ROOT.parents[1] / "shared" / "tools" / "import_cycles.py"
    if not tool.exists():
        pytest.skip(f"{tool} not found")
    res = subprocess.run([sys.executable, str(tool), str(ROOT)], capture_output=True, text=True, check=False)
    assert (res.returncode, res.stdout) == (0, "")


# ------------------------------------------------------------------------------- moved modules
def test_feature_store_old_path_is_the_same_objects():
    import curate.features.store as old
    import curate.io.store as new

    assert (old.FeatureSet, old.FeatureStore, old.cache_key) == (new.FeatureSet, new.FeatureStore, new.cache_key)


def test_feature_package_registers_its_steps():
    import curate.features  # noqa: F401
    from curate.pipeline.registry import STEPS

    assert {"embed", "grad_features", "warmup", "whiten"} <= set(STEPS)


# ------------------------------------------------------------------------------ the CLI verbs
def test_verb_modules_list_the_verbs_they_export():
    import importlib

    for module, verbs in VERB_MODULES.items():
        assert tuple(c.name for c in importlib.import_module(module).COMMANDS) == verbs, module


def test_a_verb_module_that_fails_to_import_fails_loudly(tmp_path, monkeypatch):
    from curate import _lazy
    from curate.cli import attach_verbs

    _write(tmp_path, {
        "broken_verbs.py": "import curate.no_such_module\n",
        "broken_name.py": "from curate.errors import NoSuchError\n",
        "broken_submodule.py": "import click.no_such_submodule\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    # an installed package that an extra brings: its missing submodule is a bug, not a missing extra
    monkeypatch.setitem(_lazy._HINTS, "click", ("click", "judge"))
    for module in ("broken_verbs", "broken_name", "broken_submodule"):
        with pytest.raises(ImportError, match=f"cannot load the verbs x, y from {module}"):
            attach_verbs(click.Group("t"), {module: ("x", "y")})


def test_the_curate_command_fails_when_a_verb_module_is_broken():
    code = "import sys; sys.modules['curate.cli.report'] = None; from curate.cli import main; main(['--help'])"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode != 0
    assert "cannot load the verbs report from curate.cli.report" in res.stderr


def test_a_missing_optional_extra_keeps_the_verb_and_names_the_extra(tmp_path, monkeypatch):
    from curate.cli import attach_verbs
    from curate.errors import MissingDependencyError

    _write(tmp_path, {
        "judge_verbs.py": "import httpx\n",
        "ml_verbs.py": "from curate._lazy import require\nrequire('torch')\n",
    })
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "httpx", None)  # as if httpx were not installed
    monkeypatch.setitem(sys.modules, "torch", None)
    group = click.Group("t")
    attach_verbs(group, {"judge_verbs": ("judge",), "ml_verbs": ("gradients",)})
    assert sorted(group.commands) == ["gradients", "judge"]
    assert "pip install 'curate[judge]'" in group.commands["judge"].help
    with pytest.raises(MissingDependencyError, match=r"pip install 'curate\[judge\]'"):
        group.main(["judge", "serve", "--port", "1"], standalone_mode=False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'curate\[ml\]'"):
        group.main(["gradients"], standalone_mode=False)


def test_dependency_hints_name_real_extras():
    from curate._lazy import _HINTS, require
    from curate.errors import MissingDependencyError

    pyproject = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    assert {extra for _, extra in _HINTS.values() if extra} <= extras
    with pytest.raises(MissingDependencyError, match=r"\.\[ml\]") as info:
        require("ray.no_such_submodule", "a test")
    assert info.value.name == "ray"


# ------------------------------------------------------------------------ the selector registry
def test_selector_registry_is_one_literal_dict():
    tree = ast.parse((ROOT / "selectors" / "__init__.py").read_text())
    literal = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))
               and "SELECTORS" in [t.id for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                                   if isinstance(t, ast.Name)]]
    assert len(literal) == 1 and isinstance(literal[0].value, ast.Dict)
    from curate.selectors import SELECTORS

    keys = [k.value for k in literal[0].value.keys]
    assert keys == list(SELECTORS)
    assert all(cls.name == name for name, cls in SELECTORS.items())


def test_selector_modules_do_not_register_themselves():
    callers = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in (
                    "register_selector", "_register"):
                callers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    # the one exception: installed plugins (entry points) are added through the public function
    plugin_loader = ROOT / "selectors" / "__init__.py"
    text = plugin_loader.read_text().splitlines()
    callers = [c for c in callers if not (c.startswith("selectors/__init__.py:")
                                          and "entry_point_objects" in text[int(c.rsplit(":", 1)[1]) - 1])]
    assert callers == []


def test_register_selector_adds_a_plugin_and_its_step(monkeypatch):
    from curate import selectors
    from curate.pipeline import registry
    from curate.selectors.baselines import RandomSelector

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class PluginSelector(RandomSelector):
        name = "plugin_for_test"

    monkeypatch.setattr(selectors, "SELECTORS", dict(selectors.SELECTORS))
    monkeypatch.setattr(registry, "STEPS", dict(registry.STEPS))
    assert selectors.register_selector(PluginSelector) is PluginSelector
    assert selectors.register_selector(PluginSelector) is PluginSelector  # the same class twice is fine
    assert selectors.get_selector("plugin_for_test") is PluginSelector
    assert registry.STEPS["plugin_for_test"].selector_cls is PluginSelector
