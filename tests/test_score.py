"""Scoring: the per-row kernels, batched independent and stream scoring, the Decoder, and ``rnnlm score``."""

import functools
import gzip
import importlib
import json
import math
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
from click.testing import CliRunner
from rnnlm.cli import cli

import rnnlm
from rnnlm import reference
from rnnlm.model import Model, word_classes
from rnnlm.tokenizer import Vocab

from .conftest import REPO

scoring = importlib.import_module("rnnlm.score")  # rnnlm.score is the function

WORDS = ["<eos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "far"]
BOUNDS = np.array([0, 3, 7, 11], np.int32)
SENTENCES = ["the cat sat", "", "<s> a dog sat on the mat </s>", "zebra cat", "the </s> cat ran",
             "a dog ran far far far on the mat the cat sat on a mat", "dog"]
PLAIN = [text for text in SENTENCES if "<s>" not in text and "</s>" not in text]  # as perplexity reads them
STRUCTURES = {
    "full": dict(class_bounds=None),
    "class": dict(class_bounds=BOUNDS),
    "stacked-tied": dict(class_bounds=None, layers=2, tied=True),
}


def make_model(structure="full", hidden=6, seed=1):
    model = Model.create(Vocab(list(WORDS), "word", False), hidden, seed=seed, **STRUCTURES[structure])
    rng = np.random.default_rng(seed)
    for array in model.params.values():  # larger weights: the probabilities differ from token to token
        array += (0.5 * rng.standard_normal(array.shape)).astype(array.dtype)
    return model


def reference_score(model, text):
    """ln p of the sentence's tokens, read alone from the boundary token, in float64 numpy."""
    ids = np.array(scoring.read_sentence(model.vocab, text).ids)
    params = {name: array.astype(np.float64) for name, array in model.params.items()}
    if model.tied:
        params["W_x"] = params["W_o"].T
    inputs = np.concatenate([[model.vocab.boundary_id], ids[:-1]]).reshape(-1, 1)
    S, _ = reference.forward(params, inputs, np.zeros((model.layers, 1, model.hidden)))
    log_p = reference.log_probs(params, S[-1][1:, 0], model.class_bounds)
    return log_p[np.arange(len(ids)), ids]


@pytest.fixture(params=list(STRUCTURES))
def structure(request):
    return request.param


def test_per_row_kernels_equal_the_float64_reference(ops):
    rng = np.random.default_rng(3)
    N, m, V = 7, 5, 11
    s = rng.standard_normal((N, m)).astype(np.float32)
    W_o, b_o = rng.standard_normal((V, m)).astype(np.float32), rng.standard_normal(V).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    z = s.astype(np.float64) @ W_o.T.astype(np.float64) + b_o
    out = ops.zeros(N, np.float64)
    ops.softmax_log_probs(ops.asarray(s @ W_o.T), ops.asarray(b_o), ops.asarray(targets), out)
    expected = reference.log_softmax(z)[np.arange(N), targets]
    np.testing.assert_allclose(ops.to_numpy(out), expected, rtol=1e-5)
    assert float(ops.softmax_xent(ops.asarray(s @ W_o.T), ops.asarray(b_o), ops.asarray(targets))) == \
        pytest.approx(-expected.sum(), rel=1e-5)
    classes = word_classes(BOUNDS)[targets]
    args = (ops.asarray(s), ops.asarray(W_o), ops.asarray(b_o), ops.asarray(targets), ops.asarray(classes),
            ops.asarray(BOUNDS))
    ops.class_log_probs(*args, out)
    in_class = [reference.log_softmax(z[r : r + 1, BOUNDS[c] : BOUNDS[c + 1]])[0, targets[r] - BOUNDS[c]]
                for r, c in enumerate(classes)]
    np.testing.assert_allclose(ops.to_numpy(out), in_class, rtol=1e-5)
    assert float(ops.class_xent(*args)) == pytest.approx(-sum(in_class), rel=1e-5)


def test_class_log_probs_the_same_by_gemms_in_small_blocks_of_logits(monkeypatch):
    """The CPU op by GEMMs with at most 5 logits at a time (a class's rows split between blocks) as by rows."""
    from rnnlm.backends import cpu
    from rnnlm.backends.cpu import class_softmax

    rng = np.random.default_rng(5)
    N, m = 9, 4
    s, W_o, b_o = (rng.standard_normal(shape).astype(np.float32) for shape in ((N, m), (11, m), (11,)))
    targets = rng.integers(0, 11, N).astype(np.int32)
    args = (s, W_o, b_o, targets, word_classes(BOUNDS)[targets].astype(np.int32), BOUNDS)
    by_rows, blocks = np.empty(N), np.empty(N)
    cpu.class_log_probs(*args, by_rows)
    monkeypatch.setattr(class_softmax, "GEMM_ROWS", 0)
    monkeypatch.setattr(class_softmax, "CLASS_LOGITS", 5)
    cpu.class_log_probs(*args, blocks)
    np.testing.assert_allclose(blocks, by_rows, rtol=1e-6)


def packed_reference(W_s, b_s, U, index, carried, offsets):
    """forward_packed in float64 numpy, row by row."""
    S = np.zeros((offsets[-1], W_s.shape[0]))
    for t in range(len(offsets) - 1):
        for j in range(offsets[t + 1] - offsets[t]):
            r = offsets[t] + j
            s = carried[j] if t == 0 else S[offsets[t - 1] + j]
            S[r] = np.tanh(W_s @ s + U[r if index is None else index[r]] + b_s)
    return S


@pytest.mark.parametrize("bands", [1, 2])
def test_forward_packed_equals_the_reference(ops, bands):
    """Streams of 4, 3, 3 and 1 steps as rows: from carried states with the input term by token, and from
    zero states with the input term row by row; on the CPU in one band and in two (threads)."""
    rng = np.random.default_rng(4)
    offsets, m, V = np.array([0, 4, 7, 10, 11]), 6, 9
    W_s, b_s = (0.5 * rng.standard_normal((m, m))).astype(np.float32), rng.standard_normal(m).astype(np.float32)
    U, carried = rng.standard_normal((V, m)).astype(np.float32), rng.standard_normal((4, m)).astype(np.float32)
    tokens = rng.integers(0, V, 11).astype(np.int32)
    if ops.name == "cpu":
        numba = pytest.importorskip("numba")
        threads = numba.get_num_threads()
        numba.set_num_threads(min(bands, numba.config.NUMBA_NUM_THREADS))
    try:
        S = ops.zeros((11, m))
        ops.forward_packed(*map(ops.asarray, (W_s, b_s, U, tokens, carried)), S, offsets)
        np.testing.assert_allclose(ops.to_numpy(S), packed_reference(W_s, b_s, U, tokens, carried, offsets),
                                   rtol=1e-5, atol=1e-6)
        rows = U[tokens]
        ops.forward_packed(ops.asarray(W_s), ops.asarray(b_s), ops.asarray(rows), None, None, S, offsets)
        np.testing.assert_allclose(ops.to_numpy(S), packed_reference(W_s, b_s, rows, None, 0 * carried, offsets),
                                   rtol=1e-5, atol=1e-6)
    finally:
        if ops.name == "cpu":
            numba.set_num_threads(threads)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.slow
def test_batched_scores_equal_each_sentence_alone_and_the_reference(structure, device, monkeypatch):
    """Sentences of different lengths in batches of 3, packed in windows of 4 rows at most (so that the longer
    sentences cross windows with their states carried): the same numbers as each alone and as float64 numpy."""
    monkeypatch.setattr(scoring, "STATE_BUDGET", 4 * 6 * STRUCTURES[structure].get("layers", 1))
    model = make_model(structure)
    totals, per_token = rnnlm.score(model, SENTENCES, per_token=True, device=device, batch=3)
    for text, total, tokens in zip(SENTENCES, totals, per_token, strict=True):
        expected = reference_score(model, text)
        np.testing.assert_allclose(tokens, expected, rtol=1e-5, atol=1e-5)
        assert total == pytest.approx(tokens.sum(), rel=1e-12)  # per-word log-probabilities sum to the sentence's
    for k in (1, 2, 5):  # empty, with markers, the longest: alone (B = 1) as in the batch
        alone = rnnlm.score(model, [SENTENCES[k]], device=device, batch=1)[0]
        assert alone == pytest.approx(totals[k], rel=1e-5, abs=1e-5)


def test_sentence_markers_and_empty_lines():
    vocab = make_model().vocab
    marked = scoring.read_sentence(vocab, "<s> the zebra </s> cat </s>")
    assert marked.tokens == ["the", "zebra", "<eos>", "cat", "<eos>"]
    assert marked.ids.tolist() == [2, 1, 0, 3, 0]
    assert marked.oov == [1]
    assert scoring.read_sentence(vocab, "").ids.tolist() == [0]
    assert scoring.read_sentence(vocab, "<s> </s>").ids.tolist() == [0]


def test_a_chunk_of_lines_reads_as_each_line_alone():
    vocab = make_model().vocab
    chunk = scoring.read_sentences(vocab, [(7, "zebra"), (8, "the zebra <unk> cat yak"), (9, ""), (10, "cat")])
    assert [s.line for s in chunk] == [7, 8, 9, 10]
    assert [s.ids.tolist() for s in chunk] == [[1, 0], [2, 1, 1, 3, 1, 0], [0], [3, 0]]
    assert [s.oov for s in chunk] == [[0], [1, 4], [], []]  # positions in each line, the literal <unk> not one


def test_stream_scoring_equals_perplexity(tmp_path, monkeypatch):
    """Stream scoring in chunks, windows of 4 steps, equals perplexity over the file (state carried)."""
    monkeypatch.setattr(scoring, "MAX_SPAN", 4)
    model = make_model("class")
    path = tmp_path / "text.txt"
    path.write_text("\n".join(PLAIN) + "\n", encoding="utf-8")
    scorer = scoring.Scorer(model, batch=1)
    summary = scoring.Summary()
    sentences = [scoring.read_sentence(model.vocab, text, k) for k, text in enumerate(PLAIN)]
    for part in (sentences[:2], sentences[2:3], sentences[3:]):
        scorer.score_stream(part)
        for sentence in part:
            summary.add(sentence)
    assert summary.perplexity() == pytest.approx(rnnlm.perplexity(model, path)["perplexity"], rel=1e-5)
    assert summary.oov == 1 and summary.perplexity(include_oov=False) != summary.perplexity()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_decoder_steps_give_the_sentence_scores(device):
    """Beam-search style: hypotheses advanced token by token, reordered between steps, sum to score()."""
    model = make_model("class")
    texts = ["the cat sat on the mat", "a dog ran far"]
    ids = [scoring.read_sentence(model.vocab, text).ids for text in texts]
    decoder = rnnlm.Decoder(model, device=device)
    state = decoder.initial(2)
    totals = np.zeros(2)
    for t in range(max(map(len, ids))):
        log_p = decoder.log_probs(state)
        np.testing.assert_allclose(np.exp(log_p).sum(axis=1), 1.0, rtol=1e-9)
        tokens = np.array([seq[min(t, len(seq) - 1)] for seq in ids])
        totals += [log_p[b, tokens[b]] if t < len(ids[b]) else 0.0 for b in range(2)]
        swapped = decoder.advance(state[:, ::-1], tokens[::-1])  # reordered hypotheses, reordered back
        state = swapped[:, ::-1]
    np.testing.assert_allclose(totals, rnnlm.score(model, texts), rtol=1e-5)
    with pytest.raises(rnnlm.RnnlmError, match="token ids"):
        decoder.advance(state, [0, len(WORDS)])


def test_score_refuses_a_single_string():
    with pytest.raises(rnnlm.RnnlmError, match="list of sentences"):
        rnnlm.score(make_model(), "the cat")


# ---------------------------------------------------------------------------------------- the command


def invoke(*args, input=None):
    return CliRunner().invoke(cli, [str(a) for a in args], input=input, catch_exceptions=False)


def ok(*args, input=None):
    result = invoke(*args, input=input)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    make_model("class").save(d / "model.npz")
    text = "\n".join(SENTENCES) + "\n"
    (d / "text.txt").write_text(text, encoding="utf-8")
    (d / "text.txt.gz").write_bytes(gzip.compress(text.encode()))
    (d / "plain.txt").write_text("\n".join(PLAIN) + "\n", encoding="utf-8")
    return d


def records(stdout, kind):
    parsed = [json.loads(line) for line in stdout.splitlines()]
    return [r for r in parsed if r.pop("type") == kind]


def test_command_output_gz_and_stdin_equal_the_plain_file(files):
    plain = ok("score", files / "model.npz", files / "text.txt", "--per-word")
    lines = plain.stdout.splitlines()
    assert len(lines) == len(SENTENCES)
    expected = rnnlm.score(rnnlm.load(files / "model.npz"), SENTENCES) / math.log(10)  # log10 by default
    for line, total in zip(lines, expected, strict=True):
        columns = line.split("\t")
        assert float(columns[0]) == pytest.approx(total, abs=1e-4)
        words = [float(item.rsplit("=", 1)[1]) for item in columns[3].split(" ")]
        assert sum(words) == pytest.approx(float(columns[0]), abs=1e-3)
        assert int(columns[1]) == len(words)
    assert lines[3].split("\t")[2] == "1"  # zebra
    assert ok("score", files / "model.npz", files / "text.txt.gz", "--per-word").stdout == plain.stdout
    assert ok("score", files / "model.npz", "--per-word", input=(files / "text.txt").read_bytes()).stdout == \
        plain.stdout
    assert "perplexity" in plain.stderr and "excluding" in plain.stderr


def test_command_json_and_units(files):
    out = ok("score", files / "model.npz", files / "text.txt", "--json", "--per-word").stdout
    sentences, (summary,) = records(out, "sentence"), records(out, "summary")
    assert [r["line"] for r in sentences] == list(range(len(SENTENCES)))
    assert set(sentences[0]) == {"line", "ln_prob", "tokens", "oov", "words", "ln_probs"}
    assert sentences[1]["words"] == ["<eos>"] and sentences[1]["tokens"] == 1
    total = sum(r["ln_prob"] for r in sentences)
    assert summary["perplexity"] == pytest.approx(math.exp(-total / summary["tokens"]), rel=1e-9)
    assert summary["oov"] == 1 and summary["perplexity_excluding_oov"] != summary["perplexity"]
    bits = ok("score", files / "model.npz", files / "text.txt", "--units", "bits").stdout.splitlines()
    assert float(bits[0].split("\t")[0]) == pytest.approx(sentences[0]["ln_prob"] / math.log(2), abs=1e-4)


def test_command_stream_equals_perplexity(files):
    out = ok("score", files / "model.npz", files / "plain.txt", "--stream", "--json").stdout
    expected = json.loads(ok("perplexity", files / "model.npz", files / "plain.txt", "--json").stdout)
    assert records(out, "summary")[0]["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


NBEST = {
    "mikolov": ["1 the cat sat", "1 a cat sat", "2 dog ran", "1 the mat", "2 a dog ran far"],
    "kaldi": ["utt-a-1 the cat sat", "utt-a-2 a cat sat", "utt-b-1 dog ran", "utt-a-3 the mat", "utt-b-2 a dog"],
    "moses": ["0 ||| the cat sat ||| tm= -1 -2 ||| -3.5", "0 ||| a cat sat ||| tm= -1 -1 ||| -2",
              "1 ||| dog ran ||| tm= 0 ||| -1 ||| 0-0", "0 ||| the mat ||| tm= -4 ||| -4"],
}


@pytest.mark.parametrize("fmt", list(NBEST))
def test_nbest_formats_round_trip_with_the_lm_score(files, fmt):
    from rnnlm import nbest

    lines = NBEST[fmt]
    out = ok("score", files / "model.npz", "--nbest", fmt, "--units", "ln", input="\n".join(lines) + "\n").stdout
    written = out.splitlines()
    assert len(written) == len(lines)
    model = rnnlm.load(files / "model.npz")
    for k, (before, after) in enumerate(zip(lines, written, strict=True)):
        original = nbest.read(before, fmt, k)
        again = nbest.read(after, fmt, k, scored=fmt != "moses")
        assert (again.id, again.key, again.text) == (original.id, original.key, original.text)
        lm = nbest.moses_feature(again) if fmt == "moses" else again.score
        assert lm == pytest.approx(rnnlm.score(model, [original.text])[0], abs=1e-4)
        if fmt == "moses":
            assert again.score == original.score and again.fields[1:] == original.fields[1:]


def test_best_picks_the_highest_combined_score(files):
    """Moses totals + WEIGHT × LM by hand; ids out of order keep the order they first appear in."""
    model = rnnlm.load(files / "model.npz")
    lines = NBEST["moses"]
    lm = rnnlm.score(model, ["the cat sat", "a cat sat", "dog ran", "the mat"])
    existing = np.array([-3.5, -2, -1, -4])
    for weight in (0.0, 1.0, 30.0):
        out = ok("score", files / "model.npz", "--nbest", "moses", "--best", weight, "--units", "ln",
                 input="\n".join(lines) + "\n").stdout.splitlines()
        totals = existing + weight * lm
        best_0 = [0, 1, 3][int(np.argmax(totals[[0, 1, 3]]))]
        assert [line.split(" ||| ")[1] for line in out] == [lines[best_0].split(" ||| ")[1], "dog ran"]
    mikolov = ok("score", files / "model.npz", "--nbest", "mikolov", "--best", "1",
                 input="\n".join(NBEST["mikolov"]) + "\n").stdout.splitlines()
    lm = rnnlm.score(model, [line.split(" ", 1)[1] for line in NBEST["mikolov"]])
    assert [line.split(" ", 2)[2] for line in mikolov] == [
        ["the cat sat", "a cat sat", "the mat"][int(np.argmax(lm[[0, 1, 3]]))],
        ["dog ran", "a dog ran far"][int(np.argmax(lm[[2, 4]]))]]


@pytest.mark.parametrize("args, stdin, message", [
    (["--nbest", "kaldi"], "utt1 the cat\n", "line 1: 'utt1' is not a Kaldi"),
    (["--nbest", "mikolov"], "1 the cat\n\n", "line 2: an n-best line needs an id"),
    (["--nbest", "moses"], "0 ||| the cat\n", "line 1: not a Moses"),
    (["--nbest", "moses"], "0 ||| the cat ||| f= 1 ||| high\n", "is not a number"),
    ([], b"the cat\nthe \xff dog\n", "not valid UTF-8 (line 2"),
    ([], "\n".join(["xx yy zz qq"] * 10) + "\n", "none of the first 20 tokens"),
], ids=["kaldi-key", "no-id", "moses-fields", "moses-score", "utf8", "wrong-level"])
def test_bad_input_is_one_error_line(files, args, stdin, message):
    result = invoke("score", files / "model.npz", *args, input=stdin)
    assert result.exit_code == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_truncated_gz_and_usage_errors(files, tmp_path):
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes((files / "text.txt.gz").read_bytes()[:-12])
    result = invoke("score", files / "model.npz", truncated)
    assert result.exit_code == 1 and "corrupt or truncated gzip" in result.stderr
    assert invoke("score", files / "model.npz", "--best", "1").exit_code == 2
    assert invoke("score", files / "model.npz", "--nbest", "moses", "--best", "nan").exit_code == 2
    assert invoke("score", files / "model.npz", "--nbest", "moses", "--best", "-1").exit_code == 2
    assert invoke("score", files / "model.npz", "--stream", "--nbest", "moses").exit_code == 2


def feed(pipe, stop):
    """Write lines into ``pipe`` until ``stop`` is set or the reader goes away."""
    try:
        while not stop.is_set():
            pipe.write(b"the cat sat on the mat\n" * 1000)
    except (OSError, ValueError):  # the reader went away, or communicate() closed the pipe
        pass


@pytest.mark.slow
def test_ctrl_c_in_a_long_stream_exits_130_with_whole_lines(files):
    """An endless standard input: scores arrive while it is open (flushed as they go), then SIGINT stops
    the command with exit code 130, every printed line whole."""
    # a launcher that ignores SIGINT (a background job of a script) passes that on: the command must see it
    default_sigint = functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    proc = subprocess.Popen([sys.executable, "-m", "rnnlm", "score", str(files / "model.npz"), "--threads", "1"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, bufsize=0,
                            preexec_fn=default_sigint)
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    stop = threading.Event()
    writer = threading.Thread(target=feed, args=(proc.stdin, stop))
    writer.start()
    try:
        first = proc.stdout.readline()  # arrives although standard input stays open
        output = {}
        readers = [threading.Thread(target=lambda name=name: output.update({name: getattr(proc, name).read()}))
                   for name in ("stdout", "stderr")]
        for reader in readers:
            reader.start()
        for _ in range(12):  # standard input stays open until the command has stopped; a second Ctrl-C
            proc.send_signal(signal.SIGINT)  # if the first was missed (seen rarely, under load: issue 13's note)
            try:
                proc.wait(timeout=5)
                break
            except subprocess.TimeoutExpired:
                continue
        for reader in readers:
            reader.join()
        stdout, stderr = output["stdout"], output["stderr"]
    finally:
        stop.set()
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        writer.join()
    assert proc.returncode == 130, stderr
    assert b"Traceback" not in stderr and b"Fatal" not in stderr
    for line in (first + stdout).decode().splitlines():
        total, tokens, oov = line.split("\t")
        assert float(total) < 0 and tokens == "7" and oov == "0"
