"""Tests for rnnlm.textio: files, standard input, FIFOs and compressed files, read as a stream and checked."""

import bz2
import gzip
import io
import lzma
import os
import sys
import threading

import pytest

from rnnlm.errors import RnnlmError
from rnnlm.textio import iter_lines, iter_pieces

TEXT = "a b\r\nc\n\nlast"
LINES = ["a b", "c", "", "last"]


def write(tmp_path, content, name="corpus.txt"):
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_lines_without_their_endings(tmp_path):
    assert list(iter_lines(write(tmp_path, TEXT))) == LINES


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress])
def test_compressed_files_read_as_their_text_whatever_their_name(tmp_path, compress):
    path = write(tmp_path, compress(TEXT.encode()), name="corpus.txt")
    assert list(iter_lines(path)) == LINES


def test_standard_input(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(gzip.compress(TEXT.encode()))))
    assert list(iter_lines("-")) == LINES


def test_a_fifo_is_read_once_as_it_comes(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(TEXT))
    writer.start()
    assert list(iter_lines(fifo)) == LINES
    writer.join()


def test_a_long_line_comes_in_pieces_cut_between_words(tmp_path):
    words = [f"w{i}" for i in range(2000)]
    path = write(tmp_path, " ".join(words) + "\nend\n")
    pieces = list(iter_pieces(path, piece_bytes=100))
    assert all(len(piece) <= 200 for piece, _ in pieces)
    assert [ends for _, ends in pieces].count(True) == 2
    assert " ".join(piece for piece, _ in pieces[:-1]).split() == words
    assert list(iter_lines(path)) == [" ".join(words), "end"]


def test_a_long_line_without_a_newline_still_ends(tmp_path):
    path = write(tmp_path, "x " * 300)
    pieces = list(iter_pieces(path, piece_bytes=64))
    assert pieces[-1][1] and sum(ends for _, ends in pieces) == 1


def test_multibyte_characters_cut_by_a_piece_survive(tmp_path):
    text = "é" * 500
    path = write(tmp_path, text)
    assert "".join(piece for piece, _ in iter_pieces(path, piece_bytes=33)) == text


def test_missing_file_is_reported_at_once(tmp_path):
    with pytest.raises(RnnlmError, match="no such file: .*nope.txt"):
        iter_lines(tmp_path / "nope.txt")


def test_directory(tmp_path):
    with pytest.raises(RnnlmError, match="is a directory, expected a text file"):
        iter_lines(tmp_path)


def test_empty_file(tmp_path):
    with pytest.raises(RnnlmError, match="corpus.txt is empty"):
        iter_lines(write(tmp_path, b""))


def test_nul_byte_names_line_and_offset(tmp_path):
    path = write(tmp_path, b"ok line\nab\x00cd\n")
    with pytest.raises(RnnlmError, match=r"looks binary \(NUL byte at line 2, offset 10\)"):
        list(iter_lines(path))


@pytest.mark.parametrize(
    ("data", "line", "offset"),
    [
        (b"hello\nw\xffrld", 2, 7),
        (b"\xffabc\n", 1, 0),
        ("h\u00e9llo\n".encode() + b"ab\xc3\n", 2, 9),  # truncated 2-byte sequence
    ],
)
def test_invalid_utf8_names_line_and_absolute_offset(tmp_path, data, line, offset):
    path = write(tmp_path, data)
    with pytest.raises(RnnlmError, match=rf"is not valid UTF-8 \(line {line}, byte offset {offset}\)$"):
        list(iter_lines(path))


def test_invalid_utf8_on_standard_input_names_the_line(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"one\ntwo\nth\xffree\n")))
    with pytest.raises(RnnlmError, match=r"standard input is not valid UTF-8 \(line 3"):
        list(iter_lines("-"))


@pytest.mark.parametrize(("compress", "kind"), [(gzip.compress, "gzip"), (bz2.compress, "bzip2"),
                                                (lzma.compress, "xz")])
def test_truncated_archive_is_named(tmp_path, compress, kind):
    data = compress(("some words here\n" * 2000).encode())
    path = write(tmp_path, data[: len(data) // 2])
    with pytest.raises(RnnlmError, match=rf"corpus.txt is a corrupt or truncated {kind} file"):
        list(iter_lines(path))


def test_a_line_over_the_limit_is_refused(tmp_path):
    path = write(tmp_path, "x" * 5000 + "\n")
    with pytest.raises(RnnlmError, match="has a line longer than"):
        list(iter_lines(path, max_line_bytes=1000))


def test_a_line_is_yielded_before_the_writer_closes_the_pipe():
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb", buffering=0) as writer, os.fdopen(read_end, "rb") as reader:
        writer.write(b"first line\n")
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stdin", io.TextIOWrapper(reader))
            lines = iter_lines("-")
            assert next(lines) == "first line"  # would block until EOF if reads waited for a full buffer
