"""The docs name no results file that is missing, and ``docs/results.md`` lists exactly the
committed results files (the code blocks themselves run through Sybil, ``conftest.py``)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"
# a results path, or a results file's bare name: <theme>_<hardware>_<yyyymm>[.md|.json|.log]
NAMED = re.compile(
    r"benchmarks/results/[\w./-]+|\b[a-z][\w-]*_(?:cpu|h100|h200|gpu)[\w-]*_20\d{4}(?:\.md|\.json|\.log)?/?"
)


def _index_module():
    spec = importlib.util.spec_from_file_location("results_index", ROOT / "benchmarks" / "results_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def named_results() -> set[str]:
    found = set()
    for page in PAGES:
        for match in NAMED.findall(page.read_text(encoding="utf-8")):
            found.add(match.rstrip("/.").removeprefix("benchmarks/results/"))
    return found


def test_every_results_file_the_docs_name_exists():
    names = named_results()
    assert len(names) > 20  # the pattern still finds the docs' references
    missing = sorted(name for name in names if name and not (RESULTS / name).exists())
    assert not missing, f"the docs name results that are not in benchmarks/results: {missing}"


def test_the_results_page_lists_exactly_the_committed_files():
    index = _index_module()
    assert (ROOT / "docs" / "results.md").read_text(encoding="utf-8") == index.page(), (
        "docs/results.md is stale: run python benchmarks/results_index.py"
    )


def test_the_name_pattern_sees_both_forms():
    text = "see `benchmarks/results/sweep_cpu-2core-epyc_202612.md` and `layer_h100_202611.md`"
    assert set(NAMED.findall(text)) == {
        "benchmarks/results/sweep_cpu-2core-epyc_202612.md",
        "layer_h100_202611.md",
    }
