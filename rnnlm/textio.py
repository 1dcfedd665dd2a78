"""Reading text from wherever users keep it: files, ``-`` (standard input), FIFOs, process substitution,
and gzip, bzip2, xz or zstd files (told by their first bytes, not their names), decompressed as a stream.

Every reader yields text in bounded pieces, checks it as it goes (a NUL byte means a binary file, bytes
that are not UTF-8 are named by line and byte offset, a corrupt or truncated archive is named), and never
holds more than one piece (or, for ``iter_lines``, one line) in memory.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import io
import lzma
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from rnnlm.errors import RnnlmError

STDIN = "-"
PIECE_BYTES = 1 << 20  # how much of a long line is read at a time
MAX_LINE_BYTES = 64 << 20  # iter_lines refuses longer lines (a sentence, an n-best entry)

_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
_DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)


def display_name(source) -> str:
    """How errors name a source: 'standard input' for ``-``, else the path as given."""
    return "standard input" if str(source) == STDIN else str(source)


def check_readable(source) -> None:
    """RnnlmError unless ``source`` is ``-`` or a path that can be read as text (checked before any work)."""
    if str(source) == STDIN:
        return
    path = Path(source)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RnnlmError(f"no such file: {path}") from None
    except OSError as exc:
        raise RnnlmError(f"cannot read {path}: {exc.strerror}") from None
    if stat.S_ISDIR(info.st_mode):
        raise RnnlmError(f"{path} is a directory, expected a text file")
    if stat.S_ISREG(info.st_mode) and info.st_size == 0:
        raise RnnlmError(f"{path} is empty")
    if not os.access(path, os.R_OK):
        raise RnnlmError(f"cannot read {path}: permission denied")


def _decompressed(stream, head, name):
    """(stream, kind): ``stream`` itself, or one decompressing it when ``head`` starts with an archive's magic."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            if kind == "gzip":
                return gzip.GzipFile(fileobj=stream, mode="rb"), kind
            if kind == "bzip2":
                return bz2.BZ2File(stream, "rb"), kind
            if kind == "xz":
                return lzma.LZMAFile(stream, "rb"), kind
            return _zstd_reader(stream, name), kind
    return stream, None


def _zstd_reader(raw, name):
    try:
        import zstandard
    except ImportError:
        raise RnnlmError(f"{name} is zstd-compressed: pip install zstandard to read it") from None
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))


class _Prefixed(io.RawIOBase):
    """A raw stream that serves ``head`` (bytes already read to sniff the format) and then ``rest``."""

    def __init__(self, head, rest):
        self.head, self.rest = head, rest

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.head:
            n = min(len(buffer), len(self.head))
            buffer[:n], self.head = self.head[:n], self.head[n:]
            return n
        data = self.rest.read1(len(buffer))  # what is there: a line-by-line pipe is read as it comes
        buffer[: len(data)] = data
        return len(data)


@contextlib.contextmanager
def open_bytes(source):
    """(stream, kind): a binary stream of the decompressed text of ``source`` and the archive kind (or None)."""
    name = display_name(source)
    if str(source) == STDIN:
        raw, close = sys.stdin.buffer, False
    else:
        try:
            raw, close = open(source, "rb"), True  # noqa: SIM115  (closed below)
        except OSError as exc:
            raise RnnlmError(f"cannot read {name}: {exc.strerror}") from None
    try:
        head = raw.read(8)
        stream = io.BufferedReader(_Prefixed(head, raw), PIECE_BYTES)
        yield _decompressed(stream, head, name)
    finally:
        if close:
            raw.close()


def iter_pieces(source, piece_bytes: int = PIECE_BYTES) -> Iterator[tuple[str, bool]]:
    """The text of ``source`` as (piece, ends_line) pairs, every piece at most about ``piece_bytes``.

    A line shorter than ``piece_bytes`` is one piece without its ``\\n`` or ``\\r\\n`` and ends_line True;
    a longer line comes in several pieces, cut after whitespace where the line has any, so that no word is
    split across two pieces, the last with ends_line True (a last line without a newline included).
    Raises RnnlmError for a binary or non-UTF-8 text, or a corrupt archive, naming the line.
    """
    check_readable(source)
    return _read_pieces(source, piece_bytes)


def _read_pieces(source, piece_bytes):
    with open_bytes(source) as (stream, kind):
        yield from _PieceReader(stream, display_name(source), kind, piece_bytes)


class _PieceReader:
    """The loop behind ``iter_pieces``: counts lines and bytes for the error messages."""

    def __init__(self, stream, name, kind, piece_bytes):
        self.stream, self.name, self.kind, self.piece_bytes = stream, name, kind, piece_bytes
        self.line, self.offset = 1, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")()

    def read(self):
        try:
            return self.stream.readline(self.piece_bytes)
        except _DECOMPRESS_ERRORS as exc:
            what = f"a corrupt or truncated {self.kind} file" if self.kind else "unreadable"
            raise RnnlmError(f"{self.name} is {what} (at line {self.line}: {exc})") from None
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # zstandard's own ZstdError
            raise RnnlmError(f"{self.name} is a corrupt {self.kind or 'text'} file (at line {self.line}: {exc})") \
                from None

    def decode(self, raw, final):
        nul = raw.find(b"\0")
        if nul >= 0:
            raise RnnlmError(f"{self.name} looks binary (NUL byte at line {self.line}, offset {self.offset + nul})")
        try:
            text = self.decoder.decode(raw, final)
        except UnicodeDecodeError as exc:
            raise RnnlmError(f"{self.name} is not valid UTF-8 (line {self.line}, byte offset "
                             f"{self.offset + exc.start})") from None
        self.offset += len(raw)
        return text

    def __iter__(self):
        carry, open_line = "", False
        while True:
            raw = self.read()
            if not raw:
                tail = carry + self.decode(b"", True)
                if tail or open_line:
                    yield tail, True
                return
            ends_line = raw.endswith(b"\n")
            text = carry + self.decode(raw, False)
            carry = ""
            if ends_line:
                yield text[:-2] if text.endswith("\r\n") else text[:-1], True
                self.line += 1
                open_line = False
                continue
            cut = max(text.rfind(" "), text.rfind("\t"))
            if cut >= 0:
                text, carry = text[: cut + 1], text[cut + 1:]
            if text:
                yield text, False
                open_line = True


def iter_lines(source, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[str]:
    """The lines of ``source`` without their ``\\n`` or ``\\r\\n``, one at a time.

    RnnlmError as ``iter_pieces`` gives, and for a line longer than ``max_line_bytes``.
    """
    pieces = iter_pieces(source)
    return _join_lines(source, pieces, max_line_bytes)


def _join_lines(source, pieces, max_line_bytes):
    parts: list[str] = []
    size = 0
    for piece, ends_line in pieces:
        parts.append(piece)
        size += len(piece)
        if size > max_line_bytes:
            raise RnnlmError(f"{display_name(source)} has a line longer than {max_line_bytes:,} characters")
        if ends_line:
            yield "".join(parts)
            parts, size = [], 0
