"""Run every benchmark script (``--quick`` or full) as a subprocess, then regenerate RESULTS.md.

Each script runs in its own process group with a wall-clock timeout; a failure or a timeout is
reported and the harness goes on with the next script. Every script's outcome (ok / failed /
timeout, seconds, exit code) is appended to ``results.jsonl`` as bench ``harness`` so RESULTS.md
shows what the last sweep did, then ``make_results.py`` rewrites RESULTS.md.

    python benchmarks/run.py --quick                 # every benchmark, minutes each
    python benchmarks/run.py --quick --only minhash tarot
    python benchmarks/run.py --list
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import HERE, record  # noqa: E402

# Scripts that are not named bench_*.py but belong to the sweep, in the order they run (last: slowest).
EXTRA = ("ches_displacement.py", "targeted_selection.py")
# Arguments for scripts without a --quick flag (quick mode only).
QUICK_ARGS: dict[str, list[str]] = {"bench_ches.py": ["--n", "16", "--max-length", "256"]}
# Per-script timeouts (seconds) in quick mode; the rest get --timeout.
QUICK_TIMEOUTS: dict[str, int] = {"targeted_selection.py": 1800, "bench_scaling.py": 300}


def scripts() -> list[Path]:
    """The benchmark scripts, bench_*.py sorted, then :data:`EXTRA` (those that exist)."""
    found = sorted(HERE.glob("bench_*.py"))
    return found + [HERE / n for n in EXTRA if (HERE / n).exists()]


def command(script: Path, quick: bool) -> list[str]:
    """The argv that runs ``script`` in the chosen mode."""
    args: list[str] = []
    if quick:
        text = script.read_text(encoding="utf-8")
        args = ["--quick"] if '"--quick"' in text or "'--quick'" in text else QUICK_ARGS.get(script.name, [])
    return [sys.executable, str(script.relative_to(HERE.parent)), *args]


def run_one(argv: list[str], timeout: float, log_dir: Path) -> tuple[str, int | None, float, Path]:
    """Run ``argv`` from the repository root; returns (status, exit code, seconds, log file)."""
    name = Path(argv[1]).stem
    log = log_dir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(argv, cwd=HERE.parent, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the script's own process group only
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, "timeout"
    return status, rc, time.perf_counter() - t0, log


def tail(path: Path, n: int = 5) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return " / ".join(x.strip() for x in lines[-n:])[-400:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script (minutes each)")
    p.add_argument("--only", nargs="*", default=None, help="substrings of script names to run")
    p.add_argument("--skip", nargs="*", default=[], help="substrings of script names to skip")
    p.add_argument("--timeout", type=float, default=None, help="per-script seconds [quick: 240, full: 6 h]")
    p.add_argument("--list", action="store_true", help="print the commands and exit")
    p.add_argument("--no-record", action="store_true", help="do not append harness lines to results.jsonl")
    p.add_argument("--log-dir", default=str(HERE.parent / "runs" / "bench_logs"))
    a = p.parse_args(argv)
    todo = [s for s in scripts() if (a.only is None or any(o in s.name for o in a.only))
            and not any(k in s.name for k in a.skip)]
    if a.list:
        for s in todo:
            print(" ".join(command(s, a.quick)[1:]))
        return 0
    log_dir = Path(a.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    summary = []
    for s in todo:
        argv_s = command(s, a.quick)
        timeout = a.timeout or (QUICK_TIMEOUTS.get(s.name, 240) if a.quick else 6 * 3600)
        print(f"[run] {' '.join(argv_s[1:])} (timeout {timeout:.0f}s)", flush=True)
        status, rc, secs, log = run_one(argv_s, timeout, log_dir)
        print(f"[run]   {status} in {secs:.0f}s (rc={rc}); log {log}" + ("" if status == "ok" else f": {tail(log)}"),
              flush=True)
        summary.append((s.name, status, secs))
        if not a.no_record:
            record("harness", {"script": s.name, "quick": a.quick},
                   {"status": status, "seconds": round(secs, 1), "rc": rc, "timeout_s": timeout,
                    "script_command": "python " + " ".join(argv_s[1:])},
                   notes="" if status == "ok" else tail(log))
    total = time.perf_counter() - t_all
    print(f"[run] total {total:.0f}s: " + ", ".join(f"{n} {st} {sec:.0f}s" for n, st, sec in summary), flush=True)
    subprocess.run([sys.executable, str(HERE / "make_results.py")], cwd=HERE.parent, check=False)
    return 0 if all(st == "ok" for _, st, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
