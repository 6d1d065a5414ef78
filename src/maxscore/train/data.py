"""Text corpora, the document split, token streams and batches.

The default corpus is the bundled US State of the Union addresses 1790-2021 (233 speeches,
public domain; see data/README.md).  Documents are split deterministically in corpus order:
every 10th document from the 5th on goes to validation, every 10th from the 10th on to test,
the rest to training.  A user corpus is a directory (each ``*.txt`` file below it, in sorted
order, is a document) or a text file (cut at line breaks into 100 documents of about equal
size, so that it splits the same way).
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

SPLITS = ("train", "validation", "test")
BUNDLED = "sotu.jsonl.xz"
PIECES_PER_FILE = 100


@dataclass(frozen=True, slots=True)
class Corpus:
    """Documents, their name (for caching) and a checksum of their text."""

    name: str
    documents: tuple[str, ...]

    @property
    def checksum(self) -> str:
        digest = hashlib.sha256()
        for document in self.documents:
            digest.update(document.encode("utf-8") + b"\0")
        return digest.hexdigest()[:16]

    def split(self, name: str) -> list[str]:
        """The documents of split ``name`` (``train``, ``validation`` or ``test``)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return [doc for i, doc in enumerate(self.documents) if split_of(i) == name]


def split_of(index: int) -> str:
    return "validation" if index % 10 == 4 else "test" if index % 10 == 9 else "train"


def load_corpus(path: str | Path | None = None) -> Corpus:
    """The bundled corpus (``path`` None), a directory of ``*.txt`` files, or one text file."""
    if path is None:
        raw = resources.files("maxscore.data").joinpath(BUNDLED).read_bytes()
        rows = [json.loads(line) for line in lzma.decompress(raw).decode("utf-8").splitlines()]
        return Corpus("sotu", tuple(row["text"] for row in rows))
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(
                f"data directory {str(path)!r} holds no *.txt files; add some or pass a text file"
            )
        return Corpus(path.name, tuple(f.read_text(encoding="utf-8") for f in files))
    if path.is_file():
        return Corpus(path.stem, tuple(_pieces(path.read_text(encoding="utf-8"))))
    raise ValueError(
        f"data path {str(path)!r} does not exist; pass a text file or a directory of *.txt files"
    )


def _pieces(text: str) -> list[str]:
    lines = text.splitlines(keepends=True)
    target = max(1, len(text) // PIECES_PER_FILE)
    pieces, current, size = [], [], 0
    for line in lines:
        current.append(line)
        size += len(line)
        if size >= target:
            pieces.append("".join(current))
            current, size = [], 0
    if current:
        pieces.append("".join(current))
    if not "".join(pieces).strip():
        raise ValueError("the data file is empty; pass a file with text")
    return pieces


@dataclass(frozen=True, slots=True)
class TokenStream:
    """A split as one token sequence (documents joined by the end-of-text token)."""

    tokens: torch.Tensor  # int64 [N]
    characters: int

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
        """int64 [B, seq_len + 1] random windows (inputs and shifted targets)."""
        if self.tokens.numel() <= seq_len + 1:
            raise ValueError(
                f"the split has {self.tokens.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}"
            )
        starts = torch.randint(0, self.tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
        return torch.stack([self.tokens[s : s + seq_len + 1] for s in starts.tolist()])

    def windows(self, seq_len: int, limit: int | None = None) -> torch.Tensor:
        """int64 [windows, seq_len + 1]: consecutive windows over the stream (a partial last is dropped)."""
        count = (self.tokens.numel() - 1) // seq_len
        if limit is not None:
            count = min(count, limit)
        if count < 1:
            raise ValueError(
                f"the text has {self.tokens.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}"
            )
        index = torch.arange(count)[:, None] * seq_len + torch.arange(seq_len + 1)[None]
        return self.tokens[index]
