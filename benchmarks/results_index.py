"""Writes ``docs/results.md``: every committed results file with what it measures, its hardware,
its date and the command that made it (read from the file).

    python benchmarks/results_index.py            # rewrites docs/results.md

``tests/test_docs.py`` fails when the page does not list exactly the files present.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
COMMAND = re.compile(r"((?:python|bash) benchmarks/[^`\n]*|maxscore compare [^`\n]*)")
NAME = re.compile(r"_(?P<hardware>[a-z0-9-]+)_(?P<date>20\d{4})(?:\.md)?$")


def result_files() -> list[Path]:
    """The results files: each ``*.md`` in the folder, and each study folder's ``README.md``."""
    files = sorted(RESULTS.glob("*.md")) + sorted(RESULTS.glob("*/README.md"))
    return [f for f in files if f.is_file()]


def row(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    title = next((line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")), "")
    name = path.parent.name if path.name == "README.md" else path.name
    match = NAME.search(name)
    hardware, date = (match["hardware"], f"{match['date'][:4]}-{match['date'][4:]}") if match else ("", "")
    command = COMMAND.search(text)
    shown = command.group(1).strip() if command else "see the file"
    shown = re.split(r" --(?:out|md) ", shown)[0]  # the output files are the file itself
    if len(shown) > 100:  # cut at a space, never inside a path
        shown = shown[: shown.rfind(" ", 0, 97)] + " ..."
    relative = path.relative_to(ROOT).as_posix()
    link = f"[`{relative.removeprefix('benchmarks/results/')}`](../{relative})"
    return f"| {link} | {title} | {hardware} | {date} | `{shown}` |"


def page() -> str:
    rows = "\n".join(row(path) for path in result_files())
    return f"""# Results

Every committed benchmark and study result (`benchmarks/results/`), with what it measures, the
hardware, the date (year-month) and the command that made it (the file has the full one, the
commit and what else ran). Ratios are measured against a baseline in the same run; timings on
the shared 2-core machines move by 10-30% between runs. This page is written by
`python benchmarks/results_index.py`; a test keeps it listing exactly the files present.
Back to the [README](../README.md).

| file | what | hardware | date | command |
|---|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    PAGE.write_text(page(), encoding="utf-8")
    print(f"wrote {PAGE} ({len(result_files())} files)")
