"""Text data for language models: tokens, a vocabulary, per-worker streams.

``--data text:FILE`` reads a UTF-8 file; ``--data text`` (or ``text:embedded``)
the corpus shipped in the package (Genesis to Ruth of the public-domain King
James Version, 1.0 MB, see ``scripts/make_text_corpus.py``). Larger corpora
on a Debian machine: ``/usr/share/dictd/gcide.dict.dz`` (``dict-gcide``,
40 MB once unzipped, with a few stray Windows-1252 bytes: ``--tokens
bytes``) or the ``fortunes`` files under ``/usr/share/games/fortunes``
(2.6 MB without the ``.dat`` indexes); see the README.

Tokens (``--tokens``):

* ``chars`` (default): one token per Unicode character, the vocabulary is
  the sorted set of characters in the file;
* ``bytes``: one token per byte, a fixed vocabulary of 256 (any encoding);
* ``words``: words, punctuation marks and line breaks; the
  ``MAX_WORDS - 1`` most frequent (ties by first appearance) plus ``<unk>``.

The split is deterministic and contiguous: the last ``TEST_FRACTION`` of
the tokens is the test stream, the rest the training stream. Worker ``k`` of
``n`` trains on the ``k``-th of ``n`` contiguous spans of the training
stream (:func:`text_shard`), read by a :class:`TokenStream` as ``batch``
parallel rows ``bptt`` tokens at a time, so a worker's consecutive batches
continue each other and the model's hidden state can be carried across them;
the stream says when it starts over (the shard's boundary), where the state
must be reset.

What a "sample" is for a language model: one predicted token. Samples/s are
tokens/s; an epoch is one pass over the training tokens.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zsgd.errors import ZsgdError

TOKEN_KINDS = ("chars", "bytes", "words")
EMBEDDED_TEXT_PATH = Path(__file__).resolve().parent / "embedded" / "kjv-genesis-ruth.txt"
EMBEDDED_TEXT_NAME = "text:embedded"
#: Share of the tokens (the end of the file) held out as the test stream.
TEST_FRACTION = 0.1
#: Word vocabulary cap: a softmax over more words than this costs more than the LSTM itself.
MAX_WORDS = 10_000
_WORD_RE = re.compile(r"\w+|[^\w\s]|\n")
_SNIFF = 8192


@dataclass
class TextDataset:
    """A tokenized text: training and test streams of token ids, and the vocabulary."""

    name: str
    source: str
    tokens: str
    vocab: list[str]
    train: np.ndarray
    test: np.ndarray
    skipped: list[str] = field(default_factory=list)

    is_text = True
    #: Not an image: models that need one refuse a text data set on this.
    input_shape: tuple[int, ...] = ()

    # The image data sets' attribute names, so shards, the broker's SHARD
    # message and every "n_train = len(ds.y_train)" work unchanged: for text
    # the "samples" are the tokens, and inputs and targets are the one stream
    # (the target of token i is token i + 1, taken by ``TokenStream``).
    @property
    def x_train(self) -> np.ndarray:
        return self.train

    @property
    def y_train(self) -> np.ndarray:
        return self.train

    @property
    def x_test(self) -> np.ndarray:
        return self.test

    @property
    def y_test(self) -> np.ndarray:
        return self.test

    @property
    def classes(self) -> list[str]:
        return self.vocab

    @property
    def n_classes(self) -> int:
        """Vocabulary size: the width of the model's output layer."""
        return len(self.vocab)

    @property
    def n_train(self) -> int:
        """Training tokens (the "samples" of an epoch)."""
        return len(self.train)

    def vocab_digest(self) -> str:
        """A short hash of the vocabulary, recorded with a run so ``--resume`` can refuse another one."""
        return hashlib.sha256("\x00".join([self.tokens, *self.vocab]).encode()).hexdigest()[:16]

    def unigram_perplexity(self) -> float:
        """Perplexity on the test stream of the training stream's token frequencies (add-one smoothed).

        The baseline a language model must beat: what knowing only how often
        each token occurs gives.
        """
        counts = np.bincount(self.train, minlength=self.n_classes).astype(np.float64) + 1.0
        logp = np.log(counts / counts.sum())
        return float(np.exp(-logp[self.test].mean()))


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise ZsgdError(f"text file {path} does not exist (or is not a file): give --data text:FILE with a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ZsgdError(f"cannot read text file {path}: {exc.strerror}") from None
    if not raw:
        raise ZsgdError(f"text file {path} is empty: a language model needs text to train on")
    if b"\x00" in raw[:_SNIFF]:
        raise ZsgdError(f"{path} looks like a binary file (it holds NUL bytes), not text: give a UTF-8 text file")
    return raw


def tokenize(raw: bytes, kind: str, source: str = "text") -> tuple[np.ndarray, list[str]]:
    """Token ids (int32) and the vocabulary of ``raw`` bytes, for token kind ``kind``."""
    if kind not in TOKEN_KINDS:
        raise ZsgdError(f"unknown token kind '{kind}': choose one of {', '.join(TOKEN_KINDS)}")
    if kind == "bytes":
        return np.frombuffer(raw, np.uint8).astype(np.int32), [chr(b) if 32 <= b < 127 else f"\\x{b:02x}" for b in range(256)]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ZsgdError(f"{source} is not UTF-8 text (byte {exc.start} cannot be decoded): convert it, "
                        f"or use --tokens bytes") from None
    if kind == "chars":
        vocab = sorted(set(text))
        lut = {ch: i for i, ch in enumerate(vocab)}
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        table = np.zeros(max(map(ord, vocab)) + 1, np.int32)
        for ch, i in lut.items():
            table[ord(ch)] = i
        return table[codes], vocab
    words = _WORD_RE.findall(text)
    ranked = [w for w, _ in Counter(words).most_common(MAX_WORDS - 1)]  # stable: ties keep first appearance
    vocab = ["<unk>", *ranked]
    lut = {w: i for i, w in enumerate(vocab)}
    return np.fromiter((lut.get(w, 0) for w in words), np.int32, len(words)), vocab


def load_text(path: str | Path | None = None, tokens: str = "chars", test_fraction: float = TEST_FRACTION) -> TextDataset:
    """Read and tokenize a text file (the embedded corpus when ``path`` is None) and split it."""
    embedded = path is None or str(path) in ("", "embedded")
    p = EMBEDDED_TEXT_PATH if embedded else Path(path).expanduser()
    if embedded and not p.is_file():
        raise ZsgdError(f"embedded text corpus {p} is missing: reinstall zsgd")
    raw = _read(p)
    ids, vocab = tokenize(raw, tokens, str(p))
    if not 0.0 < test_fraction < 1.0:
        raise ZsgdError(f"test fraction must be in (0, 1), got {test_fraction}")
    n_test = int(len(ids) * test_fraction)
    if len(ids) < 4 or n_test < 2:
        raise ZsgdError(f"{p} holds only {len(ids)} {tokens}: too short to split into training and test text")
    name = EMBEDDED_TEXT_NAME if embedded else f"text:{p}"
    return TextDataset(name=name, source=str(p), tokens=tokens, vocab=vocab,
                       train=ids[:-n_test].copy(), test=ids[-n_test:].copy())


def parse_text_name(name: str) -> str | None:
    """``text`` / ``text:embedded`` -> None (the embedded corpus); ``text:FILE`` -> FILE."""
    _, _, arg = name.partition(":")
    return None if arg in ("", "embedded") else arg


def batchify(tokens: np.ndarray, batch: int) -> np.ndarray:
    """(batch, len // batch) view: row ``r`` is the ``r``-th contiguous slice of ``tokens``."""
    tokens = np.asarray(tokens)
    if int(batch) < 1:
        raise ZsgdError(f"batch size must be at least 1, got {batch}")
    n = len(tokens) // int(batch)
    return tokens[:n * int(batch)].reshape(int(batch), n)


def text_shard(n_tokens: int, worker: int, n_workers: int) -> tuple[int, int]:
    """[start, stop) of worker ``worker``'s contiguous span of the training stream."""
    if n_workers < 1 or not 0 <= worker < n_workers:
        raise ZsgdError(f"worker index {worker} is out of range for {n_workers} workers")
    return n_tokens * worker // n_workers, n_tokens * (worker + 1) // n_workers


class TokenStream:
    """Endless (x, y, reset) blocks from one contiguous span of tokens.

    The span is cut into ``batch`` rows; block ``k`` is columns
    ``[k*bptt, (k+1)*bptt)`` of every row (``x``) and the same shifted by one
    token (``y``), both (batch, bptt) int64. When the next block would run
    past a row's end the stream starts over at column 0 and ``reset`` is
    True: the hidden state the model carried must be zeroed there, since
    the new block does not continue the previous one. Every block has
    exactly ``batch * bptt`` targets; each row's last tokens that do not
    fill a block are skipped (fewer than ``bptt`` per row).
    """

    def __init__(self, tokens: np.ndarray, batch: int, bptt: int) -> None:
        if int(bptt) < 1:
            raise ZsgdError(f"--bptt must be at least 1, got {bptt}")
        self.rows = batchify(tokens, batch)
        self.batch, self.bptt = int(batch), int(bptt)
        if self.rows.shape[1] < self.bptt + 1:
            raise ZsgdError(f"a span of {len(tokens)} training tokens is shorter than one sequence: {batch} rows "
                            f"of bptt {bptt} + 1 tokens need {self.batch * (self.bptt + 1)}; use a longer text, "
                            f"fewer workers, a smaller --batch-size or --bptt")
        self.blocks_per_pass = (self.rows.shape[1] - 1) // self.bptt
        self.block = 0
        self.passes = 0

    @property
    def tokens_per_block(self) -> int:
        return self.batch * self.bptt

    def __iter__(self) -> TokenStream:
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray, bool]:
        reset = self.block == 0
        s = self.block * self.bptt
        x = np.ascontiguousarray(self.rows[:, s:s + self.bptt], dtype=np.int64)
        y = np.ascontiguousarray(self.rows[:, s + 1:s + 1 + self.bptt], dtype=np.int64)
        self.block += 1
        if self.block == self.blocks_per_pass:
            self.block = 0
            self.passes += 1
        return x, y, reset
