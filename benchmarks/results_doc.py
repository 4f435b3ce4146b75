"""Builds the measured-results document from the results files the benchmarks write.

    python benchmarks/results_doc.py            # write benchmarks/RESULTS.md and README.md's headline block
    python benchmarks/results_doc.py --check    # exit 1, naming what differs, when either is not what the files give

benchmarks/RESULTS.md: one section per file in benchmarks/results/ (title, command, date, commit, device, dtype,
the tables, the spread over runs, notes). README.md: the block between `<!-- results:headline -->` and
`<!-- /results:headline -->` becomes a short table of the files' headline figures, each linking to its section.
Neither is edited by hand. Imports no torch: it only reads JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import RESULTS_DIR, ROOT, SCHEMA

DOC = ROOT / "benchmarks" / "RESULTS.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results:headline -->", "<!-- /results:headline -->"
SPREAD_COLUMNS = ["value", "median", "min", "max", "n"]


class ResultsError(Exception):
    """A results file or the README is not what this script can read; the message names which."""


def load_results(folder: Path) -> list[dict]:
    """Every results file of `folder`, by name."""
    out = []
    for path in sorted(Path(folder).glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ResultsError(f"{path}: not readable JSON ({error})") from None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            raise ResultsError(f"{path}: schema is {data.get('schema') if isinstance(data, dict) else None!r}, "
                               f"expected {SCHEMA!r}")
        if data.get("name") != path.stem:
            raise ResultsError(f"{path}: its name {data.get('name')!r} is not its file name {path.stem!r}")
        out.append(data)
    return out


def cell(value) -> str:
    """A table cell: floats to 4 significant digits, whole numbers as they are, nothing as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def render_table(table: dict) -> str:
    """A results file's table as Markdown (its note, if any, below it)."""
    lines = ["| " + " | ".join(cell(c) for c in table["columns"]) + " |",
             "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table["rows"]]
    if table.get("note"):
        lines += ["", table["note"]]
    return "\n".join(lines)


def _commit(git: dict) -> str:
    commit = (git or {}).get("commit")
    if not commit:
        return "unknown"
    return f"`{commit[:12]}`" + (" (tree had uncommitted changes)" if git.get("dirty") else "")


def label(result: dict, results: list[dict]) -> str:
    """The result's title, with its file name where another file has the same title (one script, two runs)."""
    shared = sum(r["title"] == result["title"] for r in results) > 1
    return f"{result['title']} ({result['name']})" if shared else result["title"]


def section(result: dict, results: list[dict]) -> str:
    """One results file as a section of RESULTS.md."""
    lines = [f'<a id="{result["name"]}"></a>', f"## {label(result, results)}", "", f"`{result['command']}`", "",
             "| | |", "|---|---|",
             f"| date (UTC) | {result.get('date') or 'unknown'} |",
             f"| commit | {_commit(result.get('git'))} |",
             f"| device | {cell(result.get('device'))} |",
             f"| dtype | {cell(result.get('dtype'))} |",
             f"| torch | {cell(result.get('torch'))} |",
             f"| runs | {len(result.get('runs') or [])} |",
             f"| file | [results/{result['name']}.json](results/{result['name']}.json) |"]
    for table in result.get("tables") or []:
        lines += ["", f"### {table['title']}", "", render_table(table)]
    summary = result.get("summary") or {}
    if summary:
        rows = [[key, s.get("median"), s.get("min"), s.get("max"), s.get("n")] for key, s in summary.items()]
        lines += ["", "<details><summary>Spread over runs (median / min / max; n)</summary>", "",
                  render_table({"columns": SPREAD_COLUMNS, "rows": rows}), "", "</details>"]
    notes = result.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines)


def build_document(results: list[dict]) -> str:
    """RESULTS.md for `results` (an empty list: a document that says there are none yet)."""
    lines = ["# Measured results", "",
             "Built by `python benchmarks/results_doc.py` from the files in `benchmarks/results/`, one section per "
             "file; not edited by hand (`python benchmarks/results_doc.py --check` fails when it differs from "
             "them). Each file is written by the script named in its command.", ""]
    if not results:
        lines += ["No results files yet: every script in `benchmarks/` writes `benchmarks/results/<name>.json` "
                  "when it runs; then run `python benchmarks/results_doc.py`."]
        return "\n".join(lines) + "\n"
    lines += [f"- [{label(r, results)}](#{r['name']})" for r in results]
    for result in results:
        lines += ["", section(result, results)]
    return "\n".join(lines) + "\n"


def build_headline(results: list[dict]) -> str:
    """The README block between the markers (markers excluded)."""
    rows = [(h, r) for r in results for h in r.get("headline") or []]
    if not rows:
        return "No measured headline figures yet ([benchmarks/RESULTS.md](benchmarks/RESULTS.md))."
    lines = ["| figure | value | measured in |", "|---|---|---|"]
    for h, r in rows:
        value = f"{cell(h['value'])} {h.get('unit') or ''}".strip()
        lines.append(f"| {cell(h['name'])} | {value} | [{cell(label(r, results))}](benchmarks/RESULTS.md#{r['name']}) |")
    return "\n".join(lines)


def replace_block(readme: str, block: str) -> str:
    """`readme` with the text between the headline markers replaced by `block`."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ResultsError(f"README.md: needs exactly one {BEGIN} followed by one {END}")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def check(folder: Path, doc: Path, readme: Path) -> list[str]:
    """What differs from what the results files give (empty: both are up to date)."""
    results = load_results(folder)
    problems = []
    if not doc.exists() or doc.read_text() != build_document(results):
        problems.append(f"{doc} is not what the results files in {folder} give")
    text = readme.read_text()
    if replace_block(text, build_headline(results)) != text:
        problems.append(f"{readme}: the block between {BEGIN} and {END} is not what the results files give")
    return problems


def write(folder: Path, doc: Path, readme: Path) -> None:
    from layerboost_core.cache_dir import write_text

    results = load_results(folder)
    write_text(doc, build_document(results))
    text = readme.read_text()
    updated = replace_block(text, build_headline(results))
    if updated != text:
        write_text(readme, updated)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when RESULTS.md or README's block is stale")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--doc", type=Path, default=DOC, help="the results document (default: benchmarks/RESULTS.md)")
    parser.add_argument("--readme", type=Path, default=README)
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.results_dir, args.doc, args.readme)
            for problem in problems:
                print(f"stale: {problem}; run python benchmarks/results_doc.py", file=sys.stderr)
            sys.exit(1 if problems else 0)
        write(args.results_dir, args.doc, args.readme)
        print(f"wrote {args.doc} and the headline block of {args.readme}")
    except ResultsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2 if not args.check else 1)


if __name__ == "__main__":
    main()
