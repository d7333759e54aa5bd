"""Atomic writers: a failed write leaves neither a partial output nor a temp file behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.io.writers import atomic_dir, atomic_path


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_path_renames_on_success_and_cleans_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert not target.exists()  # nothing under the final name before the block ends
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "new"
    assert _entries(tmp_path) == ["out.txt"]


def test_atomic_dir_replaces_whole_folder_only_on_success(tmp_path: Path) -> None:
    folder = tmp_path / "feat"
    with atomic_dir(folder) as tmp:
        (tmp / "a.npy").write_text("1")
        (tmp / "b.json").write_text("2")
    assert _entries(folder) == ["a.npy", "b.json"]
    with pytest.raises(KeyboardInterrupt), atomic_dir(folder) as tmp:
        (tmp / "c.npy").write_text("3")
        raise KeyboardInterrupt
    assert _entries(folder) == ["a.npy", "b.json"]  # the old folder is untouched
    with atomic_dir(folder) as tmp:
        (tmp / "c.npy").write_text("3")
    assert _entries(folder) == ["c.npy"]  # replaced as a whole, stale files gone
    assert _entries(tmp_path) == ["feat"]  # no temp folder left behind
