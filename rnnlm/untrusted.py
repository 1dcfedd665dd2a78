"""Reading files that may be corrupt or hostile: .npz archives, .npy arrays and JSON, every size bounded
before anything of that size is allocated, and no pickle ever loaded.

Every failure is one ``RnnlmError`` whose one-line message names the file (and the member): never
another exception type, never a ``RecursionError`` or ``MemoryError`` from a crafted nesting or size.

* ``open_regular``: a regular file only (a FIFO, device or directory is refused without blocking).
* ``parse_json``: at most ``MAX_JSON_CHARS`` characters nested at most ``MAX_JSON_DEPTH`` deep (checked
  before parsing), no NaN or infinities (nor numbers that overflow to them); ``read_json_file`` reads at
  most ``MAX_JSON_CHARS`` bytes.
* ``Npz``: the zip central directory is bounded (``MAX_MEMBERS``, ``MAX_DIRECTORY_BYTES``) before it is
  parsed; members are only ``name.npy``, unique, stored or deflated, unencrypted. A member is opened
  only when asked for by name (``check_members`` rejects unknown ones unread); its .npy header is
  bounded (``MAX_NPY_HEADER``) and its dtype and shape are checked against what the caller expects
  before its data is allocated; the zip header's declared size must equal the .npy header's
  (header + shape × itemsize), and reading stops at that size, so a deflate bomb decompresses no
  further than the array it claims to be.
"""

import codecs
import io
import json
import math
import os
import re
import stat
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from rnnlm.errors import RnnlmError

MAX_JSON_CHARS = 64 << 20  # a vocab.json of MAX_VOCAB_SIZE tokens of 10 characters, one per line
MAX_JSON_DEPTH = 64
MAX_MEMBERS = 4096
MAX_DIRECTORY_BYTES = 4 << 20
MAX_NPY_HEADER = 10_000
DEFLATE_MAX_RATIO = 1032  # deflate's largest expansion: 258 bytes per 2 bits
CHUNK = 16 << 20

_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
               struct.error, zlib.error)
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
FLOATS = {"f": (2, 4, 8)}  # read as float32: values out of its range are refused as infinite
BFLOAT16 = {"u": (2,)}  # bfloat16 bit patterns (Adam's moments with --moments bfloat16)
INTEGERS = {"i": (1, 2, 4, 8), "u": (1, 2, 4, 8)}
REQUIRED = object()


def open_regular(path, what):
    """A regular file opened for binary reading; RnnlmError naming it for anything else."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    except FileNotFoundError:
        raise RnnlmError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise RnnlmError(f"{path} is a directory, expected a {what}") from None
    except OSError as exc:
        raise RnnlmError(f"cannot read {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise RnnlmError(f"{path} is {kind}, expected a {what}")
    return os.fdopen(fd, "rb")


def check_fits(nbytes, what):
    """RnnlmError when ``nbytes`` exceed this machine's physical memory."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return
    if nbytes > memory:
        raise RnnlmError(f"{what} needs {nbytes / 2**30:.1f} GiB, more than this machine's {memory / 2**30:.1f} GiB")


def checked(record, key, where, types, default=REQUIRED, low=None, high=None, choices=None):
    """``record[key]`` (or ``default`` when absent), checked: an instance of ``types`` (a bool is no int,
    an int is a float; floats finite), within [low, high] and among ``choices`` when given."""
    if key not in record:
        if default is REQUIRED:
            raise RnnlmError(f"{where} lacks the field {key!r}")
        return default
    value = record[key]
    if value is None and type(None) in types:
        return None
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if float in types and int not in types and type(value) is int:
        ok = abs(value) < 2**1000  # float() of a larger int overflows
        value = float(value) if ok else value
    if isinstance(value, float) and not math.isfinite(value):
        ok = False
    if ok and choices is not None:
        ok = value in choices
    if ok and low is not None and value is not None:
        ok = low <= value and (high is None or value <= high)
    if not ok:
        expected = " or ".join(t.__name__ if t is not type(None) else "null" for t in types)
        if choices is not None:
            expected = "one of " + ", ".join(map(repr, choices))
        elif low is not None:
            expected += f" in [{low}, {'∞' if high is None else high}]"
        raise RnnlmError(f"{where} has {key!r} = {_show(value)}, expected {expected}")
    return value


def _show(value, limit=40):
    """A short one-line repr of an untrusted value."""
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


def _refuse_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is beyond the range of floats")
    return value


def parse_json(text, what, max_chars=MAX_JSON_CHARS, max_depth=MAX_JSON_DEPTH):
    """The value of the JSON ``text``; RnnlmError naming ``what`` if it is too long, too deep or invalid."""
    if len(text) > max_chars:
        raise RnnlmError(f"{what} holds {len(text):,} characters of JSON, more than the {max_chars:,} allowed")
    if text.count("[") + text.count("{") > max_depth:  # else it cannot nest deeper: no need to look closer
        brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
        opens = np.frombuffer(brackets, np.uint8)
        depth = int(np.cumsum(np.where((opens == ord("[")) | (opens == ord("{")), 1, -1)).max(initial=0))
        if depth > max_depth:
            raise RnnlmError(f"{what} holds JSON nested {depth} deep, more than the {max_depth} allowed")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as exc:  # JSONDecodeError, and integers of more digits than Python converts
        raise RnnlmError(f"{what} is not valid JSON ({exc})") from None


def read_json_file(path, what, max_chars=MAX_JSON_CHARS):
    """The JSON value of a UTF-8 file of at most ``max_chars`` bytes."""
    with open_regular(path, what) as f:
        data = f.read(min(os.fstat(f.fileno()).st_size, max_chars) + 1)  # read(n) allocates n bytes
    if len(data) > max_chars:
        raise RnnlmError(f"{path} is larger than the {max_chars:,} bytes allowed for a {what}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RnnlmError(f"{path} is not UTF-8 (byte offset {exc.start})") from None
    return parse_json(text, str(path))


def read_npy_header(f, where):
    """(shape, fortran_order, dtype, header bytes) of the .npy data at ``f``'s position, reading at most
    ``MAX_NPY_HEADER`` bytes of header; RnnlmError naming ``where`` if it is not a plain .npy header."""
    preamble = f.read(8)
    if len(preamble) < 8 or preamble[:6] != b"\x93NUMPY":
        raise RnnlmError(f"{where} is not a valid .npy array (no NUMPY signature)")
    version = (preamble[6], preamble[7])
    if version not in ((1, 0), (2, 0)):
        raise RnnlmError(f"{where} has .npy version {version}, expected 1.0 or 2.0")
    length_format = "<H" if version == (1, 0) else "<I"
    length_bytes = f.read(struct.calcsize(length_format))
    if len(length_bytes) < struct.calcsize(length_format):
        raise RnnlmError(f"{where} is truncated in its .npy header")
    (length,) = struct.unpack(length_format, length_bytes)
    if length > MAX_NPY_HEADER:
        raise RnnlmError(f"{where} has a .npy header of {length:,} bytes, more than the {MAX_NPY_HEADER:,} allowed")
    header = f.read(length)
    if len(header) < length:
        raise RnnlmError(f"{where} is truncated in its .npy header")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = reader(io.BytesIO(length_bytes + header), max_header_size=MAX_NPY_HEADER)
    except Exception as exc:  # numpy parses the (bounded) header with ast and tokenize, which raise many types
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RnnlmError(f"{where} has a malformed .npy header ({message})") from None
    if any(n < 0 for n in shape):
        raise RnnlmError(f"{where} declares a negative dimension {shape}")
    return tuple(shape), fortran_order, dtype, len(preamble) + len(length_bytes) + length


def check_dtype(dtype, kinds, where):
    """RnnlmError unless ``dtype`` is a plain number type of an allowed kind and size ({kind: itemsizes})."""
    plain = dtype.names is None and dtype.subdtype is None and not dtype.hasobject
    if not plain or dtype.itemsize not in kinds.get(dtype.kind, ()):
        allowed = ", ".join(f"{kind}{size}" for kind, sizes in kinds.items() for size in sizes)
        raise RnnlmError(f"{where} has dtype {dtype.str!r}, expected one of {allowed}")


def read_data(f, dtype, shape, fortran_order, where, into=None):
    """The array of ``shape`` read from ``f`` in pieces (its size already checked against the file); with
    ``into`` (a dtype), converted a piece at a time into an array of that dtype, so that a float64 member
    never needs a float64 array of its whole size."""
    count = math.prod(shape)
    try:
        flat = np.empty(count, into or dtype)
    except (MemoryError, ValueError):
        raise RnnlmError(f"{where} declares {count:,} elements, more than this machine can hold") from None
    if flat.dtype == dtype:
        _read_into(f, memoryview(flat).cast("B"), 0, flat.nbytes, where)
    else:
        piece = np.empty(min(count, max(1, CHUNK // dtype.itemsize)), dtype)
        for start in range(0, count, len(piece)):
            n = min(len(piece), count - start)
            _read_into(f, memoryview(piece[:n]).cast("B"), start * dtype.itemsize, count * dtype.itemsize, where)
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is an inf, refused by the caller
                flat[start:start + n] = piece[:n]
    return flat.reshape(shape, order="F" if fortran_order else "C")


def _read_into(f, view, offset, total, where):
    """Fill ``view`` from ``f``: bytes ``offset`` onward of a member's ``total`` data bytes (for the error)."""
    done = 0
    while done < len(view):
        got = f.readinto(view[done:done + CHUNK])
        if not got:
            raise RnnlmError(f"{where} is truncated ({offset + done:,} of {total:,} data bytes)")
        done += got


def finite_float32(array, where, bound=None):
    """``array`` as C-contiguous float32; RnnlmError if any value is NaN or infinite (or overflows), or, given
    ``bound``, larger than it in magnitude."""
    with np.errstate(over="ignore", invalid="ignore"):
        result = np.ascontiguousarray(array, np.float32)
    flat = result.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        chunk = flat[start:start + CHUNK]
        if not np.isfinite(chunk).all():
            raise RnnlmError(f"{where} holds a NaN or infinite value")
        if bound is not None and chunk.size and np.abs(chunk).max() > bound:
            raise RnnlmError(f"{where} holds a weight beyond ±{bound:g}")
    return result


def finite_bfloat16(array, where):
    """``array`` of bfloat16 bits as C-contiguous native uint16; RnnlmError if any is a NaN or an infinity (all
    eight exponent bits set)."""
    result = np.ascontiguousarray(array, np.uint16)
    flat = result.reshape(-1)
    for start in range(0, flat.size, CHUNK):
        if ((flat[start:start + CHUNK] & 0x7F80) == 0x7F80).any():
            raise RnnlmError(f"{where} holds a NaN or infinite value")
    return result


def finite(array, dtype, where):
    """``array`` checked and converted by ``finite_float32`` (dtype float32) or ``finite_bfloat16`` (uint16)."""
    return finite_bfloat16(array, where) if np.dtype(dtype) == np.uint16 else finite_float32(array, where)


def read_npy_file(path, what, kinds):
    """The 1-D array of a .npy file whose size matches its header exactly, dtype among ``kinds``."""
    with open_regular(path, what) as f:
        shape, fortran_order, dtype, header = read_npy_header(f, path)
        check_dtype(dtype, kinds, path)
        if len(shape) != 1:
            raise RnnlmError(f"{path} holds an array of shape {shape}, expected a 1-D array")
        size = os.fstat(f.fileno()).st_size
        if size != header + shape[0] * dtype.itemsize:
            raise RnnlmError(f"{path} is {size:,} bytes, but its header declares "
                             f"{header + shape[0] * dtype.itemsize:,}")
        return read_data(f, dtype, shape, fortran_order, path)


class Npz:
    """An .npz file opened for checked reading, member by member (a context manager).

    ``names``: the members' names without ``.npy``. Nothing but the zip directory is read until a
    member is asked for by ``read_json`` or ``read_array``.
    """

    def __init__(self, path, what):
        self.path, self.what = Path(path), what
        self.file = open_regular(path, what)
        try:
            self._check_directory()
            self.zip = zipfile.ZipFile(self.file)
            self.members = self._members()
        except _ZIP_ERRORS as exc:
            self.file.close()
            raise RnnlmError(f"{self.path} is not a readable .npz {what} ({type(exc).__name__}: {exc})") from None
        except BaseException:
            self.file.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    @property
    def names(self):
        return set(self.members)

    def _check_directory(self):
        head = self.file.read(6)
        if head == b"\x93NUMPY":
            raise RnnlmError(f"{self.path} is a single .npy array, not an .npz {self.what}")
        if not head:
            raise RnnlmError(f"{self.path} is empty, expected an .npz {self.what}")
        end = zipfile._EndRecData(self.file)  # the end record only, before zipfile parses the directory
        if head[:4] != b"PK\x03\x04" or end is None:
            raise RnnlmError(f"{self.path} is not an .npz {self.what} (truncated, or not a zip archive)")
        if end[zipfile._ECD_ENTRIES_TOTAL] > MAX_MEMBERS or end[zipfile._ECD_SIZE] > MAX_DIRECTORY_BYTES:
            raise RnnlmError(f"{self.path} has a zip directory of {end[zipfile._ECD_ENTRIES_TOTAL]:,} members "
                             f"({end[zipfile._ECD_SIZE]:,} bytes), more than an .npz {self.what} has")
        self.file.seek(0)

    def _members(self):
        """{name: ZipInfo}, after checking that every member is a unique, plain ``name.npy``."""
        members = {}
        size = os.fstat(self.file.fileno()).st_size
        for info in self.zip.infolist():
            where = f"{self.path}: member {info.filename!r}"
            if not info.filename.endswith(".npy") or info.filename[:-4] in members:
                raise RnnlmError(f"{where} is not a unique NAME.npy member of an .npz {self.what}")
            if info.flag_bits & 1 or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise RnnlmError(f"{where} is encrypted or compressed other than by deflate")
            ratio = 1 if info.compress_type == zipfile.ZIP_STORED else DEFLATE_MAX_RATIO
            if info.header_offset + info.compress_size > size or info.file_size > ratio * info.compress_size + 64:
                raise RnnlmError(f"{where} declares sizes that do not fit the file")
            members[info.filename[:-4]] = info
        return members

    def check_members(self, required, optional=()):
        """RnnlmError naming a member that is missing or not among ``required`` and ``optional``."""
        unknown = sorted(self.names - set(required) - set(optional))
        if unknown:
            raise RnnlmError(f"{self.path} has an unexpected member {unknown[0] + '.npy'!r} for a rnnlm {self.what}")
        missing = sorted(set(required) - self.names)
        if missing:
            raise RnnlmError(f"{self.path} lacks the member {missing[0] + '.npy'!r} of a rnnlm {self.what}")

    def _open(self, name, check_header):
        """The open member, its shape, order and dtype, after ``check_header(shape, dtype, where)`` and the
        size check; the member is closed on an error."""
        where = f"{self.path}: member {name + '.npy'!r}"
        if name not in self.members:
            raise RnnlmError(f"{self.path} lacks the member {name + '.npy'!r} of a rnnlm {self.what}")
        info = self.members[name]
        member = self.zip.open(info)
        try:
            shape, fortran_order, dtype, header = read_npy_header(member, where)
            check_header(shape, dtype, where)
            if info.file_size != header + math.prod(shape) * dtype.itemsize:
                raise RnnlmError(f"{where} is {info.file_size:,} bytes, but its .npy header declares "
                                 f"{header + math.prod(shape) * dtype.itemsize:,}")
        except BaseException:
            member.close()
            raise
        return member, where, shape, fortran_order, dtype

    def _finish(self, member, where):
        """Read past the data's end: the member must be exhausted (zipfile checks its CRC there)."""
        if member.read(1):
            raise RnnlmError(f"{where} has data past its array")

    def read_array(self, name, kinds, shape=None, max_length=None, into=None):
        """Member ``name``: of ``shape`` if given, else 1-D of at most ``max_length`` elements; dtype among
        ``kinds`` ({kind: itemsizes}); returned as stored, or converted to dtype ``into`` as it is read."""

        def check_header(found, dtype, where):
            check_dtype(dtype, kinds, where)
            if shape is not None and found != tuple(shape):
                raise RnnlmError(f"{where} has shape {found}, expected {tuple(shape)}")
            if shape is None and (len(found) != 1 or found[0] > max_length):
                raise RnnlmError(f"{where} has shape {found}, expected a 1-D array of at most {max_length:,}")

        try:
            member, where, found, fortran_order, dtype = self._open(name, check_header)
            with member:
                array = read_data(member, dtype, found, fortran_order, where, into)
                self._finish(member, where)
            return array
        except _ZIP_ERRORS as exc:
            raise RnnlmError(f"{self.path}: member {name + '.npy'!r} is corrupt ({type(exc).__name__}: {exc})") \
                from None

    def read_pieces(self, name, shape, fortran_order, store, into=np.float32):
        """Member ``name``, a float array of ``shape`` stored in ``fortran_order`` (else RnnlmError; None: either),
        as float32 pieces of at most CHUNK bytes in the file's order: store(start, piece) for each, start its
        first element's index; each piece is checked finite first, so that no whole-size array is ever
        allocated. into uint16: a member of bfloat16 bits, its pieces uint16. Returns the member's order (True:
        Fortran's)."""

        def check_header(found, dtype, where):
            check_dtype(dtype, BFLOAT16 if np.dtype(into) == np.uint16 else FLOATS, where)
            if found != tuple(shape):
                raise RnnlmError(f"{where} has shape {found}, expected {tuple(shape)}")

        try:
            member, where, _, found_order, dtype = self._open(name, check_header)
            with member:
                if fortran_order is not None and found_order != fortran_order:
                    raise RnnlmError(f"{where} is stored in {'Fortran' if found_order else 'C'} order, expected "
                                     f"{'Fortran' if fortran_order else 'C'}")
                count = math.prod(shape)
                piece = np.empty(min(count, max(1, CHUNK // dtype.itemsize)), dtype)
                for start in range(0, count, len(piece)):
                    n = min(len(piece), count - start)
                    _read_into(member, memoryview(piece[:n]).cast("B"), start * dtype.itemsize,
                               count * dtype.itemsize, where)
                    store(start, finite(piece[:n], into, where))
                self._finish(member, where)
            return found_order
        except _ZIP_ERRORS as exc:
            raise RnnlmError(f"{self.path}: member {name + '.npy'!r} is corrupt ({type(exc).__name__}: {exc})") \
                from None

    def read_json(self, name, max_chars=MAX_JSON_CHARS):
        """The JSON value held as text by member ``name`` (a 0-d unicode array), bounded as ``parse_json``."""

        def check_header(found, dtype, where):
            if found != () or dtype.kind != "U" or dtype.itemsize > 4 * max_chars:
                raise RnnlmError(f"{where} is {dtype.str!r} of shape {found}, expected one JSON text "
                                 f"of at most {max_chars:,} characters")

        try:
            member, where, _, _, dtype = self._open(name, check_header)
            decoder = codecs.getincrementaldecoder("utf-32-be" if dtype.byteorder == ">" else "utf-32-le")()
            with member:
                parts, left = [], dtype.itemsize
                while left:
                    chunk = member.read(min(left, CHUNK))
                    if not chunk:
                        raise RnnlmError(f"{where} is truncated")
                    parts.append(decoder.decode(chunk))
                    left -= len(chunk)
                parts.append(decoder.decode(b"", final=True))
                self._finish(member, where)
        except UnicodeDecodeError as exc:
            raise RnnlmError(f"{self.path}: member {name + '.npy'!r} is not valid text ({exc.reason})") from None
        except _ZIP_ERRORS as exc:
            raise RnnlmError(f"{self.path}: member {name + '.npy'!r} is corrupt ({type(exc).__name__}: {exc})") \
                from None
        return parse_json("".join(parts).rstrip("\x00"), f"{self.path}: member {name + '.npy'!r}", max_chars)
