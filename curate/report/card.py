"""The dataset card of a run (``README.md`` on the Hub): ``huggingface_hub.DatasetCard`` with YAML
metadata (configs, split sizes, licence, source datasets) and a body that says how the subset was
made: the sources with their hashes and licences, the funnel with drop reasons, the selector, its
budget and the seed, and citations of the methods the recipe used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from curate._lazy import require
from curate.pipeline.results import Run, selector_steps

#: step ``use`` -> (short reference, BibTeX). Only methods whose papers the docs name.
CITATIONS: dict[str, tuple[str, str]] = {}


def _cite(uses: tuple[str, ...], key: str, authors: str, title: str, year: int, eprint: str) -> None:
    short = f"{authors.split(' and ')[0].split(',')[0]} et al. ({year}), {title}, arXiv:{eprint}"
    bib = (f"@article{{{key},\n  title = {{{title}}},\n  author = {{{authors}}},\n  year = {{{year}}},\n"
           f"  journal = {{arXiv preprint arXiv:{eprint}}}\n}}")
    for use in uses:
        CITATIONS[use] = (short, bib)


_cite(("rds",), "ivison2025rds", "Ivison, Hamish and others", "Large-Scale Data Selection for Instruction Tuning",
      2025, "2503.01807")
_cite(("tarot",), "feng2025tarot", "Feng, Lan and others", "TAROT: Targeted Data Selection via Optimal Transport",
      2025, "2412.00420")
_cite(("less", "grad_features", "warmup"), "xia2024less", "Xia, Mengzhou and others",
      "LESS: Selecting Influential Data for Targeted Instruction Tuning", 2024, "2402.04333")
_cite(("bids",), "dai2025bids", "Dai, Qirun and others", "Balanced and Influential Data Selection", 2025, "2501.12147")
_cite(("quad",), "zhang2025quad", "Zhang, Chi and others",
      "Harnessing Diversity for Important Data Selection in Pretraining Large Language Models", 2025, "2409.16986")
_cite(("critiq", "critiq_mine", "critiq_annotate"), "guo2025critiq", "Guo, Honglin and others",
      "CritiQ: Mining Data Quality Criteria from Human Preferences", 2025, "2502.19279")
_cite(("ches", "ches_states"), "razin2025ches", "Razin, Noam and others",
      "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization", 2025, "2410.08847")
_cite(("dsir",), "xie2023dsir", "Xie, Sang Michael and others",
      "Data Selection for Language Models via Importance Resampling", 2023, "2302.03169")
_cite(("deita",), "liu2024deita", "Liu, Wei and others",
      "What Makes Good Data for Alignment? A Comprehensive Study of Automatic Data Selection in Instruction Tuning",
      2024, "2312.15685")
_cite(("ifd",), "li2024ifd", "Li, Ming and others", "From Quantity to Quality: Boosting LLM Performance with "
      "Self-Guided Data Selection for Instruction Tuning", 2024, "2308.12032")
_cite(("minhash_dedup",), "lee2022dedup", "Lee, Katherine and others",
      "Deduplicating Training Data Makes Language Models Better", 2022, "2107.06499")
_cite(("semantic_dedup",), "abbas2023semdedup", "Abbas, Amro and others",
      "SemDeDup: Data-efficient learning at web-scale through semantic deduplication", 2023, "2303.09540")
_cite(("influence_scores",), "grosse2023influence", "Grosse, Roger and others",
      "Studying Large Language Model Generalization with Influence Functions", 2023, "2308.03296")


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` rows."""
    for bound, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M")):
        if n < bound:
            return name
    return "10M<n<100M"


def _sources(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for role in ("inputs", "targets"):
        for e in manifest.get(role) or []:
            path = str(e.get("path") or "")
            shown = path if "://" in path or path.startswith("<") else Path(path).name  # no local folder names
            out.append({"role": role[:-1], "source": e.get("hub") or shown,
                        "revision": e.get("resolved_revision"), "sha256": e.get("sha256"),
                        "license": e.get("license"), "hub": e.get("hub")})
    return out


def _md_cell(value: Any) -> str:
    return str("" if value is None else value).replace("|", "\\|").replace("\n", " ")


def card_text(run: Run, *, repo_id: str | None = None, splits: Mapping[str, tuple[str, int, int]],
              fmt: str | None = None) -> str:
    """The card's Markdown with its YAML header.

    Args:
        run: the run.
        repo_id: ``ORG/NAME`` of the dataset repo (for the loading snippet).
        splits: split -> (path in the repo, rows, bytes).
        fmt: the trainer format the data files were written in (None: canonical columns).
    """
    hub = require("huggingface_hub", "dataset cards")
    m = run.manifest
    recipe = m.get("recipe", {})
    sources = _sources(m)
    licences = {s["license"] for s in sources}
    data = hub.DatasetCardData(
        pretty_name=recipe.get("name") or run.run_dir.name,
        license=next(iter(licences)) if len(licences) == 1 and None not in licences else "other",
        size_categories=[size_category(splits["curated"][1])] if "curated" in splits else None,
        source_datasets=sorted({s["hub"] for s in sources if s["hub"]}) or None,
        task_categories=["text-generation"],
        tags=["curate", "data-selection"],
        configs=[{"config_name": "default",
                  "data_files": [{"split": name, "path": path} for name, (path, _, _) in splits.items()]}],
        dataset_info={"splits": [{"name": name, "num_examples": n, "num_bytes": b}
                                 for name, (_, n, b) in splits.items()]},
    )
    uses = [s.get("use") for s in recipe.get("steps", [])]
    sel = selector_steps(m)
    rows = m.get("rows", {})
    lines = [
        f"# {recipe.get('name') or run.run_dir.name}", "",
        recipe.get("description") or "A subset curated with [curate](https://pypi.org/project/curate/).", "",
        f"curated **{rows.get('curated')}** of {rows.get('input')} rows (rejected {rows.get('rejected')}); "
        f"seed {m.get('seed')}; recipe hash `{m.get('recipe_hash')}`; curate {m.get('curate_version')}.",
    ]
    if fmt:
        lines.append(f"Rows are in the `{fmt}` trainer format.")
    if repo_id:
        lines += ["", "```python", "from datasets import load_dataset",
                  f'ds = load_dataset("{repo_id}", split="curated")', "```"]
    lines += ["", "## Selection", ""]
    lines += [f"- `{s.get('name')}` ({s.get('use')}): budget `{s.get('budget')}`" for s in sel] or ["- no selector"]
    lines += ["", "## Sources", "", "| role | source | revision | sha256 | licence |", "|---|---|---|---|---|"]
    lines += [f"| {s['role']} | {_md_cell(s['source'])} | {_md_cell(s['revision'])} | {_md_cell((s['sha256'] or '')[:16])} "
              f"| {_md_cell(s['license'] or 'unknown')} |" for s in sources]
    lines += ["", "## Funnel", "", "| step | in | out | dropped (reason: rows) |", "|---|---|---|---|"]
    for s in m.get("steps", []):
        dropped = "; ".join(f"{_md_cell(r)[:80]}: {n}" for r, n in sorted((s.get("dropped") or {}).items(),
                                                                             key=lambda kv: (-kv[1], kv[0])))
        lines.append(f"| {_md_cell(s.get('step'))} | {s.get('rows_in')} | {s.get('rows_out')} | {dropped} |")
    lines += ["", "## Files", "", *[f"- `{path}`: {name} ({n} rows)" for name, (path, n, _) in splits.items()],
              "- `recipe.resolved.yaml`, `manifest.json`: what reproduces this subset; `report.html`: the run report"]
    cites = []
    for use in uses:
        if use in CITATIONS and CITATIONS[use] not in cites:
            cites.append(CITATIONS[use])
    if cites:
        lines += ["", "## Citations", "", *[f"- {short}" for short, _ in cites], "", "```bibtex",
                  *[bib for _, bib in cites], "```"]
    # the YAML is written by huggingface_hub; the body is plain text (no template engine sees it)
    return hub.DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n").content


def write_card(run: Run, path: str | Path, **kw: Any) -> Path:
    """Write :func:`card_text` to ``path`` atomically."""
    from curate.io.writers import write_text

    path = Path(path)
    write_text(card_text(run, **kw), path)
    return path
