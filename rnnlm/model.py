"""The tanh RNN language model: its parameters, initialization and model file.

Names follow Mikolov's papers and thesis (README, References): V is the vocabulary size, m the state size.

    a_t = W_s s_{t-1} + W_x x_{t-1} + b_s        s_t = tanh(a_t)
    p_t = softmax(W_o s_t + b_o)                 L = sum_t -log p_t(x̂_t)

Parameters (float32 unless a caller asks for float64, as the gradient checks do):
    W_x (m, V)   W_s (m, m)   b_s (m,)   W_o (V, m)   b_o (V,)

With the class-based softmax (Mikolov's factorization) the words are binned into C classes of
consecutive ids, class c holding ids class_bounds[c] ≤ w < class_bounds[c + 1], and

    p_t(w) = softmax(W_c s_t + b_c)[class(w)] · softmax over the class's words of (W_o s_t + b_o)

with two more parameters W_c (C, m) and b_c (C,).

Stacked layers (``layers`` > 1): layer k ≥ 2 reads the output of layer k - 1 instead of the token,
a^k_t = W_s{k} s^k_{t-1} + W_in{k} s^{k-1}_t + b_s{k}, and the top layer feeds the output layer.
Tied weights: W_o is W_xᵀ, one shared array.
"""

import json
import math
import zipfile
from dataclasses import dataclass, field

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.paths import atomic_output
from rnnlm.tokenizer import Vocab, vocab_of
from rnnlm.untrusted import FLOATS, INTEGERS, Npz, check_fits, checked, finite_float32

FORMAT_VERSION = 1
MAX_HIDDEN = 16384
MAX_LAYERS = 64


def layer_names(k):
    """(input weights, recurrent weights, bias) of layer k (1-based): W_x, W_s, b_s for the first."""
    return ("W_x", "W_s", "b_s") if k == 1 else (f"W_in{k}", f"W_s{k}", f"b_s{k}")


def param_shapes(vocab_size, hidden, n_classes=None, layers=1):
    """The shape of every parameter array for a vocabulary of V, a state of size m, C classes, L layers."""
    V, m = vocab_size, hidden
    shapes = {"W_x": (m, V), "W_s": (m, m), "b_s": (m,)}
    for k in range(2, layers + 1):
        W_in, W_s, b_s = layer_names(k)
        shapes.update({W_in: (m, m), W_s: (m, m), b_s: (m,)})
    shapes.update(W_o=(V, m), b_o=(V,))
    if n_classes:
        shapes.update(W_c=(n_classes, m), b_c=(n_classes,))
    return shapes


def frequency_classes(counts, n_classes):
    """Class bounds (C + 1,) int32 binning ids 0..V-1, in id order, by cumulative √frequency.

    counts (V,): how often each id occurs in the training text. With ids sorted by frequency (as the
    tokenizer numbers them) the frequent words get small classes and the rare ones large, so that
    every class carries a similar share of √frequency mass (Mikolov's binning). Every class is
    non-empty; C is capped at V.
    """
    V = len(counts)
    n_classes = max(1, min(int(n_classes), V))
    mass = np.cumsum(np.sqrt(np.asarray(counts, np.float64) + 1.0))
    # the class of id w is floor(C · mass before w / total mass); bounds where it steps up
    cls = np.minimum((n_classes * (mass - mass[0]) / mass[-1]).astype(np.int64), n_classes - 1)
    bounds = np.searchsorted(cls, np.arange(n_classes), side="left")
    bounds = np.unique(np.concatenate([bounds, [V]]))
    return bounds.astype(np.int32)


def word_classes(class_bounds):
    """The class of every id (V,) int32, from class bounds (C + 1,)."""
    return np.repeat(np.arange(len(class_bounds) - 1, dtype=np.int32), np.diff(class_bounds))


INITS = ("fanin", "orthogonal", "identity", "zero")


def init_params(vocab_size, hidden, rng, dtype=np.float32, n_classes=None, init="fanin", layers=1, tied=False):
    """Initial parameters; biases are zero.

    fanin (Mikolov's): every weight N(0, 1/d) with d the fan-in: V for W_x (its input is one-hot),
    m for W_s, W_o and W_c. orthogonal: the same but W_s a random orthogonal matrix. identity: W_s = 0.9 I
    (scaled identity, as in IRNNs). zero: every weight zero, a bad start: all state
    units then get the same gradient forever, so the model stays a unigram model. Tied: W_x is W_oᵀ,
    a view of the one (V, m) array, initialized as W_o.
    """
    if init not in INITS:
        raise RnnlmError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    params = {}
    for name, shape in param_shapes(vocab_size, hidden, n_classes, layers).items():
        if name.startswith("b") or init == "zero":
            params[name] = np.zeros(shape, dtype)
        else:
            params[name] = _scaled_normal(rng, shape, dtype)
    for k in range(1, layers + 1):
        W_s = layer_names(k)[1]
        if init == "orthogonal":
            q, r = np.linalg.qr(rng.standard_normal((hidden, hidden)))
            params[W_s] = (q * np.sign(np.diag(r))).astype(dtype)
        elif init == "identity":
            params[W_s] = (0.9 * np.eye(hidden)).astype(dtype)
    if tied:
        params["W_x"] = params["W_o"].T
    return params


def _scaled_normal(rng, shape, dtype, block=1 << 20):
    """N(0, 1/shape[1]) draws of ``shape`` (2-D) in ``dtype``, made a block of about ``block`` values at a time:
    the same numbers as one float64 draw of the whole array, without its float64 temporaries (3.2 GB for
    one 793,470 × 256 table)."""
    out = np.empty(shape, dtype)
    rows = max(1, block // shape[1])
    for start in range(0, shape[0], rows):
        out[start:start + rows] = rng.standard_normal((min(rows, shape[0] - start), shape[1])) / np.sqrt(shape[1])
    return out


@dataclass
class Model:
    """Parameters, the vocabulary that maps tokens to ids, and the settings it was trained with."""

    params: dict
    vocab: Vocab
    hparams: dict = field(default_factory=dict)
    class_bounds: np.ndarray | None = None
    layers: int = 1
    tied: bool = False

    @property
    def hidden(self):
        return self.params["W_s"].shape[0]

    @property
    def structure(self):
        """What step.Window needs to know of the model besides its sizes."""
        return {"class_bounds": self.class_bounds, "layers": self.layers, "tied": self.tied}

    @property
    def vocab_size(self):
        return len(self.vocab)

    @property
    def softmax(self):
        return "full" if self.class_bounds is None else "class"

    @classmethod
    def create(cls, vocab, hidden, seed=0, hparams=None, class_bounds=None, init="fanin", layers=1, tied=False):
        """A freshly initialized float32 model (class softmax when class_bounds are given)."""
        if hidden < 1:
            raise RnnlmError(f"--hidden must be at least 1, got {hidden}")
        if layers < 1:
            raise RnnlmError(f"--layers must be at least 1, got {layers}")
        rng = np.random.default_rng(seed)
        n_classes = None if class_bounds is None else len(class_bounds) - 1
        params = init_params(len(vocab), hidden, rng, n_classes=n_classes, init=init, layers=layers, tied=tied)
        return cls(params, vocab, dict(hparams or {}), class_bounds, layers, tied)

    def meta(self):
        """The JSON-serializable description stored beside the arrays."""
        return {
            "format_version": FORMAT_VERSION,
            "level": self.vocab.level,
            "lowercase": self.vocab.lowercase,
            "vocab": self.vocab.tokens,
            "hidden": self.hidden,
            "layers": self.layers,
            "tied": self.tied,
            "softmax": self.softmax,
            "hparams": self.hparams,
        }

    def save(self, path):
        """Write the model atomically: a temporary file in the same folder, fsync, then rename."""
        arrays = {name: np.ascontiguousarray(array, np.float32) for name, array in self.params.items()}
        if self.class_bounds is not None:
            arrays["class_bounds"] = np.asarray(self.class_bounds, np.int32)
        arrays["meta"] = np.array(json.dumps(self.meta(), ensure_ascii=False))
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path):
        """Read a model file, trusting nothing in it; RnnlmError naming the file when it is missing, not a
        regular file, truncated, not a rnnlm model, or out of bounds.

        Only ``meta`` is read before its fields are checked (format_version 1; level, lowercase and a
        vocabulary as ``tokenizer.vocab_of``; hidden 1..MAX_HIDDEN; layers 1..MAX_LAYERS; tied a bool;
        softmax full or class; hparams an object); then the members must be exactly those fields imply,
        class_bounds must bin 0..V-1 into non-empty classes, and every weight is read at its expected
        shape, as float32, and must be finite.
        """
        with Npz(path, "model file") as npz:
            if "meta" not in npz.names:
                raise RnnlmError(f"{path} is not a rnnlm model (no 'meta' member)")
            meta = npz.read_json("meta")
            where = f"{path}: meta"
            if not isinstance(meta, dict):
                raise RnnlmError(f"{where} is not a JSON object")
            checked(meta, "format_version", where, (int,), choices=(FORMAT_VERSION,))
            vocab = vocab_of(meta, where)
            hidden = checked(meta, "hidden", where, (int,), low=1, high=MAX_HIDDEN)
            layers = checked(meta, "layers", where, (int,), default=1, low=1, high=MAX_LAYERS)
            tied = checked(meta, "tied", where, (bool,), default=False)
            softmax = checked(meta, "softmax", where, (str,), default="full", choices=("full", "class"))
            hparams = checked(meta, "hparams", where, (dict,), default={})
            shapes = param_shapes(len(vocab), hidden, None, layers)
            optional = () if softmax == "full" else ("class_bounds", "W_c", "b_c")
            npz.check_members(["meta", *shapes], optional)
            class_bounds = None
            if softmax == "class":
                class_bounds = read_class_bounds(npz, len(vocab))
                shapes = param_shapes(len(vocab), hidden, len(class_bounds) - 1, layers)
                npz.check_members(["meta", "class_bounds", *shapes])
            check_fits(4 * sum(math.prod(shape) for shape in shapes.values()), f"{path}'s weights")
            params = {name: finite_float32(npz.read_array(name, FLOATS, shape), f"{path}: member {name + '.npy'!r}")
                      for name, shape in shapes.items()}
        if tied:
            params["W_x"] = params["W_o"].T
        return cls(params, vocab, hparams, class_bounds, layers, tied)


def read_class_bounds(npz, vocab_size):
    """The class bounds (C + 1,) int32 of an .npz: 0 = b_0 < b_1 < ... < b_C = V."""
    bounds = npz.read_array("class_bounds", INTEGERS, max_length=vocab_size + 1)
    if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != vocab_size or np.any(bounds[1:] <= bounds[:-1])):
        raise RnnlmError(f"{npz.path} is not a valid rnnlm model (class_bounds do not bin 0..{vocab_size - 1} "
                         "into non-empty classes)")
    return bounds.astype(np.int32)


def write_npz(file, arrays):
    """An .npz of ``arrays`` (name -> array) into a binary file object, byte for byte the same for the
    same arrays: unlike np.savez, every member carries the same fixed timestamp."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def atomic_savez(path, arrays):
    """Write ``arrays`` as an .npz to ``path`` so that a crash leaves either the old file or the new one
    (``rnnlm.paths.atomic_output``: a temporary file beside it, fsynced, renamed; RnnlmError naming the
    file on a full disk)."""
    with atomic_output(path) as f:
        write_npz(f, arrays)
