"""A token store: a corpus of any size as fixed-size shards of token ids, written in bounded memory and
read memory-mapped.

A store is a directory holding ``vocab.json``, the shards ``tokens.npy``, ``tokens.1.npy``, … (1-D arrays
of ``smallest_uint_dtype(V)``, ``shard_tokens`` ids each but the last) and ``manifest.json``: the format
version, how the text was split and counted (level, lowercase, min_count, max_vocab, whether the
vocabulary was given), the inputs (name and size in bytes, as read), the token count, the ``<unk>`` count,
the SHA-256 of vocab.json and every shard's name, token count and SHA-256.

Writing (:func:`write_store`) reads every input once: regular text files are cut into byte ranges at line
ends, each range (or a compressed file, or standard input) is one task. A task gives its tokens
provisional ids as it meets them, spilled to a temporary file as it goes, and returns its token list and
counts; tasks run in a process pool (standard input is read in the calling process). The vocabulary is
built from the summed counts, then every task's provisional ids are renumbered, in input order, into the
shards. Memory: a shard, the tasks' token
tables and a block of text per process.

Reading (:func:`open_store`) checks the manifest, every shard's header, size, SHA-256 and largest id,
then keeps the shards open and mapped: :class:`TokenIds`.
"""

import array
import glob
import hashlib
import json
import mmap
import os
import re
import stat
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.textio import STDIN, check_readable, display_name, open_bytes
from rnnlm.untrusted import CHUNK, check_dtype, checked, open_regular, read_json_file, read_npy_header

MANIFEST = "manifest.json"
STORE_VERSION = 1
SHARD_TOKENS = 1 << 24
RANGE_BYTES = 32 << 20  # a task's share of a regular file
BLOCK_BYTES = 2 << 20  # text decoded and encoded at a time
POOL_BYTES = 32 << 20  # smaller inputs are read in this process
READ_BYTES = 4 << 20  # a store's files are checked and renumbered this much at a time
SENTINEL = "\0"  # stands for a line end among a block's words (a NUL byte is refused in text)
_SHARD_NAME = re.compile(r"tokens(\.[1-9][0-9]*)?\.npy")
_WHITESPACE = (b" ", b"\t")


def shard_name(k):
    """The file name of shard k: tokens.npy, tokens.1.npy, …"""
    return "tokens.npy" if k == 0 else f"tokens.{k}.npy"


def store_members(path):
    """The names a store directory may hold (those of the store at ``path``, if any, included)."""
    try:
        names = os.listdir(path)
    except OSError:
        names = []
    return ("vocab.json", MANIFEST, *sorted(n for n in names if _SHARD_NAME.fullmatch(n)))


def expand_inputs(patterns):
    """The text sources named by ``patterns``: ``-``, existing paths, or globs (sorted matches).

    RnnlmError for a glob matching nothing and for a path that is not there."""
    sources = []
    for pattern in map(str, patterns):
        if pattern == STDIN or os.path.lexists(pattern) or not glob.has_magic(pattern):
            sources.append(pattern)
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise RnnlmError(f"no file matches {pattern}")
        sources.extend(matches)
    if not sources:
        raise RnnlmError("no input text given")
    if sources.count(STDIN) > 1:
        raise RnnlmError("standard input (-) can be read only once")
    for source in sources:
        check_readable(source)
    return sources


# ---------------------------------------------------------------------------------------------- tasks


def plan_tasks(sources):
    """The tasks reading ``sources``: (source, start, end, last) for a byte range of a regular text file (cut
    at line ends when read) and (source, 0, None, True) for a stream read whole (compressed, a pipe)."""
    tasks = []
    for source in sources:
        size = None
        if source != STDIN and stat.S_ISREG(os.stat(source).st_mode):
            with open_bytes(source) as (_, kind):
                size = os.stat(source).st_size if kind is None else None
        if size is None:
            tasks.append((source, 0, None, True))
            continue
        cuts = list(range(0, size, RANGE_BYTES)) + [size]
        tasks.extend((source, a, b, b == size) for a, b in zip(cuts, cuts[1:], strict=False))
    return tasks


def _line_start(f, offset):
    """The offset of the first line that starts at or after ``offset`` in binary file ``f``."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    while chunk := f.read(1 << 16):
        newline = chunk.find(b"\n")
        if newline >= 0:
            return f.tell() - len(chunk) + newline + 1
    return f.tell()


def _raw_blocks(task):
    """The bytes of a task, in blocks of about BLOCK_BYTES."""
    source, start, end, _ = task
    if end is None:
        with open_bytes(source) as (stream, kind):
            while block := _read_stream(stream, BLOCK_BYTES, source, kind):
                yield block
        return
    with open(source, "rb") as f:
        start, stop = _line_start(f, start), _line_start(f, end)
        f.seek(start)
        while start < stop and (block := f.read(min(BLOCK_BYTES, stop - start))):
            start += len(block)
            yield block


def _read_stream(stream, size, source, kind):
    try:
        return stream.read(size)
    except (EOFError, OSError, ValueError) as exc:
        raise RnnlmError(f"{display_name(source)} is a corrupt or truncated {kind or 'text'} file ({exc})") from None


def _cut(data, final):
    """(head, tail): ``data`` cut after its last line end, else its last space or tab, so that no line (or
    word) is split where it can be helped; data without either is held back up to 4 blocks, then cut after
    its last whole UTF-8 character."""
    if final:
        return data, b""
    cut = data.rfind(b"\n") + 1 or max(data.rfind(w) for w in _WHITESPACE) + 1
    if cut:
        return data[:cut], data[cut:]
    if len(data) < 4 * BLOCK_BYTES:
        return b"", data
    cut = len(data)
    while cut > len(data) - 4 and data[cut - 1] & 0xC0 == 0x80:
        cut -= 1
    cut = cut - 1 if data[cut - 1] >= 0xC0 else len(data)
    return data[:cut], data[cut:]


def _text_blocks(task):
    """(text, its size in bytes) of a task's blocks, decoded and checked."""
    carry, lines, offset = b"", 0, 0
    for block in _raw_blocks(task):
        head, carry = _cut(carry + block, False)
        if head:
            yield _decode(task, head, lines, offset), len(head)
            lines, offset = lines + head.count(b"\n"), offset + len(head)
    if carry:
        yield _decode(task, carry, lines, offset), len(carry)


def _decode(task, data, lines, offset):
    source = task[0]
    bad = data.find(b"\0")
    if bad < 0:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad = exc.start
    line, at = _position(task, data, lines, offset, bad)
    if data[bad] == 0:
        raise RnnlmError(f"{display_name(source)} looks binary (NUL byte at line {line}, offset {at})")
    raise RnnlmError(f"{display_name(source)} is not valid UTF-8 (line {line}, byte offset {at})")


def _position(task, data, lines, offset, bad):
    """(line, byte offset) in the whole source of byte ``bad`` of ``data``."""
    source, start = task[0], task[1]
    before = 0
    if start:
        with open(source, "rb") as f:
            begin = _line_start(f, start)
            f.seek(0)
            while begin - f.tell() > 0 and (chunk := f.read(min(CHUNK, begin - f.tell()))):
                before += chunk.count(b"\n")
        start = begin
    return before + lines + data.count(b"\n", 0, bad) + 1, start + offset + bad


def encode_task(task, level, lowercase, spill):
    """Encode one task with provisional ids (given to tokens as they are met, block by block) into the file
    ``spill`` (uint32).

    Returns (tokens, counts, bytes read): tokens[i] is provisional id i's token (the boundary as the level's
    boundary token), counts[i] its number of occurrences.
    """
    local = {SENTINEL if level == "word" else "\n": 0}
    counts = np.zeros(1, np.int64)
    ends_in_newline, n_bytes = True, 0
    with open(spill, "wb") as out:
        for text, size in _text_blocks(task):
            n_bytes += size
            if lowercase:
                text = text.lower()
            ends_in_newline = text.endswith("\n")
            tokens = text.replace("\n", f" {SENTINEL} ").split() if level == "word" else text.replace("\r\n", "\n")
            for token in set(tokens).difference(local):
                local[token] = len(local)
            ids = np.frombuffer(array.array("I", map(local.__getitem__, tokens)), np.uint32)
            counts = np.bincount(ids, minlength=len(local)) + np.pad(counts, (0, len(local) - len(counts)))
            ids.tofile(out)
        if task[3] and not ends_in_newline:  # the last line lacks its newline, not its boundary
            np.zeros(1, np.uint32).tofile(out)
            counts[0] += 1
    tokens = list(local)
    tokens[0] = "<eos>" if level == "word" else "\n"
    return tokens, counts.tolist(), n_bytes


# ---------------------------------------------------------------------------------------------- shards


class _HashingFile:
    """A write-only file that keeps the SHA-256 of what was written."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def write(self, data):
        self.sha256.update(data)
        return self.f.write(data)


class ShardWriter:
    """Appends ids to shards of ``shard_tokens`` ids in ``folder``; ``shards`` lists the manifest entries."""

    def __init__(self, folder, dtype, shard_tokens=SHARD_TOKENS):
        self.folder, self.buffer, self.filled, self.shards = Path(folder), np.empty(shard_tokens, dtype), 0, []

    def append(self, ids):
        while len(ids):
            n = min(len(ids), len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + n] = ids[:n]
            self.filled, ids = self.filled + n, ids[n:]
            if self.filled == len(self.buffer):
                self.flush()

    def flush(self):
        if not self.filled:
            return
        name = shard_name(len(self.shards))
        with open(self.folder / name, "wb") as f:
            out = _HashingFile(f)
            np.save(out, self.buffer[:self.filled])
        self.shards.append({"name": name, "tokens": self.filled, "sha256": out.sha256.hexdigest()})
        self.filled = 0


def input_records(tasks, results):
    """[{"name", "bytes"}] of every source, in order: the bytes of text its tasks read."""
    sizes = {}
    for (source, *_), (_, _, n_bytes) in zip(tasks, results, strict=True):
        sizes[display_name(source)] = sizes.get(display_name(source), 0) + n_bytes
    return [{"name": name, "bytes": n} for name, n in sizes.items()]


def write_manifest(folder, recipe, writer):
    """Write and return the manifest of the store in ``folder`` (its vocab.json written, ``writer`` flushed):
    ``recipe`` (how the text was split and counted, its inputs) and the shards."""
    manifest = {"format_version": STORE_VERSION, **recipe, "tokens": sum(s["tokens"] for s in writer.shards),
                "dtype": str(writer.buffer.dtype), "shard_tokens": len(writer.buffer),
                "vocab_sha256": sha256_of(Path(folder) / "vocab.json"), "shards": writer.shards}
    (Path(folder) / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def renumber(spill, final, writer):
    """Append the provisional ids of file ``spill``, mapped through ``final``, to ``writer``."""
    with open(spill, "rb") as f:
        while (chunk := np.fromfile(f, np.uint32, count=READ_BYTES // 4)).size:
            writer.append(final[chunk])


def run_tasks(tasks, level, lowercase, folder, workers):
    """The (tokens, counts, bytes) of every task, in order, and its spill file folder/i.u32; standard input is read
    in this process, other tasks in a pool of ``workers`` processes once the text is large enough."""
    spills = [Path(folder) / f"{i}.u32" for i in range(len(tasks))]
    size = sum((t[2] or POOL_BYTES) - t[1] for t in tasks)
    if workers < 2 or len(tasks) < 2 or size < POOL_BYTES:
        return [encode_task(t, level, lowercase, s) for t, s in zip(tasks, spills, strict=True)], spills
    with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:  # spawn would rerun __main__
        try:
            futures = [None if t[0] == STDIN else pool.submit(encode_task, t, level, lowercase, s)
                       for t, s in zip(tasks, spills, strict=True)]
            results = [encode_task(t, level, lowercase, s) if f is None else None
                       for t, s, f in zip(tasks, spills, futures, strict=True)]
            return [r if f is None else f.result() for r, f in zip(results, futures, strict=True)], spills
        except BrokenProcessPool:
            raise RnnlmError("a process reading the text died (out of memory?)") from None
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def _read_chunks(f):
    """The rest of binary file ``f`` in views of one reused buffer of READ_BYTES."""
    view = memoryview(bytearray(READ_BYTES))
    while n := f.readinto(view):
        yield view[:n]


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in _read_chunks(f):
            digest.update(chunk)
    return digest.hexdigest()


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def temporary_folder(parent):
    return tempfile.TemporaryDirectory(prefix=".spill-", dir=parent)


# ---------------------------------------------------------------------------------------------- reading


class TokenIds:
    """A read-only sequence of N token ids held in shards (files or arrays), or a range of one.

    ``read(start, stop)`` copies positions [start, stop) out of the shards; a file's ids are read with
    ``pread``, so reading a store front to back maps none of it into this process (a mapped page would be
    mapped with its whole page-cache folio, up to megabytes). ``array()`` is a single whole shard mapped;
    ``np.asarray`` copies the whole.
    """

    def __init__(self, parts, files=None, start=0, stop=None):
        self.parts, self.files = parts, files or [None] * len(parts)
        self.bounds = np.cumsum([0] + [len(p) for p in parts])
        self.start, self.stop = start, int(self.bounds[-1]) if stop is None else stop
        self.dtype = np.dtype(parts[0].dtype.char)

    @classmethod
    def of(cls, ids):
        return ids if isinstance(ids, TokenIds) else cls([np.asarray(ids)])

    def __len__(self):
        return self.stop - self.start

    def view(self, start, stop):
        """Positions [start, stop) of this sequence, sharing its shards."""
        return TokenIds(self.parts, self.files, self.start + start, self.start + stop)

    def read(self, start, stop):
        """The ids at positions [start, stop) as a new 1-D array."""
        start, stop = self.start + start, self.start + stop
        out = np.empty(stop - start, self.dtype)
        first = np.searchsorted(self.bounds, start, side="right") - 1
        for k in range(first, len(self.parts)):
            lo, hi = max(start, self.bounds[k]), min(stop, self.bounds[k + 1])
            if lo >= hi:
                break
            target = out[lo - start:hi - start]
            if self.files[k] is None:
                target[:] = self.parts[k][lo - self.bounds[k]:hi - self.bounds[k]]
            else:
                f, header = self.files[k]
                os.preadv(f.fileno(), [memoryview(target).cast("B")], header + (lo - self.bounds[k]) * out.itemsize)
        return out

    def chunks(self, size=1 << 20):
        """The ids in order, at most ``size`` at a time."""
        for a in range(0, len(self), size):
            yield self.read(a, min(a + size, len(self)))

    def array(self):
        """The ids as one 1-D array: the shard itself when they are one whole shard, else a copy."""
        if len(self.parts) == 1 and len(self) == len(self.parts[0]):
            return self.parts[0]
        return np.asarray(self)

    def __array__(self, dtype=None, copy=None):
        whole = np.concatenate(list(self.chunks())) if len(self) else np.empty(0, self.dtype)
        return whole if dtype is None else whole.astype(dtype, copy=False)


def token_counts(ids, vocab_size):
    """(V,) int64 occurrences of every id in ``ids`` (an array or TokenIds), read a chunk at a time."""
    counts = np.zeros(vocab_size, np.int64)
    for chunk in TokenIds.of(ids).chunks():
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def read_manifest(path):
    """The checked manifest of store ``path``: {"dtype": np.dtype, "shards": [{"name", "tokens", "sha256"}],
    "tokens", "vocab_sha256"} besides the other recorded fields."""
    where = str(Path(path) / MANIFEST)
    record = read_json_file(Path(path) / MANIFEST, "store manifest")
    if not isinstance(record, dict):
        raise RnnlmError(f"{where} must be a JSON object")
    checked(record, "format_version", where, (int,), choices=(STORE_VERSION,))
    dtype = np.dtype(checked(record, "dtype", where, (str,), choices=("uint8", "uint16", "uint32")))
    shards = checked(record, "shards", where, (list,))
    if not shards:
        raise RnnlmError(f"{where} lists no shards")
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict):
            raise RnnlmError(f"{where}: shard {k} must be a JSON object")
        checked(shard, "name", where, (str,), choices=(shard_name(k),))
        checked(shard, "tokens", where, (int,), low=1)
        digest = checked(shard, "sha256", where, (str,))
        if not re.fullmatch("[0-9a-f]{64}", digest):
            raise RnnlmError(f"{where}: shard {shard['name']} has a malformed sha256 {digest[:80]!r}")
    total = checked(record, "tokens", where, (int,), low=1)
    if total != sum(shard["tokens"] for shard in shards):
        raise RnnlmError(f"{where} declares {total:,} tokens, but its shards hold {sum(s['tokens'] for s in shards):,}")
    checked(record, "vocab_sha256", where, (str,))
    return {**record, "dtype": dtype}


def open_shard(path, shard, dtype, vocab_size):
    """(mapped array, (open file, header bytes)) of a store's shard, after checking its header, size, ids and
    SHA-256."""
    file = Path(path) / shard["name"]
    if not file.exists():
        raise RnnlmError(f"shard {shard['name']} of {path} is missing")
    f = open_regular(file, "token shard")
    try:
        found, header, digest = _check_shard(f, file, shard, dtype, vocab_size)
        if digest != shard["sha256"]:
            raise RnnlmError(f"shard {shard['name']} of {path} has a bad checksum (its SHA-256 is not the manifest's):"
                             " the file was changed or is corrupt")
        mapped = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), found, shard["tokens"], header)
    except BaseException:
        f.close()
        raise
    return mapped, (f, header)


def _check_shard(f, file, shard, dtype, vocab_size):
    """(dtype, header bytes, SHA-256) of an open shard whose header, size and ids are what the manifest
    declares."""
    shape, _, found, header = read_npy_header(f, file)
    check_dtype(found, {"u": (dtype.itemsize,)}, file)
    if shape != (shard["tokens"],) or found.str != dtype.newbyteorder("<").str:
        raise RnnlmError(f"{file} holds {shape} {found}, the manifest declares ({shard['tokens']},) {dtype}")
    size = os.fstat(f.fileno()).st_size
    expected = header + shard["tokens"] * dtype.itemsize
    if size != expected:
        raise RnnlmError(f"{file} is {size:,} bytes, its header declares {expected:,}")
    f.seek(0)
    digest, largest = hashlib.sha256(f.read(header)), 0
    for chunk in _read_chunks(f):
        digest.update(chunk)
        largest = max(largest, int(np.frombuffer(chunk, found).max()))
    if largest >= vocab_size:
        raise RnnlmError(f"{file} has token id {largest}, out of range for a vocabulary of {vocab_size} tokens")
    return found, header, digest.hexdigest()


def open_store(path, vocab_file, vocab_size):
    """(TokenIds, manifest) of store ``path``, its vocabulary file ``vocab_file`` holding ``vocab_size`` tokens;
    RnnlmError naming the shard that is missing, altered or out of range, or a vocabulary file not the store's."""
    manifest = read_manifest(path)
    if sha256_of(vocab_file) != manifest["vocab_sha256"]:
        raise RnnlmError(f"{vocab_file} is not the vocabulary {path} was encoded with (its SHA-256 differs)")
    opened = [open_shard(path, shard, manifest["dtype"], vocab_size) for shard in manifest["shards"]]
    return TokenIds([part for part, _ in opened], [mapped for _, mapped in opened]), manifest
