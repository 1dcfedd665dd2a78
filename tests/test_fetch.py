"""``rnnlm fetch`` against a local HTTP server on 127.0.0.1 serving small archives built here (never the internet):
every archive kind of the registry, resuming after a cut connection, checksum and size mismatches, files in the
way, and the usage error of an unknown name."""

import dataclasses
import hashlib
import http.server
import inspect
import io
import json
import random
import re
import tarfile
import threading
import zipfile

import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

from rnnlm import fetch as registry
from rnnlm.tokenizer import load_token_dir

OLD_CLICK = "mix_stderr" in inspect.signature(CliRunner).parameters
WORDS = ["the", "a", "cat", "dog", "sees", "likes", "runs", "big", "small", "red", "and", "but", ".", "?"]
LM1B = "1-billion-word-language-modeling-benchmark-r13output"


class Handler(http.server.BaseHTTPRequestHandler):
    """GET /FILE from ``server.files``, with ``Range: bytes=N-`` answered by 206 unless ``server.honour_range`` is
    false; ``server.cut_after`` cuts the next response after that many body bytes."""

    def do_GET(self):
        server = self.server
        name, asked = self.path.lstrip("/"), self.headers.get("Range")
        server.requests.append((name, asked))
        body = server.files.get(name)
        if body is None:
            self.send_error(404)
            return
        start = int(match[1]) if (match := re.fullmatch(r"bytes=(\d+)-", asked or "")) else 0
        if start and server.honour_range:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            start = 0
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        end = len(body) if server.cut_after is None else start + server.cut_after
        server.cut_after = None
        self.wfile.write(body[start:end])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.honour_range, httpd.cut_after = {}, [], True, None
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def text(seed, lines=60):
    rng = random.Random(seed)
    return "".join(" ".join(rng.choices(WORDS, k=rng.randint(3, 9))) + "\n" for _ in range(lines)).encode()


def zip_bytes(members):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("wikitext-2/", b"")
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def tar_gz_bytes(members):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def fixture(name):
    """(files served, expected split texts) of a small stand-in for the corpus ``name``."""
    if name == "ptb":
        splits = {split: text(i) for i, split in enumerate(("train", "valid", "test"))}
        return {f"ptb.{split}.txt": data for split, data in splits.items()}, splits
    if name == "wikitext-2":
        splits = {split: text(i) for i, split in enumerate(("train", "valid", "test"))}
        members = {f"wikitext-2/wiki.{split}.tokens": data for split, data in splits.items()}
        members["wikitext-2/wiki.train.raw"] = b"not a split\n"
        return {"wikitext-2-v1.zip": zip_bytes(members)}, splits
    if name == "shakespeare":
        data = "".join(f"CITIZEN {i}:\nSpeak, speak; café naïve.\n\n" for i in range(40))
        cut = int(len(data) * 0.9)
        return {"input.txt": data.encode()}, {"train": data[:cut].encode(), "valid": data[cut:].encode()}
    shards = {f"news.en-0000{i}-of-00100": text(10 + i) for i in (2, 1)}
    heldout = {f"news.en.heldout-0000{i}-of-00050": text(20 + i) for i in range(3)}
    members = {f"{LM1B}/training-monolingual.tokenized.shuffled/{shard}": data for shard, data in shards.items()}
    members |= {f"{LM1B}/heldout-monolingual.tokenized.shuffled/{shard}": data for shard, data in heldout.items()}
    splits = {"train": b"".join(shards.values()), "valid": heldout["news.en.heldout-00001-of-00050"],
              "test": heldout["news.en.heldout-00000-of-00050"]}
    return {f"{LM1B}.tar.gz": tar_gz_bytes(members)}, splits


def register(monkeypatch, name, files):
    """The registry's entry for ``name`` with the sizes and checksums of ``files`` (its URLs unchanged)."""
    corpus = registry.CORPORA[name]
    downloads = tuple(dataclasses.replace(download, size=len(files[download.file]),
                                          sha256=hashlib.sha256(files[download.file]).hexdigest())
                      for download in corpus.downloads)
    monkeypatch.setitem(registry.CORPORA, name, dataclasses.replace(corpus, downloads=downloads))


@pytest.fixture
def serve(server, monkeypatch):
    """Serve the stand-in for a corpus and register its checksums; returns its expected split texts."""

    def serve(name):
        files, splits = fixture(name)
        server.files.update(files)
        register(monkeypatch, name, files)
        return splits

    return serve


def fetch(server, tmp_path, *args, env=None):
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    return runner.invoke(cli, ["fetch", *map(str, args), "--data-dir", str(tmp_path), "--url-base", server.url],
                         env=env, catch_exceptions=False)


def one_error(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:], result.stderr
    for fragment in fragments:
        assert fragment in lines[-1]
    assert "Traceback" not in result.stderr


def leftovers(directory):
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


@pytest.mark.parametrize("name", ["ptb", "wikitext-2", "shakespeare", "lm1b"])
def test_fetch_writes_the_splits_and_their_tokens(server, serve, tmp_path, name):
    splits = serve(name)
    result = fetch(server, tmp_path, name)
    assert result.exit_code == 0, result.output + result.stderr
    target = tmp_path / name
    assert sorted(path.name for path in target.iterdir()) == sorted([*(f"{s}.txt" for s in splits), "fetch.json",
                                                                     "tokens"])
    manifest = json.loads((target / "fetch.json").read_text())
    _, vocab = load_token_dir(target / "tokens" / "train")
    assert vocab.level == registry.CORPORA[name].level
    for split, data in splits.items():
        assert (target / f"{split}.txt").read_bytes() == data
        ids, split_vocab = load_token_dir(target / "tokens" / split)
        assert split_vocab.tokens == vocab.tokens
        assert manifest["splits"][split]["tokens"] == ids.size > 0
        assert manifest["splits"][split]["bytes"] == len(data)
    assert [source["url"] for source in manifest["sources"]] == [f"{server.url}/{file}" for file in server.files]


def test_a_cut_download_resumes_with_a_range_request(server, serve, tmp_path):
    splits = serve("ptb")
    server.cut_after = 1000
    first = fetch(server, tmp_path, "ptb")
    one_error(first, "cut after 1,000 of", "the same command resumes it")
    part = tmp_path / "ptb" / "downloaded" / "ptb.train.txt.part"
    assert part.stat().st_size == 1000
    assert sorted(path.name for path in (tmp_path / "ptb").iterdir()) == ["downloaded"]
    second = fetch(server, tmp_path, "ptb")
    assert second.exit_code == 0, second.stderr
    assert server.requests[:2] == [("ptb.train.txt", None), ("ptb.train.txt", "bytes=1000-")]
    assert (tmp_path / "ptb" / "train.txt").read_bytes() == splits["train"]
    assert not (tmp_path / "ptb" / "downloaded").exists()


def test_a_server_ignoring_the_range_restarts_the_download(server, serve, tmp_path):
    splits = serve("wikitext-2")
    server.honour_range, server.cut_after = False, 500
    one_error(fetch(server, tmp_path, "wikitext-2"), "cut after 500 of")
    result = fetch(server, tmp_path, "wikitext-2")
    assert result.exit_code == 0, result.stderr
    assert server.requests[1] == ("wikitext-2-v1.zip", "bytes=500-")
    assert (tmp_path / "wikitext-2" / "valid.txt").read_bytes() == splits["valid"]


def test_a_checksum_mismatch_is_an_error_and_leaves_nothing(server, serve, tmp_path):
    serve("shakespeare")
    data = server.files["input.txt"]
    server.files["input.txt"] = data[:-2] + b"?\n"
    one_error(fetch(server, tmp_path, "shakespeare"), "checksum mismatch", "(removed)")
    assert list(tmp_path.iterdir()) == []


def test_another_size_than_the_registry_is_an_error(server, tmp_path):
    server.files.update({f"ptb.{split}.txt": text(1) for split in ("train", "valid", "test")})
    served = len(server.files["ptb.train.txt"])
    one_error(fetch(server, tmp_path, "ptb"), f"served {served:,} bytes, expected 5,101,618", "not the registered")
    assert list(tmp_path.iterdir()) == []


def test_a_longer_file_than_the_registry_is_an_error(server, serve, tmp_path):
    serve("wikitext-2")
    size = len(server.files["wikitext-2-v1.zip"])
    server.files["wikitext-2-v1.zip"] += bytes(3 * (1 << 20))
    one_error(fetch(server, tmp_path, "wikitext-2"), f"bytes+, expected {size:,}: not the registered file (removed)")
    assert list(tmp_path.iterdir()) == []


def test_a_missing_file_on_the_server_is_an_http_error(server, serve, tmp_path):
    serve("ptb")
    del server.files["ptb.test.txt"]
    one_error(fetch(server, tmp_path, "ptb"), "HTTP 404")
    assert sorted(path.name for path in (tmp_path / "ptb" / "downloaded").iterdir()) == ["ptb.train.txt",
                                                                                        "ptb.valid.txt"]
    assert not (tmp_path / "ptb" / "train.txt").exists()


def test_an_archive_without_a_split_is_an_error_and_leaves_nothing(server, monkeypatch, tmp_path):
    files = {"wikitext-2-v1.zip": zip_bytes({"wikitext-2/wiki.train.tokens": text(0),
                                             "wikitext-2/wiki.valid.tokens": text(1)})}
    server.files.update(files)
    register(monkeypatch, "wikitext-2", files)
    one_error(fetch(server, tmp_path, "wikitext-2"), "no member 'wikitext-2/wiki.test.tokens' for the test split")
    assert sorted(path.name for path in (tmp_path / "wikitext-2").iterdir()) == ["downloaded"]


def test_a_complete_corpus_is_skipped_unless_forced(server, serve, monkeypatch, tmp_path):
    serve("ptb")
    assert fetch(server, tmp_path, "ptb").exit_code == 0
    requests = len(server.requests)
    again = fetch(server, tmp_path, "ptb", "--json")
    assert again.exit_code == 0
    record = json.loads(again.stdout)
    assert (record["type"], record["skipped"], record["splits"]["train"]["file"]) == ("fetch", True, "train.txt")
    assert len(server.requests) == requests
    server.files["ptb.valid.txt"] = text(7)
    register(monkeypatch, "ptb", server.files)
    forced = fetch(server, tmp_path, "ptb", "--force")
    assert forced.exit_code == 0, forced.stderr
    assert (tmp_path / "ptb" / "valid.txt").read_bytes() == text(7)
    assert leftovers(tmp_path / "ptb") == []


def test_ctrl_c_while_refetching_leaves_the_earlier_corpus(server, serve, monkeypatch, tmp_path):
    splits = serve("ptb")
    assert fetch(server, tmp_path, "ptb").exit_code == 0
    target = tmp_path / "ptb"
    before = {path: path.read_bytes() for path in target.rglob("*") if path.is_file()}
    server.files["ptb.train.txt"] = text(8)
    register(monkeypatch, "ptb", server.files)

    def interrupt(label, done, total):
        if label == "tokenizing valid.txt":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.fetch("ptb", tmp_path, url_base=server.url, force=True, progress=interrupt)
    assert {path: path.read_bytes() for path in target.rglob("*") if path.is_file() and "downloaded" not in
            path.parts} == before
    assert (target / "train.txt").read_bytes() == splits["train"]
    assert leftovers(target) == []


def test_files_it_did_not_write_are_refused_unless_forced(server, serve, tmp_path):
    splits = serve("ptb")
    mine = tmp_path / "ptb" / "train.txt"
    mine.parent.mkdir()
    mine.write_text("my own text\n")
    one_error(fetch(server, tmp_path, "ptb"), f"{mine} exists", "--force replaces it")
    assert server.requests == []
    assert mine.read_text() == "my own text\n"
    assert fetch(server, tmp_path, "ptb", "--force").exit_code == 0
    assert mine.read_bytes() == splits["train"]


def test_without_tokens_with_the_download_kept_and_the_mirror_from_the_environment(server, serve, tmp_path):
    splits = serve("shakespeare")
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    result = runner.invoke(cli, ["fetch", "shakespeare", "--data-dir", str(tmp_path), "--no-tokenize",
                                 "--keep-download"], env={registry.URL_BASE_ENV: server.url})
    assert result.exit_code == 0, result.stderr
    target = tmp_path / "shakespeare"
    assert sorted(path.name for path in target.iterdir()) == ["downloaded", "fetch.json", "train.txt", "valid.txt"]
    assert (target / "downloaded" / "input.txt").read_bytes() == server.files["input.txt"]
    assert (target / "valid.txt").read_bytes() == splits["valid"]
    tokenized = fetch(server, tmp_path, "shakespeare")  # the earlier fetch lacks tokens: not complete
    assert tokenized.exit_code == 0, tokenized.stderr
    assert server.requests == [("input.txt", None)]  # the kept download was verified and used again
    assert load_token_dir(target / "tokens" / "valid")[1].level == "char"


def test_an_unknown_name_is_a_usage_error_listing_the_corpora(tmp_path):
    runner = CliRunner(mix_stderr=False) if OLD_CLICK else CliRunner()
    result = runner.invoke(cli, ["fetch", "enwik8", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert all(name in result.stderr for name in registry.CORPORA)
    assert list(tmp_path.iterdir()) == []
