"""The bundled corpus, the document split, user corpora, batches and the tokenizer."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import pytest
import torch

from maxscore.train.data import SPLITS, load_corpus
from maxscore.train.tokenizer import END_OF_TEXT, encode, train_tokenizer

DATA_README = Path(__file__).resolve().parents[2] / "data" / "README.md"


def test_bundled_corpus_is_the_state_of_the_union():
    corpus = load_corpus()
    assert len(corpus.documents) == 233
    assert 10_500_000 < sum(map(len, corpus.documents)) < 11_000_000
    assert corpus.documents[0].startswith("Fellow-Citizens of the Senate and House of Representatives")
    data = resources.files("maxscore.data").joinpath("sotu.jsonl.xz").read_bytes()
    assert hashlib.sha256(data).hexdigest() in DATA_README.read_text()  # the recorded checksum


def test_split_is_deterministic_disjoint_and_complete():
    corpus = load_corpus()
    parts = {name: corpus.split(name) for name in SPLITS}
    assert [len(parts[name]) for name in SPLITS] == [187, 23, 23]
    assert parts == {name: load_corpus().split(name) for name in SPLITS}
    indices = {name: {corpus.documents.index(d) for d in docs} for name, docs in parts.items()}
    assert not indices["train"] & indices["validation"] and not indices["train"] & indices["test"]
    assert not indices["validation"] & indices["test"]
    assert set().union(*indices.values()) == set(range(233))


def test_user_directory_and_file(tmp_path, small_corpus_dir):
    directory = load_corpus(small_corpus_dir)
    assert len(directory.documents) == 20 and directory.split("test") == [
        directory.documents[9],
        directory.documents[19],
    ]
    text = "".join(f"line {i} of a plain file\n" for i in range(1000))
    path = tmp_path / "book.txt"
    path.write_text(text)
    pieces = load_corpus(path)
    assert "".join(pieces.documents) == text and 90 <= len(pieces.documents) <= 101


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tmp: tmp / "missing.txt", "does not exist"),
        (lambda tmp: tmp, "holds no"),
    ],
)
def test_bad_data_paths(tmp_path, make, match):
    with pytest.raises(ValueError, match=match):
        load_corpus(make(tmp_path))


def test_tokenizer_round_trip_and_determinism(small_corpus_dir, tmp_path, monkeypatch):
    corpus = load_corpus(small_corpus_dir)
    tokenizer = train_tokenizer(corpus, 384)
    assert tokenizer.get_vocab_size() == 384 and tokenizer.token_to_id(END_OF_TEXT) == 0
    for text in [
        "Fellow-Citizens of the Senate",
        "  two  spaces\n\ttab, émigré, 3.14 — ok 🙂",
        corpus.documents[3],
    ]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    monkeypatch.setenv("MAXSCORE_CACHE", str(tmp_path / "fresh"))  # no cache: trained again
    again = train_tokenizer(corpus, 384)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert (tmp_path / "fresh" / "tokenizers").is_dir()


def test_token_stream_batches_and_windows(small_corpus_dir):
    corpus = load_corpus(small_corpus_dir)
    stream = encode(train_tokenizer(corpus, 384), corpus.split("validation"))
    assert stream.characters == sum(map(len, corpus.split("validation")))
    first = stream.batch(3, 16, torch.Generator().manual_seed(5))
    assert first.shape == (3, 17) and torch.equal(
        first, stream.batch(3, 16, torch.Generator().manual_seed(5))
    )
    windows = stream.windows(16)
    assert windows.shape[1] == 17 and torch.equal(windows[1, 0], windows[0, 16])
    with pytest.raises(ValueError, match="fewer than"):
        stream.windows(10**7)
