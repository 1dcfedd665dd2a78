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

With the hierarchical softmax (``rnnlm.huffman``: a Huffman tree over the training counts, Morin & Bengio's
factorization as word2vec and faster-rnnlm build it) W_o (V - 1, m) and b_o (V - 1,) hold the tree's internal
nodes, and log p_t(w) = Σ_{nodes on w's path} log σ(±(W_o[node] s_t + b_o[node])), the sign saying which child
the path takes.

Direct features (Mikolov's RNNME, ``direct_order`` N > 0): hashed n-gram features of the tokens before
position t connect straight to the output layer through one table of weights W_d (D,),

    p_t = softmax(W_o s_t + b_o + d_t)       d_t[w] = Σ_{n<N} W_d[(key_n(x_{t-1} .. x_{t-n}) + w) mod D]

key_n the hash of the n-token context (``rnnlm.backends.DIRECT_BASE``; n = 0 is the empty context, a
unigram feature); a context is cut at the start of the text and does not reach back past the boundary token
(it may end with it). With the class softmax the table is split: the class logits get
Σ_n W_d[(key_n + c) mod D_c] from the first D_c = D // 2 entries, the words' logits within their class
Σ_n W_d[D_c + (key_n + w) mod (D - D_c)] from the rest (``direct_regions``).

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
from rnnlm.huffman import huffman_tree
from rnnlm.paths import atomic_output
from rnnlm.tokenizer import Vocab, vocab_of
from rnnlm.untrusted import FLOATS, INTEGERS, Npz, check_fits, checked, finite_float32

FORMAT_VERSION = 1
MAX_HIDDEN = 16384
MAX_LAYERS = 64
MAX_DIRECT_ORDER = 8
MAX_DIRECT_SIZE = 2**31 - 1
# a model's weights are at most this in magnitude: then, for every size allowed, each pre-activation and logit
# (at most MAX_HIDDEN weights times a state in [-1, 1], plus a bias and MAX_DIRECT_ORDER table entries) stays
# far inside float32, so that no file can make the scores overflow into NaN
MAX_ABS_WEIGHT = 1e6
DEFAULT_DIRECT_ORDER = 3


def layer_names(k):
    """(input weights, recurrent weights, bias) of layer k (1-based): W_x, W_s, b_s for the first."""
    return ("W_x", "W_s", "b_s") if k == 1 else (f"W_in{k}", f"W_s{k}", f"b_s{k}")


def direct_regions(size, class_softmax):
    """(class region or None, word region) of a direct-feature table of ``size`` entries, each (offset,
    entries): the whole table for the words of a full softmax; the first half for the classes and the rest for
    the words of a class softmax."""
    if not class_softmax:
        return None, (0, size)
    return (0, size // 2), (size // 2, size - size // 2)


def check_direct(size, order, class_softmax):
    """RnnlmError unless ``size`` (table entries, 0: no direct features) and ``order`` are in range."""
    if size == 0:
        return
    least = 2 if class_softmax else 1
    if not least <= size <= MAX_DIRECT_SIZE:
        raise RnnlmError(f"--direct must be 0 or from {least} to {MAX_DIRECT_SIZE:,} table entries, got {size:,}")
    if not 1 <= order <= MAX_DIRECT_ORDER:
        raise RnnlmError(f"--direct-order must be from 1 to {MAX_DIRECT_ORDER}, got {order}")


def param_shapes(vocab_size, hidden, n_classes=None, layers=1, direct=0, hs=False):
    """The shape of every parameter array for a vocabulary of V, a state of size m, C classes, L layers and
    a direct-feature table of ``direct`` entries (0: none); ``hs``: the hierarchical softmax's V - 1 nodes
    as W_o's and b_o's rows."""
    V, m = vocab_size, hidden
    shapes = {"W_x": (m, V), "W_s": (m, m), "b_s": (m,)}
    for k in range(2, layers + 1):
        W_in, W_s, b_s = layer_names(k)
        shapes.update({W_in: (m, m), W_s: (m, m), b_s: (m,)})
    n_out = V - 1 if hs else V
    shapes.update(W_o=(n_out, m), b_o=(n_out,))
    if n_classes:
        shapes.update(W_c=(n_classes, m), b_c=(n_classes,))
    if direct:
        shapes["W_d"] = (direct,)
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


def init_params(vocab_size, hidden, rng, dtype=np.float32, n_classes=None, init="fanin", layers=1, tied=False,
                direct=0, hs=False):
    """Initial parameters; biases and the direct-feature table W_d (``direct`` entries) are zero.

    fanin (Mikolov's): every weight N(0, 1/d) with d the fan-in: V for W_x (its input is one-hot),
    m for W_s, W_o and W_c. orthogonal: the same but W_s a random orthogonal matrix. identity: W_s = 0.9 I
    (scaled identity, as in IRNNs). zero: every weight zero, a bad start: all state
    units then get the same gradient forever, so the model stays a unigram model. Tied: W_x is W_oᵀ,
    a view of the one (V, m) array, initialized as W_o.
    """
    if init not in INITS:
        raise RnnlmError(f"--init must be one of {', '.join(INITS)}, got {init!r}")
    params = {}
    for name, shape in param_shapes(vocab_size, hidden, n_classes, layers, direct, hs).items():
        if name.startswith("b") or name == "W_d" or init == "zero":
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
    direct_order: int = 0
    hs_tree: object = None  # the hierarchical softmax's rnnlm.huffman.HuffmanTree, None for another softmax

    @property
    def hidden(self):
        return self.params["W_s"].shape[0]

    @property
    def direct_size(self):
        """Entries of the direct-feature table W_d, 0 without direct features."""
        return self.params["W_d"].shape[0] if "W_d" in self.params else 0

    @property
    def structure(self):
        """What step.Window needs to know of the model besides its sizes."""
        return {"class_bounds": self.class_bounds, "layers": self.layers, "tied": self.tied,
                "direct_order": self.direct_order, "boundary_id": self.vocab.boundary_id, "hs_tree": self.hs_tree}

    @property
    def vocab_size(self):
        return len(self.vocab)

    @property
    def softmax(self):
        if self.hs_tree is not None:
            return "hs"
        return "full" if self.class_bounds is None else "class"

    @classmethod
    def create(cls, vocab, hidden, seed=0, hparams=None, class_bounds=None, init="fanin", layers=1, tied=False,
               direct=0, direct_order=0, hs_counts=None):
        """A freshly initialized float32 model (class softmax when class_bounds are given, hierarchical softmax
        over the Huffman tree of hs_counts (V,) when they are; direct features of order ``direct_order`` in a
        table of ``direct`` entries when both are positive)."""
        if hidden < 1:
            raise RnnlmError(f"--hidden must be at least 1, got {hidden}")
        if layers < 1:
            raise RnnlmError(f"--layers must be at least 1, got {layers}")
        rng = np.random.default_rng(seed)
        n_classes = None if class_bounds is None else len(class_bounds) - 1
        softmax = "hs" if hs_counts is not None else "full" if n_classes is None else "class"
        check_output_layer(softmax, tied, direct, direct_order)
        direct_order = direct_order if direct else 0
        tree = None if hs_counts is None else huffman_tree(hs_counts, "the training text's word counts")
        params = init_params(len(vocab), hidden, rng, n_classes=n_classes, init=init, layers=layers, tied=tied,
                             direct=direct if direct_order else 0, hs=tree is not None)
        return cls(params, vocab, dict(hparams or {}), class_bounds, layers, tied, direct_order, tree)

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
            **({"direct_order": self.direct_order, "direct_size": self.direct_size} if self.direct_order else {}),
            "hparams": self.hparams,
        }

    def structure_arrays(self):
        """The arrays a model file and a checkpoint store besides the weights: the class bounds (C + 1,) int32
        of a class softmax, the word counts (V,) int64 a hierarchical softmax's tree is built from."""
        if self.hs_tree is not None:
            return {"hs_counts": self.hs_tree.counts}
        return {} if self.class_bounds is None else {"class_bounds": np.asarray(self.class_bounds, np.int32)}

    def save(self, path):
        """Write the model atomically: a temporary file in the same folder, fsync, then rename. A float32 array in
        C or Fortran order is written as it is, a piece at a time (no copy of a transposed W_x); a
        ``rnnlm.stored.StoredArray`` copies itself."""
        arrays = {name: array if hasattr(array, "write_npy") or _plain_float32(array)
                  else np.ascontiguousarray(array, np.float32) for name, array in self.params.items()}
        arrays.update(self.structure_arrays())
        arrays["meta"] = np.array(json.dumps(self.meta(), ensure_ascii=False))
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path):
        """Read a model file, trusting nothing in it; RnnlmError naming the file when it is missing, not a
        regular file, truncated, not a rnnlm model, or out of bounds.

        Only ``meta`` is read before its fields are checked (format_version 1; level, lowercase and a
        vocabulary as ``tokenizer.vocab_of``; hidden 1..MAX_HIDDEN; layers 1..MAX_LAYERS; tied a bool;
        softmax full, class or hs (untied, without direct features); hparams an object; direct_order
        0..MAX_DIRECT_ORDER, absent for 0, and with it direct_size, the table's entries, 1 (2 with classes) ..
        MAX_DIRECT_SIZE); then the members must be exactly those fields imply, class_bounds must bin 0..V-1 into
        non-empty classes, hs_counts must be V counts that ``huffman.huffman_tree`` accepts, and every weight is
        read at its expected shape, as float32, and must be finite.
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
            softmax = checked(meta, "softmax", where, (str,), default="full", choices=SOFTMAXES)
            hparams = checked(meta, "hparams", where, (dict,), default={})
            direct_order = checked(meta, "direct_order", where, (int,), default=0, low=0, high=MAX_DIRECT_ORDER)
            direct = 0
            if direct_order:
                direct = checked(meta, "direct_size", where, (int,), low=2 if softmax == "class" else 1,
                                 high=MAX_DIRECT_SIZE)
            shapes = param_shapes(len(vocab), hidden, None, layers, direct, softmax == "hs")
            optional = {"full": (), "class": ("class_bounds", "W_c", "b_c"), "hs": ("hs_counts",)}[softmax]
            npz.check_members(["meta", *shapes], optional)
            class_bounds = tree = None
            if softmax == "hs":
                check_output_layer(softmax, tied, direct, direct_order, f"{path} is not a valid rnnlm model: ")
                tree = read_hs_tree(npz, len(vocab))
                npz.check_members(["meta", "hs_counts", *shapes])
            if softmax == "class":
                class_bounds = read_class_bounds(npz, len(vocab))
                shapes = param_shapes(len(vocab), hidden, len(class_bounds) - 1, layers, direct)
                npz.check_members(["meta", "class_bounds", *shapes])
            check_fits(4 * sum(math.prod(shape) for shape in shapes.values()), f"{path}'s weights")
            params = {name: finite_float32(npz.read_array(name, FLOATS, shape, into=np.float32),
                                            f"{path}: member {name + '.npy'!r}", MAX_ABS_WEIGHT)
                      for name, shape in shapes.items()}
        if tied:
            params["W_x"] = params["W_o"].T
        return cls(params, vocab, hparams, class_bounds, layers, tied, direct_order, tree)


SOFTMAXES = ("full", "class", "hs")


def check_output_layer(softmax, tied, direct, direct_order, prefix=""):
    """RnnlmError unless the output layer's settings go together: the direct features' as ``check_direct``,
    and a hierarchical softmax with neither tied weights (its W_o rows are tree nodes, not words) nor direct
    features (they score words, which the tree never lists); ``prefix`` starts the message."""
    check_direct(direct, direct_order, softmax == "class")
    if softmax != "hs":
        return
    if tied:
        raise RnnlmError(f"{prefix}the hierarchical softmax (--softmax hs) cannot be tied: its W_o rows are tree "
                         "nodes, not words")
    if direct:
        raise RnnlmError(f"{prefix}the hierarchical softmax (--softmax hs) does not take direct features (--direct)")


def read_hs_tree(npz, vocab_size):
    """The HuffmanTree rebuilt from an .npz's hs_counts (V,) integers."""
    counts = npz.read_array("hs_counts", INTEGERS, (vocab_size,))
    return huffman_tree(counts, f"{npz.path} is not a valid rnnlm model: member 'hs_counts.npy'")


def read_class_bounds(npz, vocab_size):
    """The class bounds (C + 1,) int32 of an .npz: 0 = b_0 < b_1 < ... < b_C = V."""
    bounds = npz.read_array("class_bounds", INTEGERS, max_length=vocab_size + 1)
    if (len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != vocab_size or np.any(bounds[1:] <= bounds[:-1])):
        raise RnnlmError(f"{npz.path} is not a valid rnnlm model (class_bounds do not bin 0..{vocab_size - 1} "
                         "into non-empty classes)")
    return bounds.astype(np.int32)


def _plain_float32(array):
    return isinstance(array, np.ndarray) and array.dtype == np.float32 and (array.flags.c_contiguous
                                                                           or array.flags.f_contiguous)


def write_npz(file, arrays):
    """An .npz of ``arrays`` (name -> array) into a binary file object, byte for byte the same for the
    same arrays: unlike np.savez, every member carries the same fixed timestamp. A value with a ``write_npy``
    method (``rnnlm.stored.StoredArray``) writes itself."""
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                if hasattr(array, "write_npy"):
                    array.write_npy(member)
                else:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def atomic_savez(path, arrays):
    """Write ``arrays`` as an .npz to ``path`` so that a crash leaves either the old file or the new one
    (``rnnlm.paths.atomic_output``: a temporary file beside it, fsynced, renamed; RnnlmError naming the
    file on a full disk)."""
    with atomic_output(path) as f:
        write_npz(f, arrays)
