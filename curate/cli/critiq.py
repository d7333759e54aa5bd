"""CLI verbs of CritiQ: ``curate judge serve`` and ``curate critiq mine | annotate | score``.

``curate.cli`` attaches :data:`COMMANDS`. Every verb takes ``--json`` and prints one JSON summary
as its last line. The judge API key is read from ``--api-key-env`` (default ``OPENAI_API_KEY``) and
never printed or written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from curate.cli._common import emit as _emit
from curate.cli._common import read_table as _read
from curate.schema import TEXT_FIELDS
from curate.selectors.critiq.annotate import check_labelled, human_pairs, render_pair_texts  # noqa: F401  (benchmarks import render_pair_texts from here)
from curate.selectors.critiq.judge import CHOICE_FORMATS, open_session


def _warn_lines(report: dict[str, Any]) -> None:
    """The position-bias warnings of a run, loudly on stderr (stdout keeps the JSON summary last)."""
    for msg in report.get("warnings", []):
        click.echo(f"WARNING: {msg}", err=True)


common = [
    click.option("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1."),
    click.option("--judge-model", default="smollm2-135m-instruct", show_default=True, help="Worker model name."),
    click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True, help="Env variable with the API key."),
    click.option("--cache", "cache", default=".curate_cache/judge.sqlite", show_default=True,
                 help="SQLite cache of judge replies ('' for none)."),
    click.option("--concurrency", default=4, show_default=True, type=int, help="Worker calls in flight."),
    click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Seconds to wait for one judge reply."),
    click.option("--retries", default=5, show_default=True, type=click.IntRange(min=0),
                 help="Retries of a judge request after 429/5xx, a malformed reply, a timeout or a refused connection."),
    click.option("--choice-format", default=CHOICE_FORMATS[0], show_default=True, type=click.Choice(CHOICE_FORMATS),
                 help="How --guided-choice is sent: structured_outputs (vLLM >= 0.12, `curate judge serve`), "
                      "guided_choice (older vLLM), response_format (JSON-schema enum: hosted APIs, llama.cpp), none."),
    click.option("--seed", default=0, show_default=True, type=int),
    click.option("--json", "as_json", is_flag=True, help="Print one JSON summary as the last line."),
]


def _with(opts: list[Any]) -> Any:
    def deco(fn: Any) -> Any:
        for o in reversed(opts):
            fn = o(fn)
        return fn
    return deco


@click.group()
def judge() -> None:
    """A local OpenAI-compatible LLM judge endpoint."""


@judge.command("serve")
@click.option("--model", default="default", show_default=True, help="'default' (SmolLM2-135M-Instruct) or a folder.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--served-name", default=None, help="Model name clients send [default: smollm2-135m-instruct].")
def serve_cmd(model: str, host: str, port: int, device: str, served_name: str | None) -> None:
    """Serve /v1/chat/completions and /v1/models backed by a local causal LM (blocks)."""
    from curate.selectors.critiq.server import serve

    click.echo(f"serving {model} on http://{host}:{port}/v1", err=True)
    serve(model, host=host, port=port, device=device, served_name=served_name)


@click.group()
def critiq() -> None:
    """CritiQ: mine quality criteria from human pairs, annotate a pool, score and select."""


@critiq.command("mine")
@click.argument("pairs_path", metavar="PAIRS.parquet")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="CRITERIA.json")
@click.option("--manager-url", default=None, help="Manager endpoint [default: the judge URL].")
@click.option("--manager-model", default=None, help="Manager model [default: the judge model].")
@click.option("--kb", "kb_path", default=None, help="Knowledge base JSON [default: the starter KB]; 'none' skips.")
@click.option("--epochs", default=3, show_default=True, type=int)
@click.option("--n-criteria", default=20, show_default=True, type=int)
@click.option("--max-llm-calls", default=None, type=int)
@click.option("--max-tokens", default=1024, show_default=True, type=int, help="Worker reply length.")
@click.option("--guided-choice", is_flag=True,
              help="Restrict worker replies to the valid JSON answers (constrained decoding, form: --choice-format).")
@click.option("--swap/--no-swap", default=False, show_default=True,
              help="Ask every worker judgment in both orders; only verdicts that survive the swap count.")
@_with(common)
def mine_cmd(pairs_path: str, output: str, manager_url: str | None, manager_model: str | None, kb_path: str | None,
             epochs: int, n_criteria: int, max_llm_calls: int | None, max_tokens: int, guided_choice: bool, swap: bool,
             judge_url: str, judge_model: str, api_key_env: str, cache: str, concurrency: int, timeout_s: float,
             retries: int, choice_format: str, seed: int, as_json: bool) -> None:
    """Run the CritiQ Flow on ~30 human preference pairs and write the criteria JSON."""
    from curate.selectors.critiq.flow import CritiQFlow, FlowConfig
    from curate.selectors.critiq.kb import load_kb

    t0 = time.time()
    pairs = human_pairs(_read(pairs_path))
    worker = open_session(judge_url, judge_model, cache or None, api_key_env, concurrency, timeout_s=timeout_s, retries=retries,
                          choice_format=choice_format)
    manager = open_session(manager_url or judge_url, manager_model or judge_model, cache or None, api_key_env, 1,
                           timeout_s=timeout_s, retries=retries,
                          choice_format=choice_format)
    kb = [] if kb_path == "none" else load_kb(kb_path)
    cfg = FlowConfig(n_criteria=n_criteria, epochs=epochs, max_llm_calls=max_llm_calls, seed=seed,
                     max_workers=concurrency, worker_max_tokens=max_tokens, worker_guided_choice=guided_choice,
                     swap=swap)
    log = (lambda m: None) if as_json else (lambda m: click.echo(m, err=True))
    res = CritiQFlow(worker, manager, cfg, kb=kb, log=log).run(pairs)
    res.save(output)
    _warn_lines(res.position_bias)
    _emit(as_json, {"output": output, "n_pairs": len(pairs), "n_criteria": len(res.criteria),
                    "criteria": [c.name for c in res.criteria], "vote_accuracy": res.vote_accuracy,
                    "calls": res.calls, "position_bias": res.position_bias, "seconds": round(time.time() - t0, 2)})


@critiq.command("annotate")
@click.argument("in_path", metavar="IN.parquet")
@click.option("--criteria", "criteria_path", required=True, help="CRITERIA.json from `curate critiq mine`.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PAIRS_OUT.parquet")
@click.option("--n-pairs", default=None, type=int, help="Pairs to judge [default: min(25000, N/2)].")
@click.option("--n-buckets", default=10, show_default=True, type=int)
@click.option("--max-tokens", default=1024, show_default=True, type=int)
@click.option("--guided-choice", is_flag=True,
              help="Restrict worker replies to the valid JSON answers (constrained decoding, form: --choice-format).")
@click.option("--swap/--no-swap", default=True, show_default=True,
              help="Ask every judgment in both orders; only verdicts that survive the swap label a pair.")
@_with(common)
def annotate_cmd(in_path: str, criteria_path: str, output: str, n_pairs: int | None, n_buckets: int, max_tokens: int,
                 guided_choice: bool, swap: bool, judge_url: str, judge_model: str, api_key_env: str, cache: str, concurrency: int,
                 timeout_s: float, retries: int, choice_format: str, seed: int, as_json: bool) -> None:
    """Label length-bucketed random pairs of a pool by majority vote over the criteria (resumable)."""
    from curate.io.writers import write_parquet
    from curate.selectors.critiq.annotate import annotate_table
    from curate.selectors.critiq.flow import load_criteria
    from curate.selectors.critiq.swap import PositionLog

    t0 = time.time()
    table = _read(in_path)
    criteria = load_criteria(criteria_path)
    worker = open_session(judge_url, judge_model, cache or None, api_key_env, concurrency, timeout_s=timeout_s, retries=retries,
                          choice_format=choice_format)
    log = PositionLog(swap, worker.name)
    out = annotate_table(table, criteria, worker, n_pairs=n_pairs, n_buckets=n_buckets, seed=seed,
                         max_workers=concurrency, max_tokens=max_tokens, guided_choice=guided_choice, swap=swap, log=log)
    _warn_lines(log.report())
    check_labelled(out, worker, len(criteria), swap=swap)
    write_parquet(out, output)
    _emit(as_json, {"output": output, "n_labelled": out.height, "n_criteria": len(criteria),
                    "calls": worker.stats.as_dict(), "position_bias": log.report(), "seconds": round(time.time() - t0, 2)})


@critiq.command("score")
@click.argument("in_path", metavar="IN.parquet")
@click.option("--pairs", "pairs_path", required=True, help="PAIRS_OUT.parquet from `curate critiq annotate`.")
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(file_okay=False), help="OUT_DIR")
@click.option("--budget", default="0.1", show_default=True, help="Rows (int), fraction, or tokens:X.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--scorer", default="embedding_linear", show_default=True)
@click.option("--embed-model", default="default", show_default=True, help="'default' (MiniLM), 'hashing' or a folder.")
@click.option("--field", default="prompt+response", show_default=True, type=click.Choice(TEXT_FIELDS),
              help="Text the scorer embeds (MiniLM reads 256 word pieces: 'response' when prompts are long).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True)
def score_cmd(in_path: str, pairs_path: str, out_dir: str, budget: str, temperature: float, scorer: str,
              embed_model: str, field: str, seed: int, as_json: bool) -> None:
    """Train the Bradley–Terry scorer on judged pairs, score every row, select by Gumbel top-k.

    The in-memory recipe ``embed`` → ``critiq`` (:mod:`curate.pipeline.verbs`): OUT_DIR is a run
    folder with curated, rejected and selection parquet and manifest.json."""
    from curate.pipeline.verbs import run_verb

    t0 = time.time()
    steps = [{"use": "embed", "field": field, "model": embed_model},
             {"use": "critiq", "pairs": str(Path(pairs_path).resolve()), "scorer": scorer, "temperature": temperature,
              "budget": budget, "features": {"embed": f"embed/{field}"}}]
    manifest = run_verb("critiq_score", in_path, steps, out_dir, seed=seed).manifest
    sel = manifest["selection"]
    summary = {"output": str(out_dir), "n_in": manifest["rows"]["input"], "n_kept": sel["n_kept"], "field": field,
               "params": sel["params"], "diagnostics": sel["diagnostics"], "seconds": round(time.time() - t0, 2)}
    _emit(as_json, summary)


COMMANDS = [judge, critiq]
