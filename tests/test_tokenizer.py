"""Tests for rnnlm.tokenizer: vocabularies, streaming reads, encoding and token dirs."""

import json
from pathlib import Path

import numpy as np
import pytest

from rnnlm.errors import RnnlmError
from rnnlm.tokenizer import (
    EOS,
    UNK,
    Vocab,
    build_vocab,
    encode_file,
    load_token_dir,
    load_vocab_source,
    smallest_uint_dtype,
    tokenize_file,
)

PTB_DIR = Path(__file__).parents[2] / "shared" / "data" / "ptb"


def write(tmp_path, content, name="corpus.txt"):
    """Write str (as UTF-8) or bytes to tmp_path/name and return the path."""
    path = tmp_path / name
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --- round trips --------------------------------------------------------------


def test_word_round_trip_normalizes_whitespace(tmp_path):
    text = "the  cat sat\n\ton the   mat \n\nthe end"
    vocab = build_vocab(write(tmp_path, text))
    ids, unknown = vocab.encode_text(text)
    assert ids.dtype == np.int64
    assert unknown == 0
    assert vocab.decode(ids) == "the cat sat\non the mat\n\nthe end\n"
    assert ids[-1] == vocab.boundary_id
    assert (ids == vocab.boundary_id).sum() == 4


def test_word_encode_line_appends_eos(tmp_path):
    vocab = build_vocab(write(tmp_path, "a b\n"))
    ids, unknown = vocab.encode_line("b a zzz")
    assert ids == [vocab.index["b"], vocab.index["a"], vocab.unk_id, vocab.boundary_id]
    assert unknown == 1
    assert vocab.tokens[vocab.boundary_id] == EOS


CHAR_TEXT = (
    "caf\u00e9 and cafe\u0301\n"  # precomposed and combining accent
    "\u6f22\u5b57 kanji\n"  # 漢字
    "smile \U0001f600 thumbs \U0001f44d\U0001f3fd\n"  # 😀 and 👍🏽 (two code points)
    "no final newline"
)


def test_char_round_trip_exact_with_unicode(tmp_path):
    vocab = build_vocab(write(tmp_path, CHAR_TEXT), level="char")
    ids, unknown = vocab.encode_text(CHAR_TEXT)
    assert unknown == 0
    assert vocab.decode(ids) == CHAR_TEXT
    # One id per code point: no final "\n" since the text does not end with one.
    assert len(ids) == len(CHAR_TEXT)


def test_char_ids_are_code_points_not_bytes(tmp_path):
    vocab = build_vocab(write(tmp_path, CHAR_TEXT), level="char")
    for char in ("\u00e9", "\u0301", "\u6f22", "\u5b57", "\U0001f600", "\U0001f44d", "\U0001f3fd"):
        assert char in vocab.index
    ids, _ = vocab.encode_line("\U0001f44d\U0001f3fd")
    assert vocab.decode(ids) == "\U0001f44d\U0001f3fd\n"
    assert len(ids) == 3
    assert all(len(token) == 1 for token in vocab.tokens if token != UNK)


def test_char_file_encoding_matches_text_and_newline_always_in_vocab(tmp_path):
    path = write(tmp_path, "abca")  # a single line with no newline at all
    vocab = build_vocab(path, level="char")
    assert vocab.tokens[vocab.boundary_id] == "\n"
    assert UNK in vocab.index
    ids, unknown = encode_file(path, vocab)
    assert unknown == 0
    assert vocab.decode(ids) == "abca\n"  # every file line ends with the boundary
    assert vocab.decode(vocab.encode_text("abca")[0]) == "abca"


def test_char_unknown_decodes_as_replacement_char(tmp_path):
    vocab = build_vocab(write(tmp_path, "abc\n"), level="char")
    ids, unknown = vocab.encode_text("a\u00e9c\n")
    assert unknown == 1
    assert vocab.decode(ids) == "a\ufffdc\n"


def test_encode_text_word_level_eos_on_every_line(tmp_path):
    vocab = build_vocab(write(tmp_path, "a b\n"))
    eos = vocab.boundary_id
    assert vocab.encode_text("a\nb")[0].tolist() == [vocab.index["a"], eos, vocab.index["b"], eos]
    assert vocab.encode_text("a\r\nb\n")[0].tolist() == vocab.encode_text("a\nb")[0].tolist()
    assert vocab.encode_text("")[0].size == 0


def test_decode_rejects_out_of_range_ids(tmp_path):
    vocab = build_vocab(write(tmp_path, "a b\n"))
    with pytest.raises(RnnlmError):
        vocab.decode([0, len(vocab)])
    with pytest.raises(RnnlmError):
        vocab.decode([-1])


# --- vocabulary rules ---------------------------------------------------------


def test_vocab_order_count_desc_then_token_asc(tmp_path):
    vocab = build_vocab(write(tmp_path, "ba a ab c a ab\nc d ba a\n"))
    # counts: a=3; ab, ba, c, <eos>=2; d=1; <unk>=0 ("<" sorts before letters)
    assert vocab.tokens == ["a", EOS, "ab", "ba", "c", "d", UNK]


def test_min_count_maps_rare_tokens_to_unk(tmp_path):
    path = write(tmp_path, "a a b\na c\n")
    vocab = build_vocab(path, min_count=2)
    assert set(vocab.tokens) == {"a", EOS, UNK}
    ids, unknown = encode_file(path, vocab)
    assert unknown == 2  # b and c
    assert vocab.decode(ids) == "a a <unk>\na <unk>\n"


def test_max_vocab_counts_unk_and_eos(tmp_path):
    path = write(tmp_path, "a a a b b c\nd\n")
    vocab = build_vocab(path, max_vocab=4)
    assert vocab.tokens == ["a", EOS, "b", UNK]
    _, unknown = encode_file(path, vocab)
    assert unknown == 2  # c and d
    assert build_vocab(path, max_vocab=2).tokens == [EOS, UNK]


def test_lowercase_applies_before_counting_and_encoding(tmp_path):
    path = write(tmp_path, "The the THE cat\n")
    vocab = build_vocab(path, lowercase=True, min_count=2)
    assert vocab.tokens[0] == "the"
    assert "The" not in vocab.index
    ids, unknown = vocab.encode_line("THE Cat")
    assert ids[0] == vocab.index["the"]
    assert unknown == 1
    assert build_vocab(path).index.keys() >= {"The", "the", "THE"}


def test_literal_unk_is_the_unk_token(tmp_path):
    path = write(tmp_path, "x <unk> y\n<unk> <unk> x\n")
    vocab = build_vocab(path)
    assert vocab.tokens.count(UNK) == 1
    assert vocab.tokens[0] == UNK  # 3 literal occurrences make it the most frequent
    ids, unknown = encode_file(path, vocab)
    assert unknown == 0
    assert (ids == vocab.unk_id).sum() == 3
    line_ids, line_unknown = vocab.encode_line("<unk> new")
    assert line_ids[:2] == [vocab.unk_id, vocab.unk_id]
    assert line_unknown == 1


def test_unk_with_zero_count_sorts_last(tmp_path):
    vocab = build_vocab(write(tmp_path, "a b\n"))
    assert vocab.tokens[-1] == UNK


@pytest.mark.parametrize(
    "kwargs",
    [{"level": "byte"}, {"min_count": 0}, {"max_vocab": 1}],
)
def test_build_vocab_rejects_bad_options(tmp_path, kwargs):
    with pytest.raises(RnnlmError):
        build_vocab(write(tmp_path, "a\n"), **kwargs)


@pytest.mark.parametrize("level", ["word", "char"])
def test_build_vocab_rejects_file_without_tokens(tmp_path, level):
    with pytest.raises(RnnlmError, match="no tokens"):
        build_vocab(write(tmp_path, "\n\n" if level == "char" else "  \n\t\n"), level=level)


def test_vocab_rejects_missing_special_tokens():
    with pytest.raises(RnnlmError, match="<eos>"):
        Vocab(["a", UNK], "word", False)
    with pytest.raises(RnnlmError, match="<unk>"):
        Vocab(["a", "\n"], "char", False)
    with pytest.raises(RnnlmError, match="duplicate"):
        Vocab([UNK, EOS, "a", "a"], "word", False)


# --- dtypes -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "dtype"),
    [
        (1, np.uint8),
        (255, np.uint8),
        (256, np.uint8),
        (257, np.uint16),
        (65536, np.uint16),
        (65537, np.uint32),
        (10**6, np.uint32),
    ],
)
def test_smallest_uint_dtype(size, dtype):
    assert smallest_uint_dtype(size) == np.dtype(dtype)


def test_smallest_uint_dtype_rejects_bad_sizes():
    with pytest.raises(RnnlmError):
        smallest_uint_dtype(0)
    with pytest.raises(RnnlmError):
        smallest_uint_dtype(2**32 + 1)


def test_encode_file_uses_smallest_dtype(tmp_path):
    small = write(tmp_path, "a b c\n", "small.txt")
    assert encode_file(small, build_vocab(small))[0].dtype == np.uint8
    big = write(tmp_path, " ".join(f"w{i}" for i in range(300)) + "\n", "big.txt")
    ids, _ = encode_file(big, build_vocab(big))
    assert ids.dtype == np.uint16
    assert ids.size == 301


# --- serialization ------------------------------------------------------------


def test_vocab_save_load_round_trip_keeps_unicode_readable(tmp_path):
    vocab = build_vocab(write(tmp_path, CHAR_TEXT), level="char", lowercase=True)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    raw = path.read_text(encoding="utf-8")
    assert "\u6f22" in raw  # ensure_ascii=False
    assert json.loads(raw)["format_version"] == 1
    loaded = Vocab.load(path)
    assert loaded.to_dict() == vocab.to_dict()
    assert (loaded.unk_id, loaded.boundary_id) == (vocab.unk_id, vocab.boundary_id)


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[1, 2]",
        '{"format_version": 1, "level": "word", "lowercase": false}',
        '{"format_version": 2, "level": "word", "lowercase": false, "tokens": ["<unk>", "<eos>"]}',
        '{"format_version": 1, "level": "word", "lowercase": "no", "tokens": ["<unk>", "<eos>"]}',
        '{"format_version": 1, "level": "word", "lowercase": false, "tokens": ["<unk>", 3]}',
    ],
)
def test_vocab_load_rejects_malformed(tmp_path, content):
    with pytest.raises(RnnlmError):
        Vocab.load(write(tmp_path, content, "vocab.json"))


def test_vocab_load_missing(tmp_path):
    with pytest.raises(RnnlmError, match="no such file"):
        Vocab.load(tmp_path / "vocab.json")


def test_tokenize_file_round_trips_through_load_token_dir(tmp_path):
    path = write(tmp_path, "a b a\nc a\nrare\n")
    out = tmp_path / "out" / "nested"
    stats = tokenize_file(path, out, min_count=2)
    ids, vocab = load_token_dir(out)
    expected_vocab = build_vocab(path, min_count=2)
    expected_ids, _ = encode_file(path, expected_vocab)
    assert vocab.to_dict() == expected_vocab.to_dict()
    assert ids.dtype == expected_ids.dtype
    np.testing.assert_array_equal(ids, expected_ids)
    assert stats == {"tokens": 9, "vocab_size": 3, "unk": 3, "unk_share": 3 / 9}


def test_tokenize_file_with_given_vocab(tmp_path):
    train = write(tmp_path, "a b\n", "train.txt")
    other = write(tmp_path, "A c\n", "other.txt")
    vocab = build_vocab(train, lowercase=True)
    stats = tokenize_file(other, tmp_path / "out", vocab=vocab)
    ids, loaded = load_token_dir(tmp_path / "out")
    assert loaded.to_dict() == vocab.to_dict()
    assert ids.tolist() == [vocab.index["a"], vocab.unk_id, vocab.boundary_id]
    assert stats["unk"] == 1


def test_load_token_dir_errors(tmp_path):
    with pytest.raises(RnnlmError, match="no such token directory"):
        load_token_dir(tmp_path / "missing")
    out = tmp_path / "out"
    tokenize_file(write(tmp_path, "a b\n"), out)
    (out / "tokens.npy").unlink()
    with pytest.raises(RnnlmError, match="tokens.npy"):
        load_token_dir(out)
    (out / "tokens.npy").write_bytes(b"garbage")
    with pytest.raises(RnnlmError, match="not a valid .npy"):
        load_token_dir(out)
    np.save(out / "tokens.npy", np.array([0, 1, 99], dtype=np.uint8))
    with pytest.raises(RnnlmError, match="out of range"):
        load_token_dir(out)
    (out / "vocab.json").unlink()
    with pytest.raises(RnnlmError, match="vocab.json"):
        load_token_dir(out)


# --- --vocab sources ----------------------------------------------------------


def test_load_vocab_source_from_json_and_npz(tmp_path):
    vocab = build_vocab(write(tmp_path, "x y x\n"), lowercase=True)
    vocab.save(tmp_path / "vocab.json")
    assert load_vocab_source(tmp_path / "vocab.json").to_dict() == vocab.to_dict()
    meta = {"level": "word", "lowercase": True, "vocab": vocab.tokens, "hidden": 8}
    np.savez(tmp_path / "model.npz", meta=np.array(json.dumps(meta)), w=np.zeros(3))
    assert load_vocab_source(tmp_path / "model.npz").to_dict() == vocab.to_dict()


def test_load_vocab_source_rejects_other_files(tmp_path):
    with pytest.raises(RnnlmError, match="no such file"):
        load_vocab_source(tmp_path / "none.npz")
    with pytest.raises(RnnlmError, match="neither"):
        np.savez(tmp_path / "weights.npz", w=np.zeros(3))
        load_vocab_source(tmp_path / "weights.npz")
    with pytest.raises(RnnlmError):
        load_vocab_source(write(tmp_path, "just text\n", "notes.txt"))


# --- Penn Treebank ------------------------------------------------------------


def test_ptb_valid_with_train_vocab():
    if not PTB_DIR.is_dir():
        pytest.skip(f"Penn Treebank not found at {PTB_DIR}")
    vocab = build_vocab(PTB_DIR / "train.txt")
    assert len(vocab) == 10_000
    ids, unknown = encode_file(PTB_DIR / "valid.txt", vocab)
    assert ids.size == 73_760
    assert unknown == 0
    assert ids.dtype == np.uint16
    assert (ids == vocab.boundary_id).sum() == 3_370
