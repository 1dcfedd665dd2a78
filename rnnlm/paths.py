"""The files a command writes: all checked before any work, each written atomically.

``check_outputs`` refuses, with one line naming the option, an output that

* is the same file as an input or as another output (by resolved path, or by device and inode);
* exists and is not a regular file (a directory, FIFO, device node, socket) or is a symbolic link,
  which an atomic rename would replace by a file; or is read-only (no write bit, checked even for root);
* lies under a folder that cannot be created or written;
* has a name, or a temporary name derived from it, longer than the file system allows (NAME_MAX,
  PATH_MAX).

``check_output_dir`` does the same for a directory that a command replaces as a whole (``tokenize``).

Atomic writes (``atomic_output``, which ``rnnlm.model.atomic_savez`` uses, and ``atomic_directory``) go to a
temporary ``.NAME.XXXXXXXX.tmp`` beside the target (``tempfile``'s name), fsynced and renamed into place; a
killed write leaves such a file behind, and the next write of the same path removes it. Every ``OSError``
while writing (a full disk, a folder removed meanwhile) becomes one ``RnnlmError`` naming the file.
"""

import contextlib
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path

from rnnlm.errors import RnnlmError

TEMP_SUFFIX = ".tmp"
TEMP_MARGIN = len("..XXXXXXXX" + TEMP_SUFFIX)  # ".NAME.XXXXXXXX.tmp" is this much longer than NAME
_TEMP_RANDOM = re.compile(r"[a-z0-9_]{8}")  # tempfile's random part
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device node"),
          (stat.S_ISBLK, "a device node"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def _kind(mode):
    return next((what for test, what in _KINDS if test(mode)), "a regular file")


def _lstat(path, label=None):
    """os.lstat(path), or None where nothing is; an error names ``label``, the option that gave the path."""
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        named = f"{label} {path}" if label else str(path)
        raise RnnlmError(f"{named}: cannot inspect it: {exc.strerror}") from None


def _existing_ancestor(label, path):
    """The nearest folder of ``path`` (absolute) that exists, and the names below it to be created."""
    missing = []
    folder = path.parent
    while _lstat(folder, label) is None:
        missing.append(folder.name)
        folder = folder.parent
    return folder, missing


def _limits(folder):
    """(NAME_MAX, PATH_MAX) of the file system holding ``folder``."""
    try:
        return os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def _check_folder(label, path):
    """The folder of ``path`` exists or can be created, and can be written; the names fit the limits."""
    folder, missing = _existing_ancestor(label, path)
    try:
        info = os.stat(folder)
    except OSError as exc:
        raise RnnlmError(f"{label} {path}: cannot use the folder {folder}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RnnlmError(f"{label} {path}: cannot create a folder under {folder}, which is {_kind(info.st_mode)}")
    if not os.access(folder, os.W_OK | os.X_OK) or not info.st_mode & 0o222:
        raise RnnlmError(f"{label} {path}: the folder {folder} is not writable")
    name_max, path_max = _limits(folder)
    for name in missing:
        if len(os.fsencode(name)) > name_max:
            raise RnnlmError(f"{label} {path}: the folder name {name[:20]!r}... is too long (at most {name_max} bytes)")
    if len(os.fsencode(path.name)) > name_max - TEMP_MARGIN:
        raise RnnlmError(f"{label} {path}: the name is too long ({len(os.fsencode(path.name))} bytes; at most "
                         f"{name_max - TEMP_MARGIN}, to leave room for its temporary name)")
    if len(os.fsencode(str(path))) + TEMP_MARGIN >= path_max:
        raise RnnlmError(f"{label} {path}: the path is too long (at most {path_max - TEMP_MARGIN - 1} bytes)")


def _check_target(label, path, directory):
    """What exists at ``path`` may be replaced: a writable regular file (or a directory, if ``directory``)."""
    info = _lstat(path, label)
    if info is None:
        return
    wanted = stat.S_ISDIR if directory else stat.S_ISREG
    if not wanted(info.st_mode):
        expected = "a directory" if directory else "a file name"
        raise RnnlmError(f"{label} {path} is {_kind(info.st_mode)}, expected {expected}")
    if not info.st_mode & 0o222:
        raise RnnlmError(f"{label} {path} is read-only (mode {stat.S_IMODE(info.st_mode):o})")


def _identity(path):
    """(resolved path, (device, inode) or None) of ``path``."""
    try:
        info = os.stat(path)
        inode = (info.st_dev, info.st_ino)
    except OSError:
        inode = None
    return Path(os.path.realpath(path)), inode


def _same(a, b):
    return a[0] == b[0] or (a[1] is not None and a[1] == b[1])


def _absolute(label, path):
    path = Path(os.path.abspath(path))
    if path.name in ("", ".", ".."):
        raise RnnlmError(f"{label} {path} is a directory, expected a file name")
    return path


def check_outputs(outputs, inputs=()):
    """RnnlmError naming the first output that cannot be written safely, before any work.

    outputs: (label, path) pairs, ``label`` the option that named it ("-o", "--log"); inputs: (label, path)
    pairs of the files the command reads (None and ``-`` are skipped). An output may equal an input only
    if both are given with the same label (a checkpoint that ``--resume`` reads and rewrites).
    """
    inputs = [(label, path, _identity(path)) for label, path in inputs if path is not None and str(path) != "-"]
    seen = []
    for label, given in outputs:
        path = _absolute(label, given)
        _check_folder(label, path)
        _check_target(label, path, directory=False)
        identity = _identity(path)
        for other_label, other, other_identity in [*inputs, *seen]:
            if other_label != label and _same(identity, other_identity):
                raise RnnlmError(f"{label} {given} is the same file as {other_label} {other}")
        seen.append((label, given, identity))


def check_output_dir(label, given, inputs=(), members=()):
    """RnnlmError unless directory ``given`` can be replaced as a whole: absent, or holding only
    ``members``, neither an input nor a folder holding one, and not the working directory or above it."""
    path = _absolute(label, given)
    _check_folder(label, path)
    _check_target(label, path, directory=True)
    resolved = Path(os.path.realpath(path))
    if Path.cwd().resolve().is_relative_to(resolved):
        raise RnnlmError(f"{label} {given} is the working directory or holds it; name a new directory")
    if _lstat(path) is not None:
        try:
            others = sorted(set(os.listdir(path)) - set(members))
        except OSError as exc:
            raise RnnlmError(f"{label} {given}: cannot list it: {exc.strerror}") from None
        if others:
            raise RnnlmError(f"{label} {given} holds other files than {' and '.join(members)} (such as "
                             f"{others[0]!r}), which replacing it would delete; name a new directory")
    for other_label, other in inputs:
        if other is not None and str(other) != "-" and Path(os.path.realpath(other)).is_relative_to(resolved):
            raise RnnlmError(f"{label} {given} holds {other_label} {other}, which replacing it would delete")


def same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file (one resolved path, or one device and inode)."""
    return _same(_identity(a), _identity(b))


def relative_to(path, folder):
    """``path`` as it is named from ``folder`` (``..`` where needed); ``-`` and None stay as they are."""
    if path is None or str(path) == "-":
        return path
    return os.path.relpath(os.path.abspath(path), os.path.abspath(folder))


def inside(folder, name):
    """``folder / name`` if ``name`` (a string read from a file: data, not an order) is a relative path that
    stays inside ``folder`` once every ``..`` and symbolic link is resolved; else None."""
    if not isinstance(name, str) or name in ("", "-") or "\0" in name or os.path.isabs(name):
        return None
    path = Path(folder) / name
    if not Path(os.path.realpath(path)).is_relative_to(Path(os.path.realpath(folder))):
        return None
    return Path(os.path.normpath(path))


def remove_stale_temporaries(path):
    """Remove the temporary files (or directories) that killed atomic writes of ``path`` left beside it."""
    path = Path(path)
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        middle = name[len(prefix): -len(TEMP_SUFFIX)]
        if name.startswith(prefix) and name.endswith(TEMP_SUFFIX) and _TEMP_RANDOM.fullmatch(middle):
            stale = path.parent / name
            info = _lstat(stale)
            if info is not None and stat.S_ISDIR(info.st_mode):
                shutil.rmtree(stale, ignore_errors=True)
            elif info is not None and stat.S_ISREG(info.st_mode):
                stale.unlink(missing_ok=True)


@contextlib.contextmanager
def naming_errors(path):
    """Turn an OSError while writing ``path`` into one RnnlmError line that names it."""
    try:
        yield
    except OSError as exc:
        raise RnnlmError(f"cannot write {path}: {exc.strerror or exc}") from None


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path, flags=os.O_RDONLY):
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path, mode="wb", encoding=None):
    """A file object whose contents replace ``path`` once the block ends without an exception (then
    fsynced); the old file stays if it raises, and the temporary file is removed."""
    path = Path(path)
    with naming_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make every output private
        try:
            with os.fdopen(fd, mode, encoding=encoding) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync(path.parent)


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block ends (in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_directory(path):
    """A new temporary directory beside ``path`` that replaces the directory ``path`` as a whole once the
    block ends without an exception; otherwise it is removed and the old directory stays as it was.

    The writer fills the directory; its files are fsynced here. The old directory is moved aside and the
    new one renamed into place with SIGINT and SIGTERM held, then the old one is deleted.
    """
    path = Path(path)
    with naming_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
        try:
            tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would make the directory private
            yield tmp
            for member in tmp.iterdir():
                _fsync(member)
            _fsync(tmp)
            _swap_in(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _swap_in(new, path):
    """Rename directory ``new`` to ``path``, replacing (and deleting) the directory there."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent))
    with _signals_held():
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            pass
        except OSError:
            aside.rmdir()
            raise
        os.rename(new, path)
    shutil.rmtree(aside, ignore_errors=True)
    _fsync(path.parent)
