"""The state of a run folder: who is writing it, and whether its final outputs are complete.

Two promises of :func:`curate.pipeline.runner.run_recipe` live here:

- **One writer at a time.** A run holds an exclusive ``flock`` on ``<run_dir>/.curate.lock`` from
  before it writes anything (``run.log``, ``recipe.resolved.yaml``, temp-file cleanup) until it
  returns. A second run into the same folder is refused at once with the holder's pid, host and
  start time; the kernel drops the lock when its holder dies, so a crash never leaves it stuck.
- **Complete or visibly incomplete.** The final outputs (:data:`FINAL_OUTPUTS`) are certified by a
  run-level ``DONE`` written last, which names the recipe hash and the manifest's SHA-256. Before a
  run changes anything, ``DONE`` is removed first and then the old outputs, so a run killed or
  failing at any point (including a full disk) leaves a folder without ``DONE``, never one whose
  outputs claim to come from a recipe they do not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from curate.errors import RecipeError
from curate.io.writers import sha256_file, write_json

LOCK = ".curate.lock"
RUN_DONE = "DONE"
FINAL_OUTPUTS = ("curated.parquet", "rejected.parquet", "selection.parquet", "manifest.json", "report.html")


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another process (it has not written its name yet)"
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the exclusive lock of ``run_dir`` for the block; refuse (RecipeError) if another run holds it."""
    import fcntl

    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RecipeError(
                f"{run_dir} is being written by another run ({_holder_text(fd)}). Wait for it to finish, "
                "or choose another run folder with -o."
            ) from None
        except OSError as exc:  # a filesystem without locks (some network mounts): run, but say so
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{run_dir}: cannot lock the run folder ({exc.strerror}); concurrent runs into it "
                          "are not detected.", RuntimeWarning, stacklevel=3)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the lock of ``run_dir`` now, or None when no run is writing it."""
    import fcntl

    path = run_dir / LOCK
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder_text(fd)
        except OSError:  # no locks on this filesystem: nobody can be seen holding one
            return None
        return None
    finally:
        os.close(fd)


def invalidate_outputs(run_dir: Path) -> None:
    """Remove the run-level DONE, then the final outputs it certified (in that order, so a crash in
    between leaves outputs without DONE: incomplete, never falsely complete)."""
    for name in (RUN_DONE, *FINAL_OUTPUTS):
        (run_dir / name).unlink(missing_ok=True)


def mark_run_done(run_dir: Path, recipe_hash: str) -> None:
    """Certify the final outputs: write DONE (last) with the recipe hash and the manifest's SHA-256."""
    write_json({"recipe_hash": recipe_hash, "manifest_sha256": sha256_file(run_dir / "manifest.json"),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, run_dir / RUN_DONE)


def load_finished(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a complete run folder.

    Raises:
        RecipeError: not a run folder; a run is writing it now; it is incomplete (interrupted,
            failed, or made before run folders had a DONE marker); or its manifest is not the one
            DONE certifies.
    """
    run_dir = Path(run_dir)
    rerun = "Rerun `curate run` with its recipe and -o to finish it (finished steps are reused)."
    holder = lock_holder(run_dir)
    if holder is not None:
        raise RecipeError(f"{run_dir} is incomplete: a run is writing it now ({holder}).")
    done_path, manifest_path = run_dir / RUN_DONE, run_dir / "manifest.json"
    if not done_path.exists():
        if not any((run_dir / n).exists() for n in ("manifest.json", "steps", "run.log", LOCK)):
            raise RecipeError(f"{run_dir} is not a run folder (no manifest.json, no steps/, no run.log).")
        raise RecipeError(f"{run_dir} is an incomplete run: it has no DONE marker (the run was interrupted or "
                          f"failed, so its outputs may be missing or belong to another recipe). {rerun}")
    try:
        done = json.loads(done_path.read_text())
        manifest = json.loads(manifest_path.read_text())
        ok = (done.get("manifest_sha256") == sha256_file(manifest_path)
              and done.get("recipe_hash") == manifest.get("recipe_hash"))
    except (OSError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise RecipeError(f"{run_dir}: manifest.json is missing or is not the one its DONE marker certifies. {rerun}")
    return manifest
