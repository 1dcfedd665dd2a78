"""Tests for rnnlm.store: token stores written from many inputs in bounded memory, read memory-mapped, and
training that cuts its windows out of the mapped ids."""

import bz2
import gzip
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

from rnnlm import store
from rnnlm.corpus import Windows, batchify, load_corpus, load_ids
from rnnlm.errors import RnnlmError
from rnnlm.store import TokenIds, token_counts
from rnnlm.tokenizer import VOCAB_FILE, Vocab, encode_file, load_token_dir, open_token_dir, tokenize_file, tokenize_text
from rnnlm.train import RunOptions, TrainConfig, train

WORDS = [f"w{k}" for k in range(40)] + ["<unk>", "<eos>", "Ünï", "ΣΑΣ"]


def zipf_text(seed, lines, crlf=False):
    """Lines of 0 to 12 words drawn with probability ∝ 1/rank, some with tabs and runs of spaces."""
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, len(WORDS) + 1)
    out = []
    for _ in range(lines):
        words = rng.choice(WORDS, size=int(rng.integers(0, 13)), p=p / p.sum())
        out.append(("\t " if rng.random() < 0.1 else " ").join(words) + ("\r\n" if crlf else "\n"))
    return "".join(out)


@pytest.fixture
def small_blocks(monkeypatch):
    """Tasks of a few hundred bytes read in blocks of 64 bytes, in a pool from 1 KB on."""
    monkeypatch.setattr(store, "RANGE_BYTES", 700)
    monkeypatch.setattr(store, "BLOCK_BYTES", 64)
    monkeypatch.setattr(store, "POOL_BYTES", 1000)


def write(path, text):
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


CASES = {
    "word": {}, "lowercase": {"lowercase": True}, "cut-offs": {"min_count": 3, "max_vocab": 20},
    "char": {"level": "char"}, "char lowercase": {"level": "char", "lowercase": True},
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("workers", [1, 2])
def test_store_holds_the_ids_of_the_single_pass_tokenizer(tmp_path, small_blocks, case, workers):
    texts = [zipf_text(1, 60), zipf_text(2, 40, crlf=True) + "last line without newline", "x" * 150 + " y\n\n"]
    paths = [write(tmp_path / f"{k}.txt", t) for k, t in enumerate(texts)]
    whole = write(tmp_path / "whole.txt", "".join(t if t.endswith("\n") else t + "\n" for t in texts))
    summary = tokenize_file(paths, tmp_path / "tok", workers=workers, shard_tokens=97, **CASES[case])
    expected, vocab, unknown = tokenize_text(whole, **CASES[case])
    ids, loaded = load_token_dir(tmp_path / "tok")
    assert loaded.tokens == vocab.tokens
    np.testing.assert_array_equal(ids, expected)
    assert ids.dtype == np.uint8
    assert summary == {"tokens": len(expected), "vocab_size": len(vocab), "unk": unknown,
                       "unk_share": unknown / len(expected)}
    manifest = json.loads((tmp_path / "tok" / store.MANIFEST).read_text())
    assert [s["tokens"] for s in manifest["shards"]] == [97] * (len(expected) // 97) + [len(expected) % 97]
    assert manifest["inputs"] == [{"name": str(p), "bytes": p.stat().st_size} for p in paths]
    assert manifest["level"] == CASES[case].get("level", "word") and manifest["tokens"] == len(expected)


def test_store_with_a_given_vocabulary_counts_unknown_words(tmp_path, small_blocks):
    text = write(tmp_path / "a.txt", zipf_text(3, 80))
    vocab = Vocab(["<unk>", "<eos>", "w0", "w1", "w2"], "word", False)
    summary = tokenize_file(text, tmp_path / "tok", vocab=vocab, workers=2)
    ids, loaded = load_token_dir(tmp_path / "tok")
    expected, unknown = encode_file(text, vocab)
    assert loaded.tokens == vocab.tokens and summary["unk"] == unknown > 0
    np.testing.assert_array_equal(ids, expected)
    assert json.loads((tmp_path / "tok" / store.MANIFEST).read_text())["vocab_given"]


def test_compressed_inputs_globs_and_standard_input(tmp_path):
    texts = [zipf_text(4, 30), zipf_text(5, 30), zipf_text(6, 30)]
    (tmp_path / "in").mkdir()
    write(tmp_path / "in" / "b.txt.gz", gzip.compress(texts[1].encode()))
    write(tmp_path / "in" / "a.txt", texts[0])
    write(tmp_path / "c.bz2", bz2.compress(texts[2].encode()))
    result = CliRunner().invoke(cli, ["tokenize", str(tmp_path / "in" / "*"), "-", "-o", str(tmp_path / "tok"),
                                      "--json"], input=texts[2], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected, vocab, _ = tokenize_text(write(tmp_path / "all.txt", "".join(texts[:2] + texts[2:])))
    ids, loaded = load_token_dir(tmp_path / "tok")
    np.testing.assert_array_equal(ids, expected)
    assert json.loads(result.output)["tokens"] == len(expected)
    names = [i["name"] for i in json.loads((tmp_path / "tok" / store.MANIFEST).read_text())["inputs"]]
    assert names == [str(tmp_path / "in" / "a.txt"), str(tmp_path / "in" / "b.txt.gz"), "standard input"]


@pytest.mark.parametrize("bad, message", [
    (b"fine\nstill fine\nbad \xff byte\n", r"not valid UTF-8 \(line 3, byte offset 20\)"),
    (b"fine\nfine\nfine\nfine\nNUL \x00 here\n", r"looks binary \(NUL byte at line 5, offset 24\)"),
])
def test_bad_text_is_named_by_line_and_offset_in_any_range(tmp_path, monkeypatch, bad, message):
    monkeypatch.setattr(store, "RANGE_BYTES", 7)
    monkeypatch.setattr(store, "BLOCK_BYTES", 4)
    with pytest.raises(RnnlmError, match=message):
        tokenize_file(write(tmp_path / "a.txt", bad), tmp_path / "tok", workers=1)
    assert not (tmp_path / "tok").exists()


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_bad_stores_are_one_error_line(tmp_path):
    text = write(tmp_path / "a.txt", zipf_text(7, 200))
    tok = tmp_path / "tok"
    tokenize_file(text, tok, shard_tokens=300)
    result = run_cli("tokenize", tmp_path / "nothing*.txt", "-o", tmp_path / "t2")
    assert result.exit_code == 1 and result.output.strip().endswith(f"no file matches {tmp_path}/nothing*.txt")
    other = tmp_path / "other"
    tokenize_file(write(tmp_path / "b.txt", "some other words\n"), other)
    shutil.copy(other / VOCAB_FILE, tok / VOCAB_FILE)
    with pytest.raises(RnnlmError, match="vocab.json is not the vocabulary .* was encoded with"):
        open_token_dir(tok)
    tokenize_file(text, tok, shard_tokens=300)
    with pytest.raises(RnnlmError, match="another vocabulary than the model's"):
        load_corpus(tok, vocab=Vocab(["<unk>", "<eos>", "w0"], "word", False))
    data = bytearray((tok / "tokens.2.npy").read_bytes())
    data[-1] ^= 1
    (tok / "tokens.2.npy").write_bytes(bytes(data))
    with pytest.raises(RnnlmError, match=r"shard tokens.2.npy of .* has a bad checksum"):
        load_token_dir(tok)
    (tok / "tokens.2.npy").unlink()
    result = run_cli("train", tok, "-o", tmp_path / "m.npz", "--hidden", 4, "--epochs", 1)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == f"Error: shard tokens.2.npy of {tok} is missing"


def test_old_single_file_token_directories_are_read(tmp_path):
    ids = np.array([0, 1, 2, 1], np.uint8)
    tok = tmp_path / "tok"
    tok.mkdir()
    Vocab(["<eos>", "<unk>", "a"], "word", False).save(tok / VOCAB_FILE)
    np.save(tok / "tokens.npy", ids)
    np.testing.assert_array_equal(load_token_dir(tok)[0], ids)
    np.testing.assert_array_equal(np.asarray(load_ids(tok)[0]), ids)


@pytest.mark.parametrize("streams", [None, [1, 2], [0]])
def test_windows_are_batchify_rows_across_shards(streams):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, 1003).astype(np.uint16)
    cut = np.cumsum(rng.integers(1, 200, 20))
    parts = [p for p in np.split(ids, cut[cut < len(ids)]) if len(p)]
    B, T = 3, 7
    classes = (np.arange(50) // 10).astype(np.int32)
    inputs, targets = batchify(ids, 9, B, T)
    windows = Windows(TokenIds(parts).view(0, len(ids)), 9, B, T, classes, streams)
    columns = slice(None) if streams is None else streams
    assert windows.n_windows == inputs.shape[0] // T
    for w in [*range(windows.n_windows), 5, 0]:
        x, y, c = windows.window(w)
        rows = slice(w * T, (w + 1) * T)
        np.testing.assert_array_equal(x, inputs[rows][:, columns])
        np.testing.assert_array_equal(y, targets[rows][:, columns])
        np.testing.assert_array_equal(c, classes[targets[rows][:, columns]])
        assert x.dtype == y.dtype == c.dtype == np.int32 and x.flags.c_contiguous
    np.testing.assert_array_equal(token_counts(TokenIds(parts), 50), np.bincount(ids, minlength=50))


@pytest.mark.parametrize("limit, read_ahead", [(("READ_IDS", 70), 70), (("READ_IDS_TOTAL", 4 * 60), 60)])
def test_windows_refill_their_buffers_across_shards_in_two_epochs(tmp_path, monkeypatch, limit, read_ahead):
    """Each stream reads ahead READ_IDS ids, fewer when the streams together would pass READ_IDS_TOTAL."""
    monkeypatch.setattr(f"rnnlm.corpus.{limit[0]}", limit[1])
    text = write(tmp_path / "a.txt", zipf_text(8, 300))
    tokenize_file(text, tmp_path / "tok", shard_tokens=333)
    stored, _ = open_token_dir(tmp_path / "tok")
    assert len(stored.parts) > 3 and stored.files[0] is not None
    inputs, targets = batchify(np.asarray(stored), 1, 4, 50)
    windows = Windows(stored, 1, 4, 50)
    assert windows.buffer.shape == (4, read_ahead)
    for epoch in range(2):
        for w in range(windows.n_windows):
            x, y = windows.window(w)
            np.testing.assert_array_equal(x, inputs[w * 50:(w + 1) * 50], err_msg=f"epoch {epoch}")
            np.testing.assert_array_equal(y, targets[w * 50:(w + 1) * 50], err_msg=f"epoch {epoch}")


@pytest.mark.parametrize("softmax", ["full", "class"])
def test_training_on_a_store_equals_training_on_its_text(tmp_path, softmax):
    text = write(tmp_path / "a.txt", zipf_text(9, 400))
    tokenize_file(text, tmp_path / "tok", shard_tokens=333)
    config = dict(hidden=8, bptt=5, batch=4, epochs=2, seed=1, optimizer="adam", softmax=softmax, dropout=0.1)
    for source, out in ((text, "a.npz"), (tmp_path / "tok", "b.npz")):
        train(source, tmp_path / out, config=TrainConfig(**config), options=RunOptions(threads=1))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(tokens=m["tokens"] + 1), "declares .* tokens, but its shards hold"),
    (lambda m: m["shards"][1].update(name="../tokens.npy"), "'name' = '../tokens.npy'"),
    (lambda m: m["shards"][0].update(sha256="x" * 64), "malformed sha256"),
    (lambda m: m.update(dtype="float32"), "'dtype' = 'float32'"),
    (lambda m: m.update(shards=[]), "lists no shards"),
    (lambda m: m.update(tokens=m["tokens"] - 198) or m["shards"][0].update(tokens=2), "manifest declares \\(2,\\)"),
])
def test_a_tampered_manifest_is_one_error_naming_it(tmp_path, change, message):
    tokenize_file(write(tmp_path / "a.txt", zipf_text(10, 100)), tmp_path / "tok", shard_tokens=200)
    manifest = json.loads((tmp_path / "tok" / store.MANIFEST).read_text())
    change(manifest)
    (tmp_path / "tok" / store.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(RnnlmError, match=message):
        open_token_dir(tmp_path / "tok")
