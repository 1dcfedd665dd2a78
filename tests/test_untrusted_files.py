"""Every file rnnlm reads is untrusted (models, checkpoints, vocab.json, token directories): a hostile one is one
RnnlmError naming it (in the CLI one ``Error:`` line, exit 1, nothing touched) or a correct load, in bounded memory."""

import functools
import inspect
import io
import json
import math
import os
import subprocess
import sys
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rnnlm.cli import cli

import rnnlm
from rnnlm.checkpoint import read_checkpoint
from rnnlm.errors import RnnlmError
from rnnlm.model import MAX_ABS_WEIGHT, Model, param_shapes, write_npz
from rnnlm.tokenizer import Vocab, load_token_dir, load_vocab_source
from rnnlm.train import RunOptions, TrainConfig
from rnnlm.untrusted import MAX_JSON_DEPTH, parse_json

WORDS = ["the", "a", "cat", "dog", "bird", "sees", "likes", "runs", "sleeps", "big", "small", "and", ".", "?"]
DEEP = "[" * 100_000 + "]" * 100_000
MEMORY_BOUND = 16 << 20  # bytes a load of the tiny test files may allocate, whatever the mutation
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
PROFILE = {"hidden": 8, "layers": 2, "bptt": 5, "batch": 2, "epochs": 1, "optimizer": "adam", "softmax": "class"}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A text, its token directory, a model and its checkpoint (two layers, Adam, class softmax)."""
    d = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(0)
    lines = (" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(300))
    (d / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rnnlm.tokenize(d / "text.txt", d / "tok")
    rnnlm.train(d / "text.txt", d / "model.npz", config=TrainConfig(**PROFILE), options=RunOptions(threads=1))
    return d


def arrays_of(path):
    """The members of one of the fixture's own (trusted) files."""
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def split(path):
    """(the arrays but meta, the meta object) of one of the fixture's own files."""
    arrays = arrays_of(path)
    return arrays, json.loads(str(arrays.pop("meta")))


def write(path, arrays, meta=None):
    """An .npz of ``arrays`` with ``meta`` (an object, or JSON text) as its meta member."""
    if meta is not None:
        arrays = {**arrays, "meta": np.array(meta if isinstance(meta, str) else json.dumps(meta))}
    with open(path, "wb") as f:
        write_npz(f, arrays)
    return path


def with_field(meta, dotted, value):
    """A copy of ``meta`` with the field at ``dotted`` ("state.rng.state") set to ``value`` (deleted: ...)."""
    meta = json.loads(json.dumps(meta))
    *parents, last = dotted.split(".")
    record = functools.reduce(dict.get, parents, meta)
    if value is ...:
        del record[last]
    else:
        record[last] = value
    return meta


def invoke(*args):
    runner = CliRunner(mix_stderr=False) if "mix_stderr" in inspect.signature(CliRunner).parameters else CliRunner()
    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if not p.is_fifo()}


def assert_cli_error(culprit, *args):
    """The command exits 1 with one ``Error:`` line naming ``culprit``, and changes no file beside it."""
    before = snapshot(culprit.parent)
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout in ("", "\n")
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(culprit) in lines[0], result.stderr
    assert snapshot(culprit.parent) == before


# --- hostile model files ---------------------------------------------------------------------------------------

def meta_case(dotted, value):
    return lambda arrays, meta: (arrays, with_field(meta, dotted, value))


def array_case(name, make):
    return lambda arrays, meta: ({**arrays, name: make(arrays.get(name))}, meta)


def without(name):
    return lambda arrays, meta: ({k: v for k, v in arrays.items() if k != name}, meta)


MODEL_CASES = {
    "layers 'x'": meta_case("layers", "x"), "layers null": meta_case("layers", None),
    "layers 0": meta_case("layers", 0), "layers -3": meta_case("layers", -3), "layers 1e6": meta_case("layers", 10**6),
    "hidden 10**9": meta_case("hidden", 10**9), "hidden true": meta_case("hidden", True),
    "hidden missing": meta_case("hidden", ...), "format_version 2": meta_case("format_version", 2),
    "level bytes": meta_case("level", "bytes"), "lowercase 'no'": meta_case("lowercase", "no"),
    "softmax fancy": meta_case("softmax", "fancy"), "tied 1": meta_case("tied", 1),
    "vocab a string": meta_case("vocab", "the cat"), "vocab with an empty token": meta_case("vocab", ["<unk>", ""]),
    "vocab duplicates": lambda a, m: (a, with_field(m, "vocab", m["vocab"][:-1] + m["vocab"][:1])),
    "vocab lone surrogate": lambda a, m: (a, with_field(m, "vocab", m["vocab"][:-1] + ["\ud800"])),
    "meta a list": lambda a, m: (a, [m]),
    "W_s +1e30 and NaN": array_case("W_s", lambda w: np.where(np.arange(w.size).reshape(w.shape) % 2, 1e30, np.nan)),
    "W_o infinite": array_case("W_o", lambda w: np.full_like(w, -np.inf)),
    "W_o 3e38 (finite; overflows the logits)": array_case("W_o", lambda w: np.full_like(w, 3e38)),
    "b_o -2e6": array_case("b_o", lambda b: np.full_like(b, -2e6)),
    "W_s float64 beyond float32": array_case("W_s", lambda w: np.full(w.shape, 1e300)),
    "W_s of strings": array_case("W_s", lambda w: w.astype(str)),
    "W_s of ints": array_case("W_s", lambda w: w.astype(np.int32)),
    "W_s transposed shape": array_case("W_s", lambda w: np.zeros((w.shape[0] + 1, w.shape[1]), np.float32)),
    "W_s 3-D": array_case("W_s", lambda w: w[None]),
    "W_o missing": without("W_o"), "class_bounds missing": without("class_bounds"),
    "class_bounds decreasing": array_case("class_bounds", lambda b: b[::-1].copy()),
    "class_bounds as floats": array_case("class_bounds", lambda b: b.astype(np.float32)),
    "an extra member": array_case("extra", lambda _: np.zeros(3)),
    "meta of bytes": lambda a, m: ({**a, "meta": np.array(json.dumps(m).encode())}, None),
    "meta 1-D": lambda a, m: ({**a, "meta": np.array([json.dumps(m)])}, None),
    "meta missing": lambda a, m: (a, None),
}


def rewritten(source, path, mutate):
    """``source`` with its arrays and meta changed by ``mutate``, written to ``path``."""
    return write(path, *mutate(*split(source)))


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_a_hostile_model_is_one_error_naming_it(case, valid, tmp_path):
    path = rewritten(valid / "model.npz", tmp_path / "bad.npz", MODEL_CASES[case])
    with pytest.raises(RnnlmError, match="bad.npz"):
        Model.load(path)
    assert_cli_error(path, "perplexity", path, valid / "text.txt")
    assert_cli_error(path, "sample", path, "--length", "3")


def test_deeply_nested_json_in_meta_is_refused_before_parsing(valid, tmp_path):
    arrays, meta = split(valid / "model.npz")
    path = write(tmp_path / "deep.npz", arrays, json.dumps(meta)[:-1] + f', "deep": {DEEP}}}')
    with pytest.raises(RnnlmError, match=f"more than the {MAX_JSON_DEPTH} allowed"):
        Model.load(path)
    assert_cli_error(path, "perplexity", path, valid / "text.txt")


def raw_files(valid, tmp_path):
    """Files that are not rnnlm models at all, by name."""
    model = (valid / "model.npz").read_bytes()
    files = {"truncated.npz": model[: len(model) * 2 // 3], "empty.npz": b"", "garbage.npz": b"PK\x03\x04" + b"x" * 99}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with zipfile.ZipFile(tmp_path / "text.zip", "w") as archive:
        archive.writestr("readme.txt", "not an array")
    os.mkfifo(tmp_path / "fifo.npz")
    for name, descr, shape in (("huge.npz", "<f4", (10**6, 10**6)), ("object.npz", "|O", (8, 8))):
        header = npy(header={"descr": descr, "fortran_order": False, "shape": shape})
        with zipfile.ZipFile(valid / "model.npz") as source, zipfile.ZipFile(tmp_path / name, "w") as archive:
            for info in source.infolist():  # W_s a bare header: 10^12 elements declared, or pickled objects
                archive.writestr(info.filename, header if info.filename == "W_s.npy" else source.read(info))
    return ["truncated.npz", "empty.npz", "garbage.npz", "array.npy", "text.zip", "fifo.npz", "huge.npz", "object.npz"]



def test_files_that_are_no_model_are_one_error_naming_them(valid, tmp_path):
    for name in raw_files(valid, tmp_path):
        with pytest.raises(RnnlmError, match=name.replace(".", r"\.")):
            Model.load(tmp_path / name)
        assert_cli_error(tmp_path / name, "perplexity", tmp_path / name, valid / "text.txt")


def test_weights_at_the_bound_give_a_finite_perplexity_and_beyond_it_are_refused(valid, tmp_path):
    arrays = arrays_of(valid / "model.npz")
    signs = np.where(np.arange(arrays["W_o"].size).reshape(arrays["W_o"].shape) % 2, 1.0, -1.0)
    arrays.update(W_o=(signs * MAX_ABS_WEIGHT).astype(np.float32), b_o=np.full_like(arrays["b_o"], -MAX_ABS_WEIGHT))
    result = invoke("perplexity", write(tmp_path / "big.npz", arrays), valid / "text.txt", "--json")
    assert result.exit_code == 0 and math.isfinite(json.loads(result.stdout)["perplexity"]), result.output
    arrays["W_o"][0, 0] = np.nextafter(np.float32(MAX_ABS_WEIGHT), np.float32(np.inf))
    with pytest.raises(RnnlmError, match="beyond"):
        Model.load(write(tmp_path / "beyond.npz", arrays))


def test_a_float64_model_loads_as_float32(valid, tmp_path):
    arrays = {k: v.astype("f8") if v.dtype == "f4" else v for k, v in arrays_of(valid / "model.npz").items()}
    model, original = Model.load(write(tmp_path / "f64.npz", arrays)), Model.load(valid / "model.npz")
    assert all(model.params[k].dtype == np.float32 and np.array_equal(model.params[k], v)
               for k, v in original.params.items())


def zip_bomb(valid, path, size=1 << 30):
    """The model plus a member ``bomb.npy`` of ``size`` zero bytes deflated to about a thousandth."""
    path.write_bytes((valid / "model.npz").read_bytes())
    piece = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(16 << 20)
    block = piece.compress(chunk) + piece.flush(zlib.Z_FULL_FLUSH)  # byte-aligned, dictionary reset: repeatable
    crc = functools.reduce(lambda crc, _: zlib.crc32(chunk, crc), range(size // len(chunk)), 0)
    data = block * (size // len(chunk)) + b"\x03\x00"  # and an empty final block
    with zipfile.ZipFile(path, "a") as archive:  # the member written raw: compressing 1 GiB takes seconds
        info = zipfile.ZipInfo("bomb.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type, info.file_size, info.compress_size, info.CRC = zipfile.ZIP_DEFLATED, size, len(data), crc
        info.header_offset = archive.fp.tell()
        archive.fp.write(info.FileHeader(zip64=True) + data)
        archive.start_dir = archive.fp.tell()
        archive.filelist.append(info)
        archive.NameToInfo[info.filename] = info
        archive._didModify = True
    return path


PEAK_RSS = """
import resource, sys, rnnlm
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    rnnlm.load(sys.argv[1])
except rnnlm.RnnlmError as error:
    print(error)
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_a_zip_bomb_is_refused_in_bounded_memory(valid, tmp_path):
    path = zip_bomb(valid, tmp_path / "bomb.npz")
    assert path.stat().st_size < 2 << 20
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, path], capture_output=True, text=True, check=True)
    message, rss = result.stdout.splitlines()
    before, after = map(int, rss.split())  # KiB
    print(f"zip bomb of {path.stat().st_size:,} bytes: peak RSS {before / 1024:.0f} MiB after import, "
          f"{after / 1024:.0f} MiB after the load")
    assert "unexpected member 'bomb.npy'" in message and str(path) in message
    assert after - before < 32 << 10


def test_a_float64_member_is_converted_as_it_is_read_not_held_whole(valid, tmp_path):
    """A deflated float64 table of zeros (a direct-feature W_d of 32M entries in under a megabyte) is read
    into its float32 array a piece at a time: never a float64 array of its size beside it."""
    size = 32 << 20
    members = arrays_of(valid / "model.npz")
    meta = json.loads(str(members["meta"]))
    members.update(W_d=np.zeros(size, np.float64), meta=np.array(json.dumps({**meta, "direct_order": 3,
                                                                             "direct_size": size})))
    path = tmp_path / "float64.npz"
    np.savez_compressed(path, **members)
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, path], capture_output=True, text=True, check=True)
    before, after = map(int, result.stdout.split())  # KiB
    assert after - before < (4 * size + (32 << 20)) >> 10  # the float32 table and a piece, not 12 bytes an entry


# --- hostile checkpoints -------------------------------------------------------------------------------------

CHECKPOINT_CASES = {
    "params/W_s of a wrong shape": array_case("params/W_s", lambda w: np.zeros((3, 3), np.float32)),
    "best/W_o of a wrong shape": array_case("best/W_o", lambda w: w[:-1]),
    "carried_state/1 of a wrong shape": array_case("carried_state/1", lambda s: s[:1]),
    "carried_state/2 extra": array_case("carried_state/2", lambda _: np.zeros((2, 8), np.float32)),
    "optimizer moment missing": without("optimizer/moment1/W_s"), "class_bounds missing": without("class_bounds"),
    "epoch_start params missing": without("epoch_start/params/W_x"), "kind other": meta_case("kind", "model"),
    "a NaN moment": array_case("optimizer/moment2/b_o", lambda m: np.full_like(m, np.nan)),
    "rng state negative": meta_case("state.rng.state.state", -1), "rng inc '1'": meta_case("state.rng.state.inc", "1"),
    "rng of another generator": meta_case("state.rng.bit_generator", "MT19937"),
    "rng missing": meta_case("state.rng", ...), "rng a list": meta_case("state.rng", [1, 2]),
    "has_uint32 2": meta_case("state.rng.has_uint32", 2), "an unknown state field": meta_case("state.surprise", 1),
    "window -1": meta_case("state.window", -1), "epoch 0": meta_case("state.epoch", 0),
    "epoch '2'": meta_case("state.epoch", "2"), "epoch beyond the run": meta_case("state.epoch", 10**9),
    "lr -1": meta_case("state.lr", -1.0), "best 0": meta_case("state.best", 0.0),
    "records of lists": meta_case("state.records", [[1]]), "divergences 99": meta_case("state.divergences", 99),
    "optimizer t missing": meta_case("state.optimizer", {}), "vocab a number": meta_case("vocab", 12),
    "config hidden 'x'": meta_case("config.hidden", "x"), "config layers 10**6": meta_case("config.layers", 10**6),
    "config lr 0": meta_case("config.lr", 0.0), "config bptt 10**9": meta_case("config.bptt", 10**9),
    "config seed missing": meta_case("config.seed", ...), "config unknown field": meta_case("config.fancy", 1),
    "config optimizer 'rmsprop'": meta_case("config.optimizer", "rmsprop"),
    "options threads 0": meta_case("options.threads", 0), "options a list": meta_case("options", []),
    "sources text null": meta_case("sources.text", None), "sources text with NUL": meta_case("sources.text", "a\0b"),
    "vocab of another level": meta_case("config.level", "char"),
}


def test_the_valid_checkpoint_reads_back_whole(valid):
    arrays, meta = read_checkpoint(valid / "model.ckpt.npz")
    stored = arrays_of(valid / "model.ckpt.npz")
    assert set(arrays) == set(stored) - {"meta"} and meta == json.loads(str(stored["meta"]))
    assert all(np.array_equal(arrays[k], stored[k]) for k in arrays)


@pytest.mark.parametrize("case", list(CHECKPOINT_CASES))
def test_a_hostile_checkpoint_is_one_error_naming_it(case, valid, tmp_path):
    path = rewritten(valid / "model.ckpt.npz", tmp_path / "bad.ckpt.npz", CHECKPOINT_CASES[case])
    with pytest.raises(RnnlmError, match="bad.ckpt.npz"):
        read_checkpoint(path)
    assert_cli_error(path, "train", "--resume", path)


# --- hostile vocabularies and token directories ----------------------------------------------------------------

VOCAB_CASES = {
    "deeply nested": DEEP, "not UTF-8": b"\xff\xfe{}", "a number": "12", "NaN": '{"format_version": NaN}',
    "format_version true": {"format_version": True}, "format_version 2": {"format_version": 2},
    "tokens a string": {"tokens": "the"}, "tokens nested": {"tokens": [["the"]]}, "no <unk>": {"tokens": ["\n"]},
    "level bytes": {"level": "bytes"}, "lowercase null": {"lowercase": None}, "keys missing": {"tokens": ...},
    "a huge integer": '{"format_version": 1' + "0" * 5000 + "}",
}


def token_dir_with(valid, folder, name, content):
    """A copy of the fixture's token directory with file ``name`` replaced by ``content`` (None: a FIFO)."""
    folder.mkdir(exist_ok=True)
    for other in {"vocab.json", "tokens.npy"} - {name}:
        (folder / other).write_bytes((valid / "tok" / other).read_bytes())
    if content is None:
        os.mkfifo(folder / name)
    else:
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder / name


def bad_vocab(valid, folder, case):
    content = VOCAB_CASES[case]
    if isinstance(content, dict):
        good = json.loads((valid / "tok" / "vocab.json").read_text(encoding="utf-8"))
        content = json.dumps({k: v for k, v in {**good, **content}.items() if v is not ...})
    return token_dir_with(valid, folder, "vocab.json", content)


@pytest.mark.parametrize("case", list(VOCAB_CASES))
def test_a_hostile_vocab_json_is_one_error_naming_it(case, valid, tmp_path):
    path = bad_vocab(valid, tmp_path / "tok", case)
    for load in (Vocab.load, load_vocab_source, lambda p: load_token_dir(p.parent)):
        with pytest.raises(RnnlmError, match="vocab.json"):
            load(path)
    assert_cli_error(path, "perplexity", valid / "model.npz", path.parent)
    assert_cli_error(path, "tokenize", valid / "text.txt", "-o", tmp_path / "out", "--vocab", path)


def npy(array=None, header=None, cut=0):
    """The bytes of a .npy file of ``array`` (or a bare ``header``), ``cut`` bytes shorter (negative: longer)."""
    f = io.BytesIO()
    if header is None:
        np.save(f, array)
    else:
        np.lib.format.write_array_header_1_0(f, header)
    data = f.getvalue()
    return data[: len(data) - cut] if cut > 0 else data + bytes(-cut)


TOKEN_CASES = {
    "signed ids": lambda ids: npy(ids.astype(np.int64)), "float ids": lambda ids: npy(ids.astype(np.float32)),
    "2-D ids": lambda ids: npy(ids.reshape(1, -1)), "ids of strings": lambda ids: npy(ids.astype(str)),
    "an id out of range": lambda ids: npy(np.append(ids, 10**6).astype(np.uint32)), "no ids": lambda ids: npy(ids[:0]),
    "10**12 ids declared": lambda ids: npy(header={"descr": "<u2", "fortran_order": False, "shape": (10**12,)}),
    "truncated data": lambda ids: npy(ids, cut=3), "data past the array": lambda ids: npy(ids, cut=-5),
    "not a .npy": lambda ids: b"hello", "a FIFO": lambda ids: None,
}


@pytest.mark.parametrize("case", list(TOKEN_CASES))
def test_a_hostile_token_file_is_one_error_naming_it(case, valid, tmp_path):
    content = TOKEN_CASES[case](np.load(valid / "tok" / "tokens.npy"))
    path = token_dir_with(valid, tmp_path / "tok", "tokens.npy", content)
    with pytest.raises(RnnlmError, match="tokens.npy"):
        load_token_dir(path.parent)
    assert_cli_error(path, "perplexity", valid / "model.npz", path.parent)


def test_json_depth_and_size_are_bounded_before_parsing():
    assert parse_json('{"a": "[[[[[[ not brackets"}', "x", max_depth=1) == {"a": "[[[[[[ not brackets"}
    with pytest.raises(RnnlmError, match="nested 3 deep"):
        parse_json("[[[]]]", "x", max_depth=2)
    with pytest.raises(RnnlmError, match="more than the 4 allowed"):
        parse_json('"abcd"', "x", max_chars=4)
    with pytest.raises(RnnlmError, match="not valid JSON"):
        parse_json("[1e999999, Infinity]", "x")


# --- property-based: mutated files load correctly or fail with RnnlmError, in bounded memory ---------------------

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=6)


def leaves(record, prefix=""):
    """The dotted paths of every field of a JSON object, nested ones included."""
    for key, value in record.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from leaves(value, prefix + key + ".")


@st.composite
def mutated(draw, arrays, meta):
    """arrays and meta with one change: a member dropped, added, reshaped, retyped or refilled, or a meta field."""
    arrays, name = dict(arrays), draw(st.sampled_from(sorted(arrays)))
    kind = draw(st.sampled_from(["drop", "add", "reshape", "retype", "fill", "field", "delete field"]))
    if kind == "drop":
        del arrays[name]
    elif kind == "add":
        arrays[draw(st.text("abW_/1", min_size=1, max_size=6))] = np.zeros(draw(st.integers(0, 5)), np.float32)
    elif kind == "reshape":
        arrays[name] = np.zeros(draw(st.lists(st.integers(0, 9), max_size=3)), arrays[name].dtype)
    elif kind == "retype":
        with np.errstate(all="ignore"):
            arrays[name] = arrays[name].astype(draw(st.sampled_from(["f2", "f8", ">f4", "i1", "u8", "U2", "S3", "?"])))
    elif kind == "fill":
        arrays[name] = np.full(arrays[name].shape, draw(st.sampled_from([np.nan, np.inf, -1e38, 0, 2**31])))
    else:
        meta = with_field(meta, draw(st.sampled_from(sorted(leaves(meta)))), ... if kind == "delete field"
                          else draw(JSON))
    return arrays, meta


def bounded(load, path):
    """load(path): its result, or None after an RnnlmError; never more than MEMORY_BOUND allocated."""
    tracemalloc.start()
    try:
        return load(path)
    except RnnlmError as error:
        assert str(path) in str(error)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BOUND


def corrupted(data, draw):
    """The bytes of a file truncated, or with a few bytes overwritten."""
    if draw(st.booleans()):
        return data[: draw(st.integers(0, len(data) - 1))]
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


def check_model(model):
    if model is not None:
        shapes = param_shapes(model.vocab_size, model.hidden, None if model.class_bounds is None else
                              len(model.class_bounds) - 1, model.layers)
        assert {k: v.shape for k, v in model.params.items()} == shapes
        assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in model.params.values())


def write_mutated(source, path, draw):
    """A corrupted or structurally mutated copy of the .npz ``source`` at ``path``; returns its arrays."""
    arrays, meta = split(source)
    if draw(st.booleans()):
        path.write_bytes(corrupted(source.read_bytes(), draw))
    else:
        write(path, *draw(mutated(arrays, meta)))
    return arrays


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_a_mutated_model_loads_correctly_or_fails_cleanly(valid, tmp_path, data):
    write_mutated(valid / "model.npz", tmp_path / "mutated.npz", data.draw)
    check_model(bounded(Model.load, tmp_path / "mutated.npz"))


@pytest.mark.slow
@SETTINGS
@given(data=st.data())
def test_a_mutated_checkpoint_reads_correctly_or_fails_cleanly(valid, tmp_path, data):
    arrays = write_mutated(valid / "model.ckpt.npz", tmp_path / "mutated.ckpt.npz", data.draw)
    result = bounded(read_checkpoint, tmp_path / "mutated.ckpt.npz")
    if result is not None:
        read, meta = result
        assert set(read) <= set(arrays) and all(np.isfinite(v).all() for v in read.values())
        assert meta["kind"] == "rnnlm-checkpoint"


@SETTINGS
@given(data=st.data())
def test_a_mutated_vocab_json_loads_correctly_or_fails_cleanly(valid, tmp_path, data):
    good = (valid / "tok" / "vocab.json").read_bytes()
    path = tmp_path / "vocab.json"
    if data.draw(st.booleans()):
        path.write_bytes(corrupted(good, data.draw))
    else:
        record = json.loads(good)
        path.write_text(json.dumps(with_field(record, data.draw(st.sampled_from(sorted(record))), data.draw(JSON))))
    vocab = bounded(Vocab.load, path)
    assert vocab is None or len(set(vocab.tokens)) == len(vocab) >= 2


@SETTINGS
@given(data=st.data())
def test_a_mutated_token_file_loads_correctly_or_fails_cleanly(valid, tmp_path, data):
    if data.draw(st.booleans()):
        content = corrupted((valid / "tok" / "tokens.npy").read_bytes(), data.draw)
    else:
        dtype = data.draw(st.sampled_from(["u1", "u2", ">u4", "u8", "i4", "f4", "U1", "?"]))
        shape = data.draw(st.sampled_from([(-1,), (1, -1), (-1, 1)]))
        ids = np.load(valid / "tok" / "tokens.npy").astype(dtype).reshape(shape)
        content = npy(ids, cut=data.draw(st.sampled_from([0, 0, 2, -2])))
    result = bounded(load_token_dir, token_dir_with(valid, tmp_path / "tok", "tokens.npy", content).parent)
    if result is not None:
        ids, vocab = result
        assert ids.ndim == 1 and ids.dtype.kind == "u" and ids.size > 0 and ids.max() < len(vocab)
