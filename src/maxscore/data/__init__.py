"""Bundled data: ``sotu.jsonl.xz``, the US State of the Union addresses 1790-2021 (see data/README.md)."""
