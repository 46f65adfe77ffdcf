"""Text data: tokenizers, the embedded corpus, the split, per-worker spans and streams, bad files."""

from __future__ import annotations

import numpy as np
import pytest

from zsgd.data.text import (EMBEDDED_TEXT_PATH, TokenStream, batchify, load_text, parse_text_name, text_shard,
                            tokenize)
from zsgd.errors import ZsgdError


def test_embedded_corpus_is_small_public_domain_text():
    raw = EMBEDDED_TEXT_PATH.read_bytes()
    assert 500_000 < len(raw) <= 2 * 1024 * 1024
    assert raw.startswith(b"Genesis 1\nIn the beginning God created the heaven and the earth.")
    ds = load_text(None)
    assert ds.name == "text:embedded" and ds.tokens == "chars"
    assert 60 <= ds.n_classes <= 80
    # the split is contiguous: train then test reproduce the file
    text = raw.decode()
    assert "".join(ds.vocab[i] for i in np.concatenate([ds.train, ds.test])) == text
    assert len(ds.test) == int(len(text) * 0.1)
    # and the unigram baseline is what a character model must beat (English: ~20-30)
    assert 15 < ds.unigram_perplexity() < 40


@pytest.mark.parametrize("kind", ["chars", "bytes", "words"])
def test_tokenizers_round_trip(kind):
    text = "héllo world,\nhello  wörld!\n"
    ids, vocab = tokenize(text.encode(), kind)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < len(vocab)
    if kind == "chars":
        assert "".join(vocab[i] for i in ids) == text and vocab == sorted(set(text))
    elif kind == "bytes":
        assert len(vocab) == 256 and bytes(ids.astype(np.uint8).tolist()) == text.encode()
    else:
        assert [vocab[i] for i in ids] == ["héllo", "world", ",", "\n", "hello", "wörld", "!", "\n"]


def test_word_vocabulary_is_capped_with_unk(monkeypatch):
    import zsgd.data.text as T

    monkeypatch.setattr(T, "MAX_WORDS", 3)
    ids, vocab = tokenize(b"a a a b b c d", "words")
    assert vocab == ["<unk>", "a", "b"]
    assert ids.tolist() == [1, 1, 1, 2, 2, 0, 0]


def test_loading_a_file_is_deterministic(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    a, b = load_text(f), load_text(f)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.test, b.test)
    assert a.vocab_digest() == b.vocab_digest() != load_text(f, tokens="bytes").vocab_digest()
    assert a.name == f"text:{f}"
    assert parse_text_name("text") is None and parse_text_name("text:embedded") is None
    assert parse_text_name("text:/x/y.txt") == "/x/y.txt"


@pytest.mark.parametrize("content,msg", [
    (b"", "is empty"),
    (b"\x7fELF\x02\x01\x01\x00\x00\x00" + bytes(range(256)), "binary"),
    (b"ab", "too short"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, msg):
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    with pytest.raises(ZsgdError, match=msg) as exc:
        load_text(f)
    assert "\n" not in str(exc.value)


def test_bad_utf8_and_missing_file(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\xe9 au lait ".encode("latin-1") * 10)
    with pytest.raises(ZsgdError, match="not UTF-8.*--tokens bytes"):
        load_text(f)
    assert load_text(f, tokens="bytes").n_classes == 256
    with pytest.raises(ZsgdError, match="does not exist"):
        load_text(tmp_path / "nope.txt")
    with pytest.raises(ZsgdError, match="unknown token kind"):
        load_text(f, tokens="subwords")


def test_worker_spans_are_contiguous_and_cover_the_stream():
    n = 1003
    spans = [text_shard(n, k, 4) for k in range(4)]
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(s[1] - s[0] for s in spans) - min(s[1] - s[0] for s in spans) <= 1
    with pytest.raises(ZsgdError):
        text_shard(n, 4, 4)


def test_token_stream_continues_rows_and_resets_at_the_boundary():
    tokens = np.arange(2 * 23)
    rows = batchify(tokens, 2)
    assert rows.shape == (2, 23) and rows[1, 0] == 23
    s = TokenStream(tokens, batch=2, bptt=5)
    assert s.blocks_per_pass == 4  # (23 - 1) // 5
    blocks = [next(s) for _ in range(5)]
    resets = [r for _, _, r in blocks]
    assert resets == [True, False, False, False, True]
    x0, y0, _ = blocks[0]
    np.testing.assert_array_equal(x0, [[0, 1, 2, 3, 4], [23, 24, 25, 26, 27]])
    np.testing.assert_array_equal(y0, x0 + 1)
    x1, _, _ = blocks[1]
    np.testing.assert_array_equal(x1[:, 0], x0[:, -1] + 1)  # the next block continues each row
    np.testing.assert_array_equal(blocks[4][0], x0)  # and after the boundary it starts over
    assert s.passes == 1 and x0.dtype == np.int64 and x0.flags.c_contiguous


def test_a_span_shorter_than_one_sequence_is_an_error():
    with pytest.raises(ZsgdError, match="shorter than one sequence"):
        TokenStream(np.arange(100), batch=4, bptt=25)
    TokenStream(np.arange(104), batch=4, bptt=25)  # 26 tokens per row: exactly one block
