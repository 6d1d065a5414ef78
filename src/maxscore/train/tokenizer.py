"""Byte-level BPE (HuggingFace ``tokenizers``) trained on the training split, cached on disk.

Byte-level: every string round-trips exactly.  The cache key is the corpus checksum and the
vocabulary size; the cache folder is ``$MAXSCORE_CACHE`` or ``~/.cache/maxscore``.  Each run
keeps its own copy (``tokenizer.json``) next to its checkpoints.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from maxscore.train.data import Corpus, TokenStream

END_OF_TEXT = "<|endoftext|>"


def cache_dir() -> Path:
    return Path(os.environ.get("MAXSCORE_CACHE", Path.home() / ".cache" / "maxscore"))


def train_tokenizer(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """The BPE of ``corpus``'s training split (from the cache when it is there)."""
    path = cache_dir() / "tokenizers" / f"{corpus.name}-{corpus.checksum}-{vocab_size}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.split("train"), trainer)
    save_tokenizer(tokenizer, path)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    """Writes ``tokenizer.json`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    tokenizer.save(str(temporary))
    os.replace(temporary, path)


def encode(tokenizer: Tokenizer, documents: list[str]) -> TokenStream:
    """Documents as one token stream, each followed by the end-of-text token (if the tokenizer has it)."""
    end = tokenizer.token_to_id(END_OF_TEXT)  # None for a foreign tokenizer: no separator
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids)
        if end is not None:
            ids.append(end)
    return TokenStream(torch.tensor(ids, dtype=torch.int64), sum(len(d) for d in documents))
