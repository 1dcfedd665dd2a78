"""Test setup. The CUDA tests run under Numba's CUDA simulator unless NUMBA_ENABLE_CUDASIM=0 is set
(on a machine with a GPU); this must happen before numba is first imported."""

import os
import signal

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import sys  # noqa: E402

if os.environ["NUMBA_ENABLE_CUDASIM"] == "1":
    # the simulator's barriers wait on Python's thread switch (5 ms by default)
    sys.setswitchinterval(2e-4)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REPO = Path(__file__).resolve().parents[1]


if os.environ.get("RNNLM_LAUNCH_LOG"):

    @pytest.fixture(autouse=True, scope="session")
    def record_launches():
        """Every CUDA kernel launch of the session, noted for the PTX compile check (tests/launch_log.py)."""
        from tests.launch_log import Recorder

        with pytest.MonkeyPatch.context() as monkeypatch:
            recorder = Recorder(monkeypatch)
            yield
            recorder.write(os.environ["RNNLM_LAUNCH_LOG"])


@pytest.fixture(params=["cpu", "cuda"])
def ops(request):
    """Each backend's kernel module; the CUDA one at toy sizes under the simulator in CI."""
    from rnnlm.backends import get_backend

    return get_backend(request.param)


def reference_perplexity(model, path):
    """exp(mean -log p) of the text read as one stream from the boundary token, in float64 numpy:
    inputs = [boundary] + ids[:-1], targets = ids, B = 1, zero initial state."""
    import math

    import numpy as np

    import rnnlm
    from rnnlm import reference

    if not isinstance(model, rnnlm.Model):
        model = rnnlm.load(model)
    vocab = model.vocab
    ids = []
    for line in Path(path).read_text(encoding="utf-8").removesuffix("\n").split("\n"):
        tokens = line.split() if vocab.level == "word" else line
        ids += [vocab.index.get(token, vocab.unk_id) for token in tokens] + [vocab.boundary_id]
    ids = np.array(ids)
    inputs = np.concatenate([[vocab.boundary_id], ids[:-1]])
    params = {name: array.astype(np.float64) for name, array in model.params.items()}
    keys = None
    if model.direct_order:  # the contexts start with the stream
        history = np.concatenate([np.full(max(model.direct_order - 2, 0), -1), inputs]).reshape(-1, 1)
        keys = reference.direct_keys(history, vocab.boundary_id, model.direct_order)
    nats, _ = reference.loss(params, inputs.reshape(-1, 1), ids.reshape(-1, 1), np.zeros((1, model.hidden)),
                             model.class_bounds, keys=keys, tree=model.hs_tree)
    return math.exp(nats / len(ids))


def demo_texts(folder, train_lines, valid_lines, train_name="train.txt"):
    """Write the first train_lines lines of data/demo/train.txt to folder/train_name and its last valid_lines to
    folder/valid.txt; returns the demo text's lines."""
    lines = (REPO / "data" / "demo" / "train.txt").read_text(encoding="utf-8").splitlines()
    (folder / train_name).write_text("\n".join(lines[:train_lines]) + "\n", encoding="utf-8")
    (folder / "valid.txt").write_text("\n".join(lines[-valid_lines:]) + "\n", encoding="utf-8")
    return lines


def train_whole_and_interrupted(corpus, folder, config):
    """Train config on corpus/train.txt (validated on corpus/valid.txt) to folder/whole.npz, then again to
    folder/cut.npz with a SIGTERM halfway through; returns the interrupted run's checkpoint."""
    import rnnlm

    def interrupt(done, total, stats):
        if done == total // 2:
            os.kill(os.getpid(), signal.SIGTERM)

    rnnlm.train(corpus / "train.txt", folder / "whole.npz", valid=corpus / "valid.txt", config=config)
    with pytest.raises(rnnlm.TrainingInterrupted):
        rnnlm.train(corpus / "train.txt", folder / "cut.npz", valid=corpus / "valid.txt", config=config,
                    on_window=interrupt)
    return folder / "cut.ckpt.npz"


def assert_cleared(ops, grads, window):
    """The sparse gradients left zero and without slots for the next window."""
    from rnnlm import step

    for name, (slot, claimed) in step.sparse_names(window).items():
        assert not ops.to_numpy(step.rows(name, grads[name])).any(), name
        assert (ops.to_numpy(slot) == -1).all() and ops.to_numpy(claimed)[0] == 0, name
