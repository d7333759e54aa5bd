"""User code in recipes: plugin files and modules, use: module:Class, @row_filter, entry points."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import polars as pl
import pytest

import curate
from curate.cli import main
from curate.errors import RecipeError
from curate.pipeline import registry

PLUGIN = '''
import curate

@curate.row_filter("digit_limit", field="response")
def digit_limit(text, max_digits=0):
    """Drop responses with more than max_digits digits."""
    n = sum(c.isdigit() for c in text)
    return True if n <= max_digits else f"{n} digits"
'''

# responses with 0, 1, 2, 3 and 4 digits: max_digits 1 keeps exactly the first two
ROWS = [{"instruction": f"q{i}", "input": "", "output": "x" + "7" * i} for i in range(5)]


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    registry.load_steps()
    monkeypatch.setattr(registry, "STEPS", dict(registry.STEPS))
    import curate.pipeline.plugins as plugins

    monkeypatch.setattr(plugins, "STEPS", registry.STEPS)


def _setup(tmp_path: Path, plugin: str = PLUGIN, executor: str = "local") -> Path:
    (tmp_path / "my_steps.py").write_text(plugin)
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(textwrap.dedent(f"""
        name: plug
        inputs: [pool.jsonl]
        output: runs
        executor: {executor}
        plugins: [./my_steps.py]
        steps:
          - use: digit_limit
            max_digits: 1
    """))
    return recipe


def _check_run(run_dir: Path) -> None:
    rejected = pl.read_parquet(run_dir / "rejected.parquet").sort("source_line")
    assert rejected["step"].to_list() == ["digit_limit"] * 3
    assert rejected["reason"].to_list() == ["digit_limit: 2 digits", "digit_limit: 3 digits", "digit_limit: 4 digits"]
    assert pl.read_parquet(run_dir / "curated.parquet").height == 2


def test_recipe_plugin_file_runs_a_row_filter_and_is_recorded(tmp_path: Path) -> None:
    recipe = _setup(tmp_path)
    run = curate.run_recipe(curate.load_recipe(recipe), run_dir=tmp_path / "run")
    _check_run(run.run_dir)
    [plugin] = run.manifest["recipe"]["plugins"]
    assert plugin["plugin"] == "./my_steps.py" and plugin["module"].startswith("curate_plugin_my_steps")
    import hashlib

    assert plugin["sha256"] == hashlib.sha256((tmp_path / "my_steps.py").read_bytes()).hexdigest()
    # edited plugin code changes the step's cache key: the old result is not reused silently
    (tmp_path / "my_steps.py").write_text(PLUGIN.replace("n <= max_digits", "n <= max_digits + 1"))
    with pytest.raises(RecipeError, match="different recipe or input"):
        curate.run_recipe(curate.load_recipe(recipe), run_dir=tmp_path / "run")
    again = curate.run_recipe(curate.load_recipe(recipe), run_dir=tmp_path / "run", overwrite=True)
    assert again.n_curated == 3


@pytest.mark.slow
def test_plugin_row_filter_on_ray_matches_local(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    recipe = _setup(tmp_path, executor="ray")
    try:
        run = curate.run_recipe(curate.load_recipe(recipe), run_dir=tmp_path / "ray")
    finally:
        import ray

        ray.shutdown()
    _check_run(run.run_dir)


def test_broken_plugins_are_named_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _setup(tmp_path, plugin="import not_a_module_anywhere\n")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "plugin './my_steps.py' failed to import: ModuleNotFoundError" in err
    (tmp_path / "my_steps.py").write_text("def broken(:\n")
    assert main(["run", str(recipe)]) == 2
    assert "plugin './my_steps.py' failed to import (line 1): SyntaxError" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main(["list", "--plugin", "no_such_pkg.steps"]) == 2
    assert "plugin 'no_such_pkg.steps' failed to import" in capsys.readouterr().err


def test_cli_plugin_option_and_list_show_plugin_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _setup(tmp_path)
    text = recipe.read_text().replace("plugins: [./my_steps.py]\n", "")
    recipe.write_text(text)
    assert main(["validate", str(recipe)]) == 2  # the step is unknown without its plugin
    capsys.readouterr()
    assert main(["list", "steps", "--plugin", str(tmp_path / "my_steps.py"), "--json"]) == 0
    steps = json.loads(capsys.readouterr().out.splitlines()[-1])["steps"]
    assert steps["digit_limit"]["params"] == {"max_digits": 0}
    assert steps["digit_limit"]["plugin"].endswith("my_steps.py")
    assert main(["run", str(recipe), "--plugin", str(tmp_path / "my_steps.py"), "-o", str(tmp_path / "r2"),
                 "--quiet"]) == 0
    _check_run(tmp_path / "r2")


STEP_MODULE = '''
from dataclasses import dataclass
import polars as pl

@dataclass(frozen=True, kw_only=True)
class EvenLength:
    """Keep rows whose first message has an even number of characters."""
    min_chars: int = 0

    def apply(self, table, ctx):
        n = [len(m[0]["content"]) for m in table["messages"].to_list()]
        keep = [k % 2 == 0 and k >= self.min_chars for k in n]
        return pl.DataFrame({"uid": table["uid"], "keep": keep,
                             "reason": ["" if k else "even_length: odd" for k in keep]})
'''


def test_use_module_colon_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "site" / "usersteps"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(STEP_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    rows = [{"instruction": "ab", "input": "", "output": "y"}, {"instruction": "abc", "input": "", "output": "y"}]
    rec = curate.parse_recipe({"name": "m", "inputs": [{"data": rows}], "output": str(tmp_path / "runs"),
                               "steps": [{"use": "usersteps.mod:EvenLength"}]})
    assert rec.steps[0].name == "EvenLength"
    run = curate.run_recipe(rec)
    assert run.n_curated == 1 and run.manifest["recipe"]["plugins"][0]["module"] == "usersteps.mod"
    with pytest.raises(RecipeError, match="has no 'Nope'"):
        curate.parse_recipe({"name": "m", "inputs": [{"data": rows}], "steps": [{"use": "usersteps.mod:Nope"}]})


def _dist(site: Path) -> None:
    """An installed distribution (dist-info on sys.path) with one entry point per group."""
    pkg = site / "curate_ep_plugin"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(STEP_MODULE + textwrap.dedent('''
        from dataclasses import dataclass as _dc
        from curate.selectors.baselines import RandomSelector
        from curate.io.formats import FormatInfo
        from curate.io.formats.chat import FORMATS as _CHAT

        @_dc(frozen=True, kw_only=True)
        class FirstSelector(RandomSelector):
            name = "ep_first"

        _alpaca = next(f for f in _CHAT if f.name == "alpaca")
        QA = FormatInfo("ep_qa", "q/a rows", ("sft",), "sft", lambda o: isinstance(o, dict) and {"q", "a"} <= set(o),
                        lambda o, ctx: _alpaca.convert({"instruction": o["q"], "output": o["a"]}, ctx))
    '''))
    info = site / "curate_ep_plugin-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: curate-ep-plugin\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(
        "[curate.steps]\neven_length = curate_ep_plugin:EvenLength\n\n"
        "[curate.selectors]\nep_first = curate_ep_plugin:FirstSelector\n\n"
        "[curate.formats]\nep_qa = curate_ep_plugin:QA\n")


def test_entry_points_of_an_installed_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from curate import selectors
    from curate.io import formats, plugins

    _dist(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(selectors, "SELECTORS", dict(selectors.SELECTORS))
    monkeypatch.setattr(plugins, "_GROUPS_DONE", set())
    saved = dict(formats.FORMATS)
    try:
        assert "even_length" in registry.load_steps()
        assert selectors.load_selector_plugins() == ["ep_first"]
        assert "ep_first" in registry.STEPS
        res = curate.read_sources([{"q": "2+2?", "a": "4"}])
        assert res.formats == {"<list>": "ep_qa"} and res.table["messages"][0][1]["content"] == "4"
        rec = curate.parse_recipe({"name": "ep", "inputs": [{"data": [{"q": "ab", "a": "x"}, {"q": "abc", "a": "y"}]}],
                                   "steps": [{"use": "even_length"}]})
        [plug] = rec.plugins
        assert plug["module"] == "curate_ep_plugin" and plug["version"] == "1.2.3"
        assert "curate.steps" in plug["plugin"] and len(plug["sha256"]) == 64
    finally:
        formats.FORMATS.clear()
        formats.FORMATS.update(saved)
