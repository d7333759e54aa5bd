"""Run folders, caches and inputs under faults: nothing lost, nothing stale, nothing deleted.

Each test plants a fault a hostile or unlucky user meets (a file edited behind a cached step, a
name of ``..``, two runs into one folder, a killed or disk-full ``--overwrite`` rerun, a planted or
truncated shard, a YAML alias bomb, kill -9 at every write) and checks the exact outcome.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curate.cli import main
from curate.errors import ParameterError, RecipeError
from curate.io.paths import check_name, content_params
from curate.io.store import FeatureSet, FeatureStore, cache_key
from curate.io.writers import atomic_dir
from curate.pipeline.executors import sharded_map
from curate.pipeline.recipe import MAX_YAML_NODES, load_recipe, parse_recipe
from curate.pipeline.rundir import run_lock
from curate.pipeline.runner import load_run, run_recipe

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu"]


def _pool(path: Path, n: int = 120) -> Path:
    """Alpaca JSONL: ``n`` rows of seeded word salad, every 7th an exact duplicate of the one before."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        if i % 7 == 6:
            rows.append(dict(rows[-1]))
            continue
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), 20)]
        rows.append({"instruction": f"Task {i}: " + " ".join(words[:10]), "input": "",
                     "output": " ".join(words[10:]) + f" number {i}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, steps: list[dict], name: str = "faults") -> dict:
    pool = tmp_path / "pool.jsonl"
    if not pool.exists():
        _pool(pool)
    return {"name": name, "seed": 3, "inputs": [str(pool)], "output": str(tmp_path / "runs"), "steps": steps}


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and stdout+stderr of ``curate ARGS`` through the console entry point."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def _run(raw: dict, tmp_path: Path, run_dir: Path, **kw):
    return run_recipe(parse_recipe(raw, base=tmp_path), run_dir=run_dir, **kw)


# --------------------------------------------------------------------- file parameters by content
def test_step_key_follows_the_content_of_a_file_parameter(tmp_path):
    """Editing the targets file behind a decontam step (same path) must not be answered from cache."""
    pool = _pool(tmp_path / "pool.jsonl")
    first = json.loads(pool.read_text().splitlines()[0])
    tgt = tmp_path / "targets.jsonl"
    tgt.write_text(json.dumps({"instruction": "completely unrelated benchmark question about quantum "
                                              "chromodynamics and lattice gauge theory today", "output": "x"}) + "\n")
    raw = _recipe(tmp_path, [{"use": "decontam", "targets": [str(tgt)], "ngram": 8}])
    run_dir = tmp_path / "run"
    assert _run(raw, tmp_path, run_dir).n_curated == 120
    # Same path, new content: the first pool prompt is now a benchmark item.
    tgt.write_text(json.dumps({"instruction": first["instruction"], "output": "x"}) + "\n")
    with pytest.raises(RecipeError, match="different recipe or input"):
        _run(raw, tmp_path, run_dir)  # not "cached"
    res = _run(raw, tmp_path, run_dir, overwrite=True)
    assert res.n_curated == 120 - 1 and res.funnel[1]["cached"] is False
    assert _run(raw, tmp_path, run_dir).funnel[1]["cached"] is True  # and stable once recomputed


def test_critiq_annotate_rerun_after_editing_criteria_asks_the_judge(tmp_path):
    """The issue's case: criteria.json edited in place; the rerun must re-judge, not say "cached"."""
    from curate.selectors.critiq.fakes import GuidedRule, synthetic_functions
    from curate.selectors.critiq.server import LocalServer

    funcs, _ = synthetic_functions(16, seed=2)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"Write function number {i}.", "input": "", "output": f})
                            + "\n" for i, f in enumerate(funcs)))
    crit = tmp_path / "criteria.json"
    crit.write_text(json.dumps({"docs": "Prefer functions that have a docstring."}))
    calls: list[int] = []

    class Counting(GuidedRule):
        def __call__(self, messages, params):
            calls.append(1)
            return super().__call__(messages, params)

    counting = Counting()

    with LocalServer({"rule": counting}) as srv:
        raw = {"name": "crit", "inputs": [str(pool)], "output": str(tmp_path / "runs"), "steps": [
            {"use": "critiq_annotate", "criteria": str(crit), "n_buckets": 1, "judge_url": srv.url,
             "judge_model": "rule", "guided_choice": True, "cache": str(tmp_path / "judge.sqlite")}]}
        run_dir = tmp_path / "run"
        _run(raw, tmp_path, run_dir)
        n_first = len(calls)
        assert n_first > 0
        crit.write_text(json.dumps({"speed": "Prefer faster code."}))
        with pytest.raises(RecipeError, match="different recipe or input"):
            _run(raw, tmp_path, run_dir)
        assert len(calls) == n_first
        res = _run(raw, tmp_path, run_dir, overwrite=True)
    assert res.funnel[1]["cached"] is False and len(calls) > n_first


def test_feature_cache_key_follows_checkpoint_and_file_content(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    factors = tmp_path / "factors.npz"
    factors.write_bytes(b"A" * 32)
    params = {"checkpoints": [str(ckpt)], "factors": str(factors), "model": "default", "cache": str(factors)}
    k0 = cache_key(["u1"], params)
    (ckpt / "adapter_model.safetensors").write_bytes(b"\x01" * 64)  # retrained: same size, new weights
    k1 = cache_key(["u1"], params)
    factors.write_bytes(b"B" * 32)
    k2 = cache_key(["u1"], params)
    assert len({k0, k1, k2}) == 3
    assert cache_key(["u1"], params) == k2  # stable while nothing changes
    # Strings naming no file, and output/cache parameters, are keyed as before (by value).
    plain = {"model": "default", "ridge": 0.1, "names": ["grad/adam"]}
    assert content_params(plain) == plain
    assert content_params({"cache": str(factors)}) == {"cache": str(factors)}


# --------------------------------------------------------------------------- names that become paths
@pytest.mark.parametrize("bad", ["..", ".", "../x", "a/../..", "/etc", "a\\b", ".hidden", "", "a\x00b", "a//b", "~"])
def test_check_name_refuses_names_that_leave_their_folder(bad):
    with pytest.raises(ParameterError, match="plain name"):
        check_name("the feature store", "name", bad, nested=True)


def test_check_name_accepts_feature_names():
    for good in ("grad/adam", "embed/prompt+response", "grad/sgd/targets", "x.y", "run-1_b"):
        assert check_name("o", "name", good, nested=True) == good
    with pytest.raises(ParameterError):
        check_name("o", "name", "a/b")  # not nested: one part only


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    (victim / "store").mkdir(parents=True)
    (victim / "precious.txt").write_text("keep me")
    return victim


def test_feature_store_and_atomic_dir_never_delete_above_their_folder(tmp_path):
    victim = _victim(tmp_path)
    fs = FeatureSet("..", np.array(["a"]), np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ParameterError):
        FeatureStore(victim / "store").put(fs)
    with pytest.raises(ParameterError), atomic_dir(victim / "store" / ".."):
        pass
    assert (victim / "precious.txt").read_text() == "keep me" and (victim / "store").is_dir()
    # A symlink at the target is replaced as a link; what it points to is untouched.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "f.txt").write_text("x")
    (victim / "store" / "link").symlink_to(tmp_path / "elsewhere")
    with atomic_dir(victim / "store" / "link") as tmp:
        (tmp / "new.txt").write_text("y")
    assert (tmp_path / "elsewhere" / "f.txt").read_text() == "x"
    assert (victim / "store" / "link" / "new.txt").read_text() == "y"


def test_cli_whiten_output_name_dotdot_exits_2_and_deletes_nothing(tmp_path, capsys):
    rng = np.random.default_rng(0)
    FeatureSet("grad/sgd", np.array([f"p{i}" for i in range(30)]), rng.normal(size=(30, 4)).astype(np.float32)
               ).save(tmp_path / "pool")
    FeatureSet("grad/sgd/targets", np.array([f"t{i}" for i in range(10)]), rng.normal(size=(10, 4)).astype(np.float32)
               ).save(tmp_path / "target")
    victim = _victim(tmp_path)
    code, out = _cli(capsys, "whiten", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
                     "-o", str(victim / "store"), "--output-name", "..")
    assert code == 2 and "--output-name" in out, out
    assert (victim / "precious.txt").read_text() == "keep me"


def test_recipe_names_that_become_paths_are_validated(tmp_path, capsys):
    base = _recipe(tmp_path, [])
    for name in ("../../../x", "/abs/run", ".."):
        with pytest.raises(RecipeError, match="'name'"):
            parse_recipe({**base, "name": name}, base=tmp_path)
    with pytest.raises(RecipeError, match="'output'"):
        parse_recipe({**base, "steps": [{"use": "whiten", "output": ".."}]}, base=tmp_path)
    with pytest.raises(RecipeError, match="features.embed"):
        parse_recipe({**base, "steps": [{"use": "kcenter", "budget": 5, "features": {"embed": "../x"}}]}, base=tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({**base, "steps": [{"use": "whiten", "output": ".."}]}))
    code, out = _cli(capsys, "validate", str(recipe))
    assert code == 2 and "'output'" in out, out


# --------------------------------------------------------------------------------- the run lock
def test_second_run_into_a_locked_folder_exits_2_naming_the_holder(tmp_path, capsys):
    raw = _recipe(tmp_path, [{"use": "exact_dedup"}])
    run_dir = tmp_path / "run"
    _run(raw, tmp_path, run_dir)
    before = {p: (run_dir / p).read_bytes() for p in ("recipe.resolved.yaml", "run.log", "manifest.json")}
    other = {**raw, "seed": 4}
    recipe = tmp_path / "other.yaml"
    recipe.write_text(json.dumps(other))
    with run_lock(run_dir):  # another run is writing the folder
        with pytest.raises(RecipeError, match=f"another run \\(pid {os.getpid()} on .*started "):
            _run(other, tmp_path, run_dir, overwrite=True)
        code, out = _cli(capsys, "run", str(recipe), "-o", str(run_dir), "--overwrite", "--quiet")
        assert code == 2 and f"pid {os.getpid()}" in out, out
        code, out = _cli(capsys, "show", str(run_dir))
        assert code == 2 and "writing it now" in out, out
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    assert load_run(run_dir)["seed"] == 3  # the lock is released: the folder reads as complete again


# ------------------------------------------------------------- complete or visibly incomplete
def _boom(*_a, **_k):
    raise RuntimeError("killed mid-run")


def test_failed_overwrite_rerun_leaves_a_visibly_incomplete_folder(tmp_path, monkeypatch, capsys):
    raw_a = _recipe(tmp_path, [{"use": "exact_dedup"}, {"use": "sample", "n": 50}])
    run_dir = tmp_path / "run"
    _run(raw_a, tmp_path, run_dir)
    assert load_run(run_dir)["rows"]["curated"] == 50
    # A refused run (other recipe, no --overwrite) changes nothing: the folder stays complete.
    raw_b = _recipe(tmp_path, [{"use": "exact_dedup"}, {"use": "sample", "n": 40}])
    with pytest.raises(RecipeError):
        _run(raw_b, tmp_path, run_dir)
    assert load_run(run_dir)["rows"]["curated"] == 50
    # The --overwrite rerun dies inside its second step.
    from curate.pipeline import builtin

    monkeypatch.setattr(builtin.Sample, "apply", _boom)
    with pytest.raises(RuntimeError, match="killed"):
        _run(raw_b, tmp_path, run_dir, overwrite=True)
    assert not (run_dir / "DONE").exists()
    assert not (run_dir / "curated.parquet").exists() and not (run_dir / "manifest.json").exists()
    assert "error: RuntimeError: killed mid-run" in (run_dir / "run.log").read_text()  # why it is incomplete
    with pytest.raises(RecipeError, match="incomplete"):
        load_run(run_dir)
    code, out = _cli(capsys, "show", str(run_dir))
    assert code == 2 and "incomplete" in out, out
    monkeypatch.undo()
    assert _run(raw_b, tmp_path, run_dir).n_curated == 40 and load_run(run_dir)["rows"]["curated"] == 40


def test_disk_full_while_writing_outputs_never_leaves_a_successful_looking_folder(tmp_path, monkeypatch):
    """ENOSPC injected at the parquet writer: on a fresh folder and on an --overwrite rerun."""
    real = pl.DataFrame.write_parquet

    def full_disk(self, file, *a, **k):
        if "curated.parquet" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(self, file, *a, **k)

    raw_a = _recipe(tmp_path, [{"use": "exact_dedup"}])
    raw_b = _recipe(tmp_path, [{"use": "exact_dedup"}, {"use": "sample", "n": 30}])
    fresh, rerun = tmp_path / "fresh", tmp_path / "rerun"
    _run(raw_a, tmp_path, rerun)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", full_disk)
    for run_dir, raw in ((rerun, raw_b), (fresh, raw_a)):
        with pytest.raises(OSError) as info:
            _run(raw, tmp_path, run_dir, overwrite=True)
        assert info.value.errno == errno.ENOSPC
        assert not (run_dir / "DONE").exists() and not (run_dir / "curated.parquet").exists()
        assert not list(run_dir.rglob(".*.tmp"))
        with pytest.raises(RecipeError, match="incomplete"):
            load_run(run_dir)
    monkeypatch.undo()
    assert _run(raw_b, tmp_path, rerun).n_curated == 30  # space back: the rerun finishes


# ------------------------------------------------------------------------------- shard caches
class _Payload:
    """Unpickling this creates ``path``: proof that a pickle from the run folder was executed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _shard_files(run_dir: Path) -> list[Path]:
    return sorted(p for p in (run_dir / "steps" / "01-filter" / "shards").iterdir() if not p.name.startswith("."))


def test_planted_or_truncated_shards_are_never_trusted(tmp_path):
    raw = _recipe(tmp_path, [{"use": "filter", "shard_size": 25}])
    run_dir = tmp_path / "run"
    clean = _run(raw, tmp_path, run_dir)
    ref = (run_dir / "curated.parquet").read_bytes()
    files = _shard_files(run_dir)
    assert len(files) == 5
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(str(marker)))
    for f in files[:2]:  # a pickle under the old name and under the new one
        key = f.name.split("-")[0].split(".")[0]
        (f.parent / f"{key}.pkl").write_bytes(payload)
        f.write_bytes(payload)
    files[2].write_bytes(files[2].read_bytes()[: 40])  # truncated
    (run_dir / "steps" / "01-filter" / "DONE").unlink()  # the step crashed: its shards are read back
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = _run(raw, tmp_path, run_dir)
    assert not marker.exists()
    named = " ".join(str(w.message) for w in caught)
    for f in files[:3]:
        assert str(f) in named
    assert again.n_curated == clean.n_curated and (run_dir / "curated.parquet").read_bytes() == ref


def test_sharded_map_stores_data_not_pickles(tmp_path):
    def fn(i):
        return (np.arange(i + 1, dtype=np.uint32), np.full((2, 2), float(i)))

    uids = [[f"u{i}"] for i in range(3)]
    first = sharded_map(fn, [0, 1, 2], uids, params={"v": 1}, cache_dir=tmp_path)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz"] * 3
    for p in tmp_path.iterdir():
        with np.load(p, allow_pickle=False) as z:  # plain arrays, loadable without pickle
            assert set(z.files) == {"__kind__", "a0", "a1"}
    back = sharded_map(_boom, [0, 1, 2], uids, params={"v": 1}, cache_dir=tmp_path)  # all from cache
    for a, b in zip(first, back, strict=True):
        assert isinstance(b, tuple) and all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------ YAML alias bombs
def _bomb(levels: int, fan: int) -> str:
    lines = ["a0: &a0 [x]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return "\n".join(lines)


def test_yaml_alias_bombs_are_refused(tmp_path, capsys):
    pool = _pool(tmp_path / "pool.jsonl")
    head = f"name: bomb\ninputs: [{pool}]\n"
    small = tmp_path / "small.yaml"  # an alias that repeats a little is fine
    small.write_text(head + "description: &d short\nsteps:\n  - {use: filter, refusal_phrases: [*d, *d]}\n")
    assert load_recipe(small).steps[0].params["refusal_phrases"] == ["short", "short"]
    # 4^9 = 262,144 expanded values from a few hundred bytes: over the bound, refused at once.
    assert MAX_YAML_NODES < 4 ** 9
    mid = tmp_path / "mid.yaml"
    mid.write_text(head + "steps: []\ndescription: {" + ", ".join(_bomb(9, 4).splitlines()) + "}\n")
    with pytest.raises(RecipeError, match="alias"):
        load_recipe(mid)
    # The classic billion laughs (9 levels of 9): refused without expanding it.
    big = tmp_path / "big.yaml"
    big.write_text(head + "steps: []\ndescription: {" + ", ".join(_bomb(9, 9).splitlines()) + "}\n")
    assert len(big.read_bytes()) < 1000
    code, out = _cli(capsys, "validate", str(big))
    assert code == 2 and "alias" in out, out
    rec = tmp_path / "rec.yaml"  # an alias inside its own anchor
    rec.write_text(head + "steps: &s [{use: filter, refusal_phrases: *s}]\n")
    with pytest.raises(RecipeError, match="recursive"):
        load_recipe(rec)


# -------------------------------------------------------------------------- kill -9 at every write
KILLER = """
import os, signal, sys
from curate.pipeline.recipe import load_recipe
from curate.pipeline.runner import run_recipe
stop, before = int(sys.argv[3]), sys.argv[4] == "before"
real, count = os.replace, [0]
def replace(src, dst):
    count[0] += 1
    if count[0] == stop and before:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    if count[0] == stop:
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
run_recipe(load_recipe(sys.argv[1]), run_dir=sys.argv[2])
"""


def test_kill_9_at_write_points_then_rerun_is_byte_identical(tmp_path):
    """SIGKILL just before or just after the Nth rename of a run (shards, step files, outputs, DONE);
    after every kill the folder is complete for its recipe or says it is incomplete; the final rerun
    gives byte-identical outputs."""
    raw = _recipe(tmp_path, [{"use": "filter", "shard_size": 30}, {"use": "exact_dedup"},
                             {"use": "minhash_dedup", "threshold": 0.7, "shard_size": 40}, {"use": "sample", "n": 60}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(raw))
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    run_recipe(load_recipe(recipe), run_dir=clean)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    # Crashes accumulate in one folder; the Nth rename counts from each attempt's start. These land
    # between filter shards, before a MinHash shard's rename, after the manifest, and just before DONE.
    for stop, when in ((7, "after"), (12, "before"), (12, "after"), (6, "before")):
        proc = subprocess.run([sys.executable, str(script), str(recipe), str(crashed), str(stop), when],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == -signal.SIGKILL, (stop, when, proc.returncode, proc.stderr[-2000:])
        try:
            m = load_run(crashed)
            assert (crashed / "curated.parquet").read_bytes() == (clean / "curated.parquet").read_bytes()
            assert m["selected_uids_hash"] == load_run(clean)["selected_uids_hash"]
        except RecipeError as exc:
            assert "incomplete" in str(exc)
    done = run_recipe(load_recipe(recipe), run_dir=crashed)
    for name in ("curated.parquet", "rejected.parquet"):
        assert (crashed / name).read_bytes() == (clean / name).read_bytes()
    assert done.n_curated == 60 and load_run(crashed)["rows"]["curated"] == 60
    assert not list(crashed.rglob(".*.tmp"))
