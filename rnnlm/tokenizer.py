"""Text -> token ids: vocabularies, streaming file reading, tokenization to disk.

Two token levels are supported:

* ``"word"``: whitespace-separated words (``str.split()``); every line ends with
  the boundary token ``"<eos>"``.
* ``"char"``: Unicode code points (not bytes); every line ends with the
  boundary token ``"\\n"``.

Files are always streamed line by line, so memory stays near the size of the
token ids rather than the size of the text.
"""

from __future__ import annotations

import array
import functools
import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np

from rnnlm import store
from rnnlm.errors import RnnlmError
from rnnlm.paths import atomic_directory, check_output_dir
from rnnlm.textio import display_name, iter_pieces
from rnnlm.untrusted import Npz, checked, open_regular, read_json_file, read_npy_file

UNK = "<unk>"
EOS = "<eos>"
LEVELS = ("word", "char")

FORMAT_VERSION = 1
VOCAB_FILE = "vocab.json"
TOKENS_FILE = "tokens.npy"
UNK_CHAR = "\ufffd"
MAX_VOCAB_SIZE = 1 << 22
MAX_TOKEN_CHARS = 1 << 16


def _boundary_token(level: str) -> str:
    """The token that ends every line: ``<eos>`` for words, ``"\\n"`` for chars."""
    return EOS if level == "word" else "\n"


def _check_level(level: object) -> None:
    if level not in LEVELS:
        raise RnnlmError(f"unknown token level {level!r}, expected one of: {', '.join(LEVELS)}")


class Vocab:
    """A token <-> id mapping.

    Attributes:
        tokens: list[str], ``tokens[i]`` is the token with id ``i``.
        level: ``"word"`` or ``"char"``.
        lowercase: whether text is lowercased before lookup.
        index: dict[str, int], token -> id (built when first read: training from a token store never reads it,
            and at a vocabulary of 10⁶ it is 55 MB).
        unk_id: id of ``"<unk>"`` (present at both levels).
        boundary_id: id of ``"<eos>"`` (word level) or ``"\\n"`` (char level).
    """

    def __init__(self, tokens: list[str], level: str, lowercase: bool):
        _check_level(level)
        if not isinstance(lowercase, bool):
            raise RnnlmError(f"vocabulary 'lowercase' must be true or false, got {lowercase!r}")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise RnnlmError("vocabulary tokens must be a list of non-empty strings")
        distinct = set(tokens)
        if len(distinct) != len(tokens):
            duplicate = next(t for t, n in Counter(tokens).items() if n > 1)
            raise RnnlmError(f"vocabulary has a duplicate token {duplicate!r}")
        if level == "char" and any(len(t) != 1 for t in tokens if t != UNK):
            raise RnnlmError("char-level tokens must be single characters besides <unk>")
        boundary = _boundary_token(level)
        for required in (UNK, boundary):
            if required not in distinct:
                raise RnnlmError(f"{level}-level vocabulary lacks the token {required!r}")
        self.tokens = tokens
        self.level = level
        self.lowercase = lowercase
        self.unk_id = tokens.index(UNK)
        self.boundary_id = tokens.index(boundary)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, level={self.level!r}, lowercase={self.lowercase})"

    def _split(self, line: str) -> Iterable[str]:
        """The tokens of one line (without its boundary), after lowercasing if set."""
        if self.lowercase:
            line = line.lower()
        return line.split() if self.level == "word" else line

    def encode_line(self, line: str, ends_line: bool = True) -> tuple[list[int], int]:
        """Encode one line given without its trailing newline (or a piece of a long line: ``ends_line``
        False, as ``textio.iter_pieces`` cuts them).

        Returns:
            (ids, unknown): ``ids`` is a list of ints ending with ``boundary_id`` when ``ends_line``;
            ``unknown`` counts tokens missing from the vocabulary that became
            ``unk_id`` (a literal ``"<unk>"`` word is in the vocabulary and is not counted).
        """
        index = self.index
        unk_id = self.unk_id
        tokens = self._split(line)
        ids = [index.get(token, unk_id) for token in tokens]
        unknown = 0
        if unk_id in ids:  # tell unknown tokens from literal "<unk>" ones
            unknown = sum(token not in index for token in tokens)
        if ends_line:
            ids.append(self.boundary_id)
        return ids, unknown

    def encode_text(self, text: str) -> tuple[np.ndarray, int]:
        """Encode a whole (possibly multi-line) string such as a prompt.

        ``"\\r\\n"`` is read as ``"\\n"``. At word level every line, including a
        last one without a newline, ends with ``<eos>``. At char level the
        newlines of the text are its ``"\\n"`` tokens, so a text that does not
        end in a newline gets no final ``"\\n"``.

        Returns:
            (ids, unknown): ``ids`` is a 1-D int64 array; ``unknown`` as in
            :meth:`encode_line`.
        """
        lines = text.replace("\r\n", "\n").split("\n")
        ends_with_newline = lines[-1] == ""
        if ends_with_newline:
            lines.pop()
        ids: list[int] = []
        unknown = 0
        for line in lines:
            line_ids, line_unknown = self.encode_line(line)
            ids.extend(line_ids)
            unknown += line_unknown
        if self.level == "char" and not ends_with_newline:
            ids.pop()
        return np.array(ids, dtype=np.int64), unknown

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Turn ids (a sequence of ints or a 1-D integer array) back into text.

        Word level: tokens joined by single spaces, each ``<eos>`` rendered as a
        newline with no space around it. Char level: tokens concatenated, with
        ``<unk>`` rendered as ``"\\ufffd"``.
        """
        ids = np.asarray(ids)
        if ids.ndim != 1 or (
            ids.size and (ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= len(self))
        ):
            raise RnnlmError(f"can only decode a 1-D sequence of integer ids in [0, {len(self)})")
        tokens = self.tokens
        if self.level == "char":
            return "".join(UNK_CHAR if i == self.unk_id else tokens[i] for i in ids.tolist())
        lines: list[str] = []
        words: list[str] = []
        for i in ids.tolist():
            if i == self.boundary_id:
                lines.append(" ".join(words) + "\n")
                words = []
            else:
                words.append(tokens[i])
        lines.append(" ".join(words))
        return "".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"format_version", "level", "lowercase", "tokens"}``."""
        return {
            "format_version": FORMAT_VERSION,
            "level": self.level,
            "lowercase": self.lowercase,
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, d: object, where: str = "vocabulary") -> Vocab:
        """Inverse of :meth:`to_dict`; raises RnnlmError naming ``where`` if ``d`` is malformed."""
        if not isinstance(d, dict):
            raise RnnlmError(f"{where} must be a JSON object")
        checked(d, "format_version", where, (int,), choices=(FORMAT_VERSION,))
        return vocab_of(d, where, tokens_key="tokens")

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as UTF-8 JSON (non-ASCII tokens kept readable)."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False, indent=1)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a file written by :meth:`save`; RnnlmError if missing, malformed or out of bounds."""
        return cls.from_dict(read_json_file(path, "vocab.json file"), str(path))


def vocab_of(record: dict, where: str, tokens_key: str = "vocab") -> Vocab:
    """The vocabulary described by an untrusted JSON object (a vocab.json or a model's meta): ``level``,
    ``lowercase`` and the token list under ``tokens_key``, at most MAX_VOCAB_SIZE unique, non-empty,
    valid Unicode strings of at most MAX_TOKEN_CHARS characters, besides :class:`Vocab`'s own checks."""
    level = checked(record, "level", where, (str,), choices=LEVELS)
    lowercase = checked(record, "lowercase", where, (bool,))
    tokens = checked(record, tokens_key, where, (list,))
    if not 2 <= len(tokens) <= MAX_VOCAB_SIZE:
        raise RnnlmError(f"{where} has {len(tokens):,} tokens, expected 2 to {MAX_VOCAB_SIZE:,}")
    try:
        vocab = Vocab(tokens, level, lowercase)
    except RnnlmError as exc:
        raise RnnlmError(f"{where}: {exc}") from None
    if max(map(len, tokens)) > MAX_TOKEN_CHARS:
        raise RnnlmError(f"{where} has a token of more than {MAX_TOKEN_CHARS:,} characters")
    try:
        "".join(tokens).encode("utf-8")
    except UnicodeEncodeError:
        raise RnnlmError(f"{where} has a token that is not valid Unicode (a lone surrogate)") from None
    return vocab


def _check_cutoffs(min_count: int, max_vocab: int | None) -> None:
    if min_count < 1:
        raise RnnlmError(f"min_count must be at least 1, got {min_count}")
    if max_vocab is not None and max_vocab < 2:
        raise RnnlmError(f"max_vocab must be at least 2 (<unk> and the boundary), got {max_vocab}")


def _vocab_from_counts(counts: Counter, source, level, min_count, max_vocab, lowercase) -> Vocab:
    """The vocabulary of token counts (the boundary's included): ids by count descending, ties by token."""
    if set(counts) <= {_boundary_token(level)}:
        raise RnnlmError(f"{display_name(source)} contains no tokens (only blank lines)")
    counts.setdefault(UNK, 0)
    always = {UNK, _boundary_token(level)}
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    regular = [t for t in ranked if t not in always and counts[t] >= min_count]
    if max_vocab is not None:
        regular = regular[: max_vocab - len(always)]
    keep = always.union(regular)
    return Vocab([t for t in ranked if t in keep], level, bool(lowercase))


def build_vocab(
    path: str | os.PathLike,
    level: str = "word",
    min_count: int = 1,
    max_vocab: int | None = None,
    lowercase: bool = False,
) -> Vocab:
    """Build a vocabulary from a text source (see ``rnnlm.textio``) in one streaming pass.

    Ids are ordered by count descending, ties by token string ascending.
    ``<unk>`` (counted by its literal occurrences, possibly 0) and the boundary
    token (counted once per line) are always kept; other tokens are kept if
    their count is at least ``min_count`` and they are among the ``max_vocab``
    most frequent (``max_vocab`` includes ``<unk>`` and the boundary).
    """
    _check_level(level)
    _check_cutoffs(min_count, max_vocab)
    counts: Counter[str] = Counter()
    n_lines = 0
    for piece, ends_line in iter_pieces(path):
        if lowercase:
            piece = piece.lower()
        counts.update(piece.split() if level == "word" else piece)
        n_lines += ends_line
    counts[_boundary_token(level)] += n_lines
    return _vocab_from_counts(counts, path, level, min_count, max_vocab, lowercase)


def tokenize_text(
    source, level: str = "word", min_count: int = 1, max_vocab: int | None = None, lowercase: bool = False
) -> tuple[np.ndarray, Vocab, int]:
    """Build the vocabulary of ``source`` and encode it with it in a single pass (standard input and
    pipes can be read only once): tokens get provisional ids by first occurrence, renumbered at the end.

    Returns (ids, vocab, unknown) as ``build_vocab`` and ``encode_file`` together would.
    """
    _check_level(level)
    _check_cutoffs(min_count, max_vocab)
    boundary = _boundary_token(level)
    first_seen = {boundary: 0}
    provisional = array.array("I")
    for piece, ends_line in iter_pieces(source):
        if lowercase:
            piece = piece.lower()
        tokens = piece.split() if level == "word" else piece
        provisional.extend([first_seen.setdefault(token, len(first_seen)) for token in tokens])
        if ends_line:
            provisional.append(0)
    provisional = np.frombuffer(provisional, np.uint32)
    seen = list(first_seen)
    counts = Counter(dict(zip(seen, np.bincount(provisional, minlength=len(seen)).tolist(), strict=True)))
    vocab = _vocab_from_counts(counts, source, level, min_count, max_vocab, lowercase)
    final = np.array([vocab.index.get(token, vocab.unk_id) for token in seen], smallest_uint_dtype(len(vocab)))
    ids = final[provisional]
    dropped = np.array([token not in vocab.index for token in seen])
    return ids, vocab, int(np.count_nonzero(dropped[provisional]))


def smallest_uint_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids ``0 .. vocab_size - 1``: uint8, uint16 or uint32."""
    if vocab_size < 1:
        raise RnnlmError(f"vocabulary size must be at least 1, got {vocab_size}")
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise RnnlmError(f"vocabulary of {vocab_size} tokens is too large (at most 2**32)")


def encode_file(path: str | os.PathLike, vocab: Vocab) -> tuple[np.ndarray, int]:
    """Encode a whole text file as one stream of ids, in a second streaming pass.

    Returns:
        (ids, unknown): ``ids`` is a 1-D array of dtype
        ``smallest_uint_dtype(len(vocab))``, every line followed by the boundary
        id; ``unknown`` counts tokens that were not in the vocabulary and became
        ``<unk>`` (literal ``"<unk>"`` words are not counted).
    """
    dtype = smallest_uint_dtype(len(vocab))
    # array.array and numpy share C type codes ("B", "H", "I"), so the
    # compact buffer becomes the result without a copy.
    ids = array.array(dtype.char)
    unknown = 0
    for piece, ends_line in iter_pieces(path):
        piece_ids, piece_unknown = vocab.encode_line(piece, ends_line)
        ids.extend(piece_ids)
        unknown += piece_unknown
    return np.frombuffer(ids, dtype=dtype), unknown


def tokenize_file(
    path,
    out_dir: str | os.PathLike,
    level: str = "word",
    min_count: int = 1,
    max_vocab: int | None = None,
    lowercase: bool = False,
    vocab: Vocab | None = None,
    workers: int | None = None,
    shard_tokens: int = store.SHARD_TOKENS,
) -> dict:
    """Tokenize text into the token store ``out_dir`` (vocab.json, shards, manifest.json: see ``rnnlm.store``).

    ``path``: a text source (a file, ``-``, a compressed file) or a list of them, globs expanded; the
    sources are read as one text, in order. If ``vocab`` is given it is used as is (``level``,
    ``min_count``, ``max_vocab`` and ``lowercase`` are then ignored); otherwise a vocabulary is built
    from the text. ``workers`` processes (default: the usable cores) read the text.

    ``out_dir`` is checked before the text is read (``rnnlm.paths.check_output_dir``: absent, or a token
    directory not holding an input) and replaced as a whole: a failure leaves the old one as it was.

    Returns:
        {"tokens": int, "vocab_size": int, "unk": int, "unk_share": float},
        where ``unk`` counts tokens that became ``<unk>`` and ``unk_share`` is ``unk / tokens``.
    """
    sources = store.expand_inputs(path if isinstance(path, list | tuple) else [path])
    if vocab is None:
        _check_level(level)
        _check_cutoffs(min_count, max_vocab)
    elif not isinstance(vocab, Vocab):
        raise RnnlmError(f"vocab must be a Vocab, got {type(vocab).__name__}")
    else:
        level, lowercase = vocab.level, vocab.lowercase
    given = vocab is not None
    members = (*store.store_members(out_dir), TOKENS_FILE)
    check_output_dir("-o", out_dir, inputs=[("TEXT", source) for source in sources], members=members)
    tasks = store.plan_tasks(sources)
    with atomic_directory(out_dir) as tmp, store.temporary_folder(tmp) as spill_folder:
        results, spills = store.run_tasks(tasks, level, lowercase, spill_folder, workers or store.default_workers())
        if vocab is None:
            counts: Counter[str] = Counter()
            for tokens, token_counts, _ in results:
                for token, n in zip(tokens, token_counts, strict=True):
                    counts[token] += n
            vocab = _vocab_from_counts(counts, ", ".join(map(display_name, sources)), level, min_count, max_vocab,
                                       lowercase)
        writer = store.ShardWriter(tmp, smallest_uint_dtype(len(vocab)), shard_tokens)
        unknown = sum(_renumber(vocab, result, spill, writer) for result, spill in zip(results, spills, strict=True))
        writer.flush()
        vocab.save(tmp / VOCAB_FILE)
        recipe = {"level": level, "lowercase": lowercase, "min_count": min_count, "max_vocab": max_vocab,
                  "vocab_given": given, "inputs": store.input_records(tasks, results), "unk": unknown}
        manifest = store.write_manifest(tmp, recipe, writer)
    return {"tokens": manifest["tokens"], "vocab_size": len(vocab), "unk": unknown,
            "unk_share": unknown / manifest["tokens"]}


def _renumber(vocab: Vocab, result, spill, writer) -> int:
    """Append a task's ids to ``writer`` in ``vocab``'s numbering; returns how many became ``<unk>``."""
    tokens, counts, _ = result
    final = np.fromiter(map(vocab.index.get, tokens, repeat(vocab.unk_id)), writer.buffer.dtype, len(tokens))
    unknown = final == vocab.unk_id
    if UNK in tokens:  # a literal <unk> is no unknown token
        unknown[tokens.index(UNK)] = False
    store.renumber(spill, final, writer)
    return int(np.asarray(counts, np.int64)[unknown].sum())


def load_vocab_source(path: str | os.PathLike) -> Vocab:
    """Load a vocabulary from a ``vocab.json`` or from a model ``.npz``.

    A model ``.npz`` holds a ``meta`` member: a JSON string with (at least) the keys ``level``,
    ``lowercase`` and ``vocab`` (the token list); only that member is read.
    """
    with open_regular(path, "vocab.json or model .npz file") as f:
        head = f.read(6)
    if head[:4] != b"PK\x03\x04" and head != b"\x93NUMPY":
        return Vocab.load(path)
    with Npz(path, "model file") as npz:
        if "meta" not in npz.names:
            raise RnnlmError(f"{path} is neither a vocab.json nor a model .npz with a vocabulary (no 'meta' member)")
        meta = npz.read_json("meta")
    if not isinstance(meta, dict):
        raise RnnlmError(f"{path}: member 'meta.npy' is not a JSON object")
    return vocab_of(meta, f"{path}: meta")


def open_token_dir(path: str | os.PathLike) -> tuple[store.TokenIds, Vocab]:
    """The ids and vocabulary of a token directory: a store (``rnnlm.store``: shards memory-mapped after their
    checksums are verified) or a single ``tokens.npy`` beside ``vocab.json`` (read whole). Every id is below
    ``len(vocab)``."""
    path = Path(path)
    if not path.is_dir():
        raise RnnlmError(f"no such token directory: {path}")
    if not (path / VOCAB_FILE).exists():
        raise RnnlmError(
            f"{path} is a directory, expected a text file or a token directory from `rnnlm tokenize` (no vocab.json)"
        )
    vocab = Vocab.load(path / VOCAB_FILE)
    if (path / store.MANIFEST).exists():
        ids, _ = store.open_store(path, path / VOCAB_FILE, len(vocab))
        return ids, vocab
    tokens_path = path / TOKENS_FILE
    ids = read_npy_file(tokens_path, "token file (tokens.npy)", {"u": (1, 2, 4, 8)})
    ids = ids.astype(ids.dtype.newbyteorder("="), copy=False)
    if ids.size == 0:
        raise RnnlmError(f"{tokens_path} holds no tokens")
    if int(ids.max()) >= len(vocab):
        raise RnnlmError(
            f"{tokens_path} has token id {int(ids.max())}, out of range for a "
            f"vocabulary of {len(vocab)} tokens"
        )
    return store.TokenIds.of(ids), vocab


def load_token_dir(path: str | os.PathLike) -> tuple[np.ndarray, Vocab]:
    """(ids, vocab) of a token directory (see :func:`open_token_dir`), the ids as one 1-D unsigned integer
    array in native byte order (a store's single shard mapped, several shards copied into one)."""
    ids, vocab = open_token_dir(path)
    return ids.array(), vocab
