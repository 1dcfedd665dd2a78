"""The tanh RNN language model: its parameters, initialization and model file.

Names follow the lecture (shared/mission): V is the vocabulary size, m the state size.

    a_t = W_s s_{t-1} + W_x x_{t-1} + b_s        s_t = tanh(a_t)
    p_t = softmax(W_o s_t + b_o)                 L = sum_t -log p_t(x̂_t)

Parameters (float32 unless a caller asks for float64, as the gradient checks do):
    W_x (m, V)   W_s (m, m)   b_s (m,)   W_o (V, m)   b_o (V,)
"""

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.tokenizer import Vocab

FORMAT_VERSION = 1
PARAM_NAMES = ("W_x", "W_s", "b_s", "W_o", "b_o")


def param_shapes(vocab_size, hidden):
    """The shape of every parameter array for a vocabulary of V and a state of size m."""
    V, m = vocab_size, hidden
    return {"W_x": (m, V), "W_s": (m, m), "b_s": (m,), "W_o": (V, m), "b_o": (V,)}


def init_params(vocab_size, hidden, rng, dtype=np.float32):
    """The lecture's initialization: weights N(0, 1/d) with d the fan-in, biases zero.

    The fan-in of W_x is V (its input is a one-hot vector), that of W_s and W_o is m.
    """
    params = {}
    for name, shape in param_shapes(vocab_size, hidden).items():
        if name.startswith("b"):
            params[name] = np.zeros(shape, dtype)
        else:
            fan_in = shape[1]
            params[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(dtype)
    return params


@dataclass
class Model:
    """Parameters, the vocabulary that maps tokens to ids, and the settings it was trained with."""

    params: dict
    vocab: Vocab
    hparams: dict = field(default_factory=dict)

    @property
    def hidden(self):
        return self.params["W_s"].shape[0]

    @property
    def vocab_size(self):
        return len(self.vocab)

    @classmethod
    def create(cls, vocab, hidden, seed=0, hparams=None):
        """A freshly initialized float32 model."""
        if hidden < 1:
            raise RnnlmError(f"--hidden must be at least 1, got {hidden}")
        rng = np.random.default_rng(seed)
        return cls(init_params(len(vocab), hidden, rng), vocab, dict(hparams or {}))

    def meta(self):
        """The JSON-serializable description stored beside the arrays."""
        return {
            "format_version": FORMAT_VERSION,
            "level": self.vocab.level,
            "lowercase": self.vocab.lowercase,
            "vocab": self.vocab.tokens,
            "hidden": self.hidden,
            "hparams": self.hparams,
        }

    def save(self, path):
        """Write the model atomically: a temporary file in the same folder, fsync, then rename."""
        arrays = {name: np.ascontiguousarray(self.params[name], np.float32) for name in PARAM_NAMES}
        arrays["meta"] = np.array(json.dumps(self.meta(), ensure_ascii=False))
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path):
        """Read a model file; RnnlmError when it is missing, truncated or not a rnnlm model."""
        arrays = load_npz(path)
        if "meta" not in arrays:
            raise RnnlmError(f"{path} is not a rnnlm model (no 'meta' entry)")
        try:
            meta = json.loads(str(arrays["meta"]))
            vocab = Vocab(meta["vocab"], meta["level"], meta["lowercase"])
        except (ValueError, KeyError, TypeError) as exc:
            raise RnnlmError(f"{path} has a malformed 'meta' entry ({exc})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise RnnlmError(f"{path} has model format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        expected = param_shapes(len(vocab), meta.get("hidden", 0))
        params = {}
        for name, shape in expected.items():
            if name not in arrays or arrays[name].shape != shape:
                raise RnnlmError(f"{path} is not a valid rnnlm model ({name} missing or not of shape {shape})")
            params[name] = np.ascontiguousarray(arrays[name], np.float32)
        return cls(params, vocab, meta.get("hparams", {}))


def atomic_savez(path, arrays):
    """np.savez ``arrays`` to ``path`` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_npz(path):
    """All arrays of an .npz file as a dict, without pickles; RnnlmError for anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise RnnlmError(f"no such file: {path}")
    if path.is_dir():
        raise RnnlmError(f"{path} is a directory, expected a model file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise RnnlmError(f"{path} is not a readable .npz model file ({type(exc).__name__})") from None
