"""A training checkpoint: ``write_checkpoint(path, settings, saved)``, and read as untrusted data,
``read_checkpoint(path) -> (arrays, meta)``, then ``saved_run(arrays, meta) -> Saved``.

What ``read_checkpoint`` guarantees when it returns (anything else is one RnnlmError naming the file):

meta, the JSON object of the ``meta`` member (at most ``untrusted.MAX_JSON_CHARS`` characters, nested at
most ``untrusted.MAX_JSON_DEPTH`` deep, no NaN or infinity):
  kind     "rnnlm-checkpoint"
  config   exactly the fields of ``train.TrainConfig``, each of its annotated type (an int is no bool),
           accepted by ``TrainConfig.check``, with hidden ≤ MAX_HIDDEN, layers ≤ MAX_LAYERS,
           bptt and batch ≤ MAX_WINDOW, schedule set
  options  exactly the fields of ``train.RunOptions``, each of its type, accepted by ``RunOptions.check``
  sources  {"text": str, "valid": str or null, "model": str}: non-empty, without NUL characters
           (data only: where a resume may read and write is the caller's decision); "init_from", the
           model a run adapted, is a mark that ``runplan.resumed_vocab`` checks (a resume never reads it)
  vocab    a token list as ``tokenizer.vocab_of`` accepts it with the config's level and lowercase
  state    epoch int in [1, config.epochs + 1]; window int ≥ 0 (``check_cursor`` bounds it by the data);
           epoch_loss, elapsed_s finite ≥ 0; lr finite ≥ 0; halving bool; stalls, tokens_seen int ≥ 0;
           divergences int in [0, train.MAX_DIVERGENCES]; best null or finite > 0; tokens_per_s, when
           present, finite ≥ 0; guard_scale finite in (0, 1], guard_since int ≥ 0 (``schedule.Guard``);
           records a list of objects of JSON scalars; optimizer and
           epoch_start_optimizer {} for SGD, {"t": int ≥ 0} for Adam; rng a PCG64 state that numpy takes.
arrays, name -> array, exactly these members (no other is read; each read at its expected shape only
after its zip and .npy headers agree on the size), all float32, finite and C-contiguous but class_bounds
and bfloat16 moments:
  params/N, epoch_start/params/N       for every trainable parameter N (all but W_x when tied)
  best/N                               for every parameter of ``model.param_shapes``
  optimizer/momentK/N, epoch_start/optimizer/momentK/N (K = 1, 2; Adam only): N's rows, W_x's as (V, m); none for W_d;
                                       with config.moments "bfloat16" uint16 bfloat16 bits, none a NaN or infinity
  carried_state/k                      (batch, hidden) for layers k = 0 .. layers - 1
  class_bounds (class softmax only)    (C + 1,) int32 binning ids 0..V-1 into non-empty classes
  hs_counts (hierarchical softmax only) (V,) integer word counts that ``huffman.huffman_tree`` accepts
"""

import json
import math
import typing
from dataclasses import dataclass

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.model import (
    DEFAULT_DIRECT_ORDER,
    MAX_HIDDEN,
    MAX_LAYERS,
    atomic_savez,
    param_shapes,
    read_class_bounds,
    read_hs_tree,
)
from rnnlm.stored import StoredArray
from rnnlm.tokenizer import vocab_of
from rnnlm.untrusted import BFLOAT16, FLOATS, Npz, check_fits, checked, finite_bfloat16, finite_float32

KIND = "rnnlm-checkpoint"
MAX_WINDOW = 100_000
STATE_FIELDS = {
    "epoch": (int,), "window": (int,), "epoch_loss": (float,), "lr": (float,), "halving": (bool,),
    "stalls": (int,), "best": (float, type(None)), "divergences": (int,), "tokens_seen": (int,),
    "elapsed_s": (float,), "records": (list,), "optimizer": (dict,), "epoch_start_optimizer": (dict,),
    "rng": (dict,), "guard_scale": (float,), "guard_since": (int,),
}
SCALARS = (str, int, float, bool, type(None))
MOMENT_PREFIXES = ("optimizer/", "epoch_start/optimizer/")


@dataclass
class Saved:
    """A run's progress as its checkpoint holds it.

    now, epoch_start: host copies (params by name, (optimizer arrays by name, optimizer scalars)) of the
    trainable parameters and the optimizer, now and at the epoch's start; best: the best model's parameters
    by name; carried: each layer's carried state, (batch, hidden) over every rank's streams; rng: the dropout
    masks' PCG64 state; state: the training state's JSON object (``rnnlm.state.TrainState.to_json``).
    """

    now: tuple
    epoch_start: tuple
    best: dict
    carried: list
    rng: dict
    state: dict


def write_checkpoint(path, settings, saved, structure_arrays=None):
    """Write the checkpoint at ``path`` atomically (a crash leaves the previous one), as the module says.

    settings: meta's {"config", "options", "sources", "vocab"}; saved: a ``Saved``; structure_arrays: the
    model's ``Model.structure_arrays()`` (the class bounds or the hierarchical softmax's word counts).
    """
    params, (opt_arrays, opt_scalars) = saved.now
    start_params, (start_arrays, start_scalars) = saved.epoch_start
    arrays = {f"params/{k}": v for k, v in params.items()}
    arrays.update({f"best/{k}": v for k, v in saved.best.items()})
    arrays.update({f"optimizer/{k}": v for k, v in opt_arrays.items()})
    arrays.update({f"epoch_start/params/{k}": v for k, v in start_params.items()})
    arrays.update({f"epoch_start/optimizer/{k}": v for k, v in start_arrays.items()})
    arrays.update({f"carried_state/{k}": S for k, S in enumerate(saved.carried)})
    arrays.update(structure_arrays or {})
    state = dict(saved.state, optimizer=opt_scalars, epoch_start_optimizer=start_scalars, rng=saved.rng)
    meta = {"kind": KIND, **settings, "state": state}
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=False))
    atomic_savez(path, arrays)


def saved_run(arrays, meta):
    """The ``Saved`` of a checkpoint that ``read_checkpoint`` returned as (arrays, meta)."""
    state = dict(meta["state"])

    def group(prefix):
        """The arrays named prefix + name, by name."""
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    now = group("params/"), (group("optimizer/"), state.pop("optimizer"))
    epoch_start = group("epoch_start/params/"), (group("epoch_start/optimizer/"), state.pop("epoch_start_optimizer"))
    carried = [arrays[f"carried_state/{k}"] for k in range(meta["config"]["layers"])]
    return Saved(now, epoch_start, group("best/"), carried, state.pop("rng"), state)


def read_checkpoint(path, stored=()):
    """(arrays, meta) of the checkpoint at ``path``, every field and array checked as the module says.

    stored: prefixes ("params/", ...) of float members given as ``rnnlm.stored.StoredArray`` (read through to be
    checked, not kept in memory) rather than as arrays.
    """
    with Npz(path, "checkpoint") as npz:
        if "meta" not in npz.names:
            raise RnnlmError(f"{path} is not a rnnlm checkpoint (no 'meta' member)")
        meta = npz.read_json("meta")
        where = f"{path}: meta"
        if not isinstance(meta, dict) or meta.get("kind") != KIND:
            raise RnnlmError(f"{path} is not a rnnlm checkpoint (its meta is not of kind {KIND!r})")
        config = check_config(meta.get("config"), f"{where}.config")
        check_options(meta.get("options"), f"{where}.options")
        check_sources(meta.get("sources"), f"{where}.sources")
        vocab = vocab_of({"level": config.level, "lowercase": config.lowercase, "vocab": meta.get("vocab")}, where)
        check_state(meta.get("state"), config, f"{where}.state")
        shapes = param_shapes(len(vocab), config.hidden, None, config.layers, config.direct, config.softmax == "hs")
        class_bounds = hs_counts = None
        if config.softmax == "hs":
            hs_counts = read_hs_tree(npz, len(vocab)).counts
        if config.softmax == "class":
            class_bounds = read_class_bounds(npz, len(vocab))
            shapes = param_shapes(len(vocab), config.hidden, len(class_bounds) - 1, config.layers, config.direct)
        expected = member_shapes(shapes, config)
        npz.check_members(["meta", *expected] + ([] if class_bounds is None else ["class_bounds"])
                          + ([] if hs_counts is None else ["hs_counts"]))
        check_fits(4 * sum(math.prod(shape) for shape in expected.values()), f"{path}'s arrays")
        arrays = {name: read_member(npz, name, shape, config, stored) for name, shape in expected.items()}
    if class_bounds is not None:
        arrays["class_bounds"] = class_bounds
    if hs_counts is not None:
        arrays["hs_counts"] = hs_counts
    return arrays, meta


def read_member(npz, name, shape, config, stored):
    """Member ``name`` of a checkpoint's ``expected`` members, float32 or (Adam's moments with config.moments
    bfloat16) uint16, checked; a ``StoredArray`` if ``name`` starts with one of the ``stored`` prefixes."""
    bfloat16 = config.moments == "bfloat16" and name.startswith(MOMENT_PREFIXES)
    if name.startswith(tuple(stored)):
        return StoredArray.checked(npz, name, shape, "uint16" if bfloat16 else "float32")
    where = f"{npz.path}: member {name + '.npy'!r}"
    if bfloat16:
        return finite_bfloat16(npz.read_array(name, BFLOAT16, shape), where)
    return finite_float32(npz.read_array(name, FLOATS, shape, into=np.float32), where)


def check_cursor(meta, n_windows, path):
    """RnnlmError unless the checkpoint's window cursor lies within an epoch of ``n_windows`` windows."""
    window = meta["state"]["window"]
    if window > n_windows:
        raise RnnlmError(f"{path}: meta.state has 'window' = {window}, beyond the {n_windows} windows of an epoch "
                         "of its text")


def member_shapes(shapes, config):
    """The float arrays' names and shapes of a checkpoint of a model with parameter ``shapes``."""
    trainable = [name for name in shapes if not (config.tied and name == "W_x")]
    rows = {name: shapes[name][::-1] if name == "W_x" else shapes[name] for name in trainable}
    expected = {}
    for prefix in ("params/", "epoch_start/params/"):
        expected.update({prefix + name: shapes[name] for name in trainable})
    expected.update({"best/" + name: shape for name, shape in shapes.items()})
    if config.optimizer != "sgd":  # W_d has no moments: it steps by SGD whatever the optimizer
        for prefix in ("optimizer/", "epoch_start/optimizer/"):
            for moment in ("moment1/", "moment2/"):
                expected.update({prefix + moment + name: shape for name, shape in rows.items() if name != "W_d"})
    expected.update({f"carried_state/{k}": (config.batch, config.hidden) for k in range(config.layers)})
    return expected


def _dataclass(record, cls, where):
    """An instance of the dataclass ``cls`` from a JSON object holding exactly its fields, each of its type."""
    if not isinstance(record, dict):
        raise RnnlmError(f"{where} is not a JSON object")
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(record) - set(hints), key=str)
    if unknown:
        raise RnnlmError(f"{where} has an unknown field {unknown[0][:40]!r}")
    for name, hint in hints.items():
        checked(record, name, where, typing.get_args(hint) or (hint,))
    instance = cls(**record)
    try:
        instance.check()
    except RnnlmError as exc:
        raise RnnlmError(f"{where}: {exc}") from None
    return instance


def check_config(record, where):
    """The ``train.TrainConfig`` of a checkpoint's meta, checked."""
    from rnnlm.train import TrainConfig  # rnnlm.train imports this module

    if isinstance(record, dict):  # checkpoints from before direct features (and bfloat16 moments) lack their fields
        record = {"direct": 0, "direct_order": DEFAULT_DIRECT_ORDER, "direct_lr": 1.0, "moments": "float32", **record}
        record.pop("release_gradients", None)  # an option of older runs that changed nothing in the model
    config = _dataclass(record, TrainConfig, where)
    for name, high in (("hidden", MAX_HIDDEN), ("layers", MAX_LAYERS), ("bptt", MAX_WINDOW), ("batch", MAX_WINDOW)):
        checked(record, name, where, (int,), low=1, high=high)
    checked(record, "schedule", where, (str,))
    return config


def check_options(record, where):
    from rnnlm.train import RunOptions  # rnnlm.train imports this module

    _dataclass(record, RunOptions, where)


def check_sources(record, where):
    if not isinstance(record, dict):
        raise RnnlmError(f"{where} is not a JSON object")
    for name in ("text", "valid", "model"):
        value = checked(record, name, where, (str, type(None)) if name == "valid" else (str,))
        if value is not None and (not value or "\0" in value):
            raise RnnlmError(f"{where} has {name!r} = {value[:40]!r}, expected a path")


def check_state(state, config, where):
    """The schedule, cursor, optimizer scalars and RNG state of a checkpoint's meta, checked."""
    from rnnlm.train import MAX_DIVERGENCES  # rnnlm.train imports this module

    if not isinstance(state, dict):
        raise RnnlmError(f"{where} is not a JSON object")
    unknown = sorted(set(state) - set(STATE_FIELDS) - {"tokens_per_s"}, key=str)
    if unknown:
        raise RnnlmError(f"{where} has an unknown field {unknown[0][:40]!r}")
    for name, types in STATE_FIELDS.items():
        checked(state, name, where, types, low=0 if float in types or int in types else None)
    checked(state, "epoch", where, (int,), low=1, high=config.epochs + 1)
    checked(state, "divergences", where, (int,), low=0, high=MAX_DIVERGENCES)
    checked(state, "best", where, (float, type(None)), low=math.ulp(0.0))
    checked(state, "guard_scale", where, (float,), low=math.ulp(0.0), high=1.0)
    checked(state, "tokens_per_s", where, (float, type(None)), default=None, low=0)
    if not all(isinstance(r, dict) and all(isinstance(v, SCALARS) for v in r.values()) for r in state["records"]):
        raise RnnlmError(f"{where} has 'records' that are not all objects of numbers, strings and nulls")
    for name in ("optimizer", "epoch_start_optimizer"):
        scalars = state[name]
        if config.optimizer == "sgd" and scalars:
            raise RnnlmError(f"{where} has optimizer fields {sorted(scalars)[:3]} for SGD, which has none")
        if config.optimizer != "sgd":
            if set(scalars) != {"t"}:
                raise RnnlmError(f"{where}.{name} must hold exactly 't' for {config.optimizer}")
            checked(scalars, "t", f"{where}.{name}", (int,), low=0)
    check_rng(state["rng"], f"{where}.rng")


def check_rng(rng, where):
    """RnnlmError unless ``rng`` is a PCG64 bit generator state (as numpy writes it) that numpy accepts."""
    if set(rng) != {"bit_generator", "state", "has_uint32", "uinteger"} or rng["bit_generator"] != "PCG64":
        raise RnnlmError(f"{where} is not a PCG64 random generator state")
    inner = rng["state"]
    if not isinstance(inner, dict) or set(inner) != {"state", "inc"}:
        raise RnnlmError(f"{where}.state must hold exactly 'state' and 'inc'")
    for name in ("state", "inc"):
        checked(inner, name, f"{where}.state", (int,), low=0, high=2**128 - 1)
    checked(rng, "has_uint32", where, (int,), low=0, high=1)
    checked(rng, "uinteger", where, (int,), low=0, high=2**32 - 1)
    try:
        np.random.PCG64().state = rng
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise RnnlmError(f"{where} is not a state numpy accepts ({exc})") from None
