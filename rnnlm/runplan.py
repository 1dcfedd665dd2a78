"""Before a training run starts: where it reads and writes, and whether it fits in memory.

A run writes its model (``-o``), its checkpoint and its log, and reads its text and validation text.
All of them are checked before any work (``rnnlm.paths.check_outputs``); a run that adapts a model
(``--init-from``) reads that model too. A checkpoint stores the paths relative to its own folder, as data:
``resume`` takes from it only the paths that stay inside that folder, and needs every other one on its
command line (the adapted model's is only a mark: a resume does not read it again).
"""

import math
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rnnlm.corpus import load_ids
from rnnlm.errors import RnnlmError
from rnnlm.huffman import huffman_tree
from rnnlm.model import Model, frequency_classes
from rnnlm.paths import check_outputs, inside, relative_to, same_file
from rnnlm.store import TokenIds, store_members, token_counts
from rnnlm.tokenizer import TOKENS_FILE, Vocab, encode_file
from rnnlm.untrusted import checked

HELD_OUT_SHARE = 0.05


class ResumeConflictError(RnnlmError):
    """An option that ``resume`` cannot honour: it names another file than the checkpoint's run read."""


RESUME_FLAGS = {"TEXT": "text", "--valid": "valid", "-o": "model", "--log": "log"}


def load_data(text, valid, config, vocab=None):
    """(train ids, validation ids, vocabulary, unknown) for a run, the ids as ``rnnlm.store.TokenIds``.

    vocab: read TEXT with this vocabulary (an adapted model's) instead of building one from it; unknown is
    then the number of TEXT's tokens outside it, read as <unk> (None when the vocabulary was built from TEXT,
    or TEXT is a token directory, which must have been encoded with ``vocab``).
    """
    unknown = None
    if vocab is None:
        ids, vocab = load_ids(text, level=config.level, min_count=config.min_count,
                              max_vocab=config.max_vocab, lowercase=config.lowercase)
    elif str(text) != "-" and os.path.isdir(text):
        ids, _ = load_ids(text, vocab=vocab)
    else:
        ids, unknown = encode_file(text, vocab)
        ids = TokenIds.of(ids)
    if valid is not None:
        valid_ids, _ = load_ids(valid, vocab=vocab)
    else:
        n_valid = max(1, int(len(ids) * HELD_OUT_SHARE))
        ids, valid_ids = ids.view(0, len(ids) - n_valid), ids.view(len(ids) - n_valid, len(ids))
    if len(valid_ids) == 0:
        raise RnnlmError(f"{valid} has no tokens")
    words = np.asarray(valid_ids.read(0, len(valid_ids)))
    words = words[words != vocab.boundary_id]
    if len(words) and (words == vocab.unk_id).all():
        raise RnnlmError(f"every word of {valid} is outside the training text's vocabulary (read as <unk>): a text "
                         "of another vocabulary, case or language?")
    return ids, valid_ids, vocab, unknown


def initial_model(config, vocab, train_ids, source=None):
    """The model a run starts from: ``source`` (a trained model that ``rnnlm.adapt`` checked against
    config) with the run's settings as hparams, or a fresh one (class bounds from train_ids' counts)."""
    hparams = asdict(config)
    if source is not None:
        params = {name: array.copy() for name, array in source.params.items()}
        if source.tied:
            params["W_x"] = params["W_o"].T
        return Model(params, vocab, hparams, source.class_bounds, source.layers, source.tied, source.direct_order,
                     source.hs_tree)
    class_bounds = None
    if config.softmax == "class":
        n_classes = config.classes or round(math.sqrt(len(vocab)))
        class_bounds = frequency_classes(token_counts(train_ids, len(vocab)), n_classes)
    hs_counts = token_counts(train_ids, len(vocab)) if config.softmax == "hs" else None
    return Model.create(vocab, config.hidden, seed=config.seed, hparams=hparams, class_bounds=class_bounds,
                        init=config.init, layers=config.layers, tied=config.tied, direct=config.direct,
                        direct_order=config.direct_order, hs_counts=hs_counts)


def default_paths(model_path, options):
    """The checkpoint and log paths: MODEL.ckpt.npz and MODEL.log.jsonl unless given."""
    model_path = Path(model_path)
    if model_path.name in ("", "..") or os.path.isdir(model_path):
        raise RnnlmError(f"-o {model_path} is a directory, expected a model file name")
    checkpoint = Path(options.checkpoint) if options.checkpoint else model_path.with_suffix(".ckpt.npz")
    log = Path(options.log) if options.log else model_path.with_suffix(".log.jsonl")
    return checkpoint, log


def stored_paths(paths, options):
    """(sources, options) as a checkpoint stores them: every path relative to the checkpoint's folder."""
    folder = Path(paths["checkpoint"]).parent
    sources = {key: relative_to(paths[key], folder) for key in ("text", "valid", "model")}
    if paths.get("init_from") is not None:  # the run's vocabulary is the model's, not built from TEXT
        sources["init_from"] = relative_to(paths["init_from"], folder)
    return sources, dict(options, checkpoint=Path(paths["checkpoint"]).name, log=relative_to(paths["log"], folder))


def resume_needs(paths):
    """The paths that a resume of this run must be given, by option: those outside the checkpoint's folder."""
    folder = Path(paths["checkpoint"]).parent
    return {flag: str(paths[key]) for flag, key in RESUME_FLAGS.items()
            if paths[key] is not None and inside(folder, relative_to(paths[key], folder)) is None}


def check_run_paths(paths, options, resumed=None):
    """RnnlmError unless the model, checkpoint and log can be written without touching an input."""
    inputs = [("TEXT", paths["text"]), ("--valid", paths["valid"]), ("--init-from", paths.get("init_from"))]
    for label in ("TEXT", "--valid"):
        source = paths[RESUME_FLAGS[label]]
        if source is not None and str(source) != "-" and os.path.isdir(source):
            inputs += [(label, Path(source) / name) for name in (*store_members(source), TOKENS_FILE)]
    checkpoint_label = "--checkpoint" if options.checkpoint else "the checkpoint"
    if resumed is not None:
        inputs.append(("--resume", resumed))
        if not options.checkpoint or same_file(paths["checkpoint"], resumed):
            checkpoint_label = "--resume"
    check_outputs([("-o", paths["model"]), (checkpoint_label, paths["checkpoint"]),
                   ("--log" if options.log else "the log", paths["log"])], inputs)


def resume_paths(checkpoint, meta, options, text, valid, model_path):
    """The files a resumed run reads and writes: those given, else the checkpoint's inside its folder."""
    folder = Path(checkpoint).parent
    sources = meta["sources"]

    def stored(name, flag, given):
        found = inside(folder, name)
        if given is None:
            if found is None:
                where = "standard input" if name == "-" else f"{name!r}, outside its folder"
                raise RnnlmError(f"{checkpoint} read {flag} from {where}; give {flag} on the command line")
            return found
        if found is not None and found.exists() and not same_file(found, given):
            raise ResumeConflictError(f"{flag} {given} is not the checkpoint's {flag} ({found})")
        return Path(given)

    if sources.get("valid") is None and valid is not None:
        raise ResumeConflictError(f"--valid {valid}: the checkpoint's run held out the end of TEXT instead")
    paths = {"text": stored(sources.get("text"), "TEXT", text),
             "valid": None if sources.get("valid") is None else stored(sources["valid"], "--valid", valid)}
    if model_path is not None:
        paths["model"], paths["log"] = Path(model_path), default_paths(model_path, options)[1]
    else:
        paths["model"] = stored(sources.get("model"), "-o", None)
        paths["log"] = stored(meta["options"].get("log"), "--log", None) if options.log is None else None
    if options.log is not None:
        paths["log"] = Path(options.log)
    paths["checkpoint"] = Path(options.checkpoint or checkpoint)
    return paths


def resumed_model(arrays, vocab, config):
    """The best model so far of a checkpoint's ``arrays`` (its class bounds or word counts taken out of them)."""
    class_bounds = arrays.pop("class_bounds", None)
    hs_counts = arrays.pop("hs_counts", None)
    best = {name[len("best/"):]: arrays[name] for name in arrays if name.startswith("best/")}
    if config.tied:
        best["W_x"] = best["W_o"].T
    return Model(best, vocab, asdict(config), class_bounds, config.layers, config.tied,
                 config.direct_order if config.direct else 0, None if hs_counts is None else huffman_tree(hs_counts))


def resumed_vocab(meta, config, checkpoint):
    """The vocabulary a resumed run reads its text with: the checkpoint's when the run adapted a model
    (``--init-from``: TEXT need not hold every word of it), else None (built from TEXT again and compared)."""
    if checked(meta["sources"], "init_from", f"{checkpoint}: meta.sources", (str, type(None)), default=None) is None:
        return None
    return Vocab(meta["vocab"], config.level, config.lowercase)


def memory_needed(config, vocab_size):
    """A lower bound, in bytes, of the memory a run takes: the float32 parameters on the device, the gradients
    of the dense ones (the sparse ones, W_x's columns and the class or hierarchical softmax's W_o rows, are
    slotted: only a window's rows are written; the best model and the epoch's start stay in the checkpoint on
    disk, see ``rnnlm.checkpointing``) and the optimizer's moments once (bfloat16 ones in half the bytes), plus
    the window's buffers (T + 1 states and two more (T, B, m) arrays per layer, the (T·B, V) logits); the
    direct features' table twice (on the device and, until the run's start checkpoint, the initial model: it
    has no gradient and no moments)."""
    V, m, L, T, B = vocab_size, config.hidden, config.layers, config.bptt, config.batch
    n_out = {"full": V, "hs": 0, "class": min(V, config.classes or round(math.sqrt(V)))}[config.softmax]
    n_params = (1 if config.tied else 2) * V * m + V + (2 * L - 1) * m * m + L * m
    if config.softmax == "class":
        n_params += n_out * (m + 1)
    sparse_tables = (0 if config.tied else 1) + (config.softmax != "full")  # W_x's, W_o's gradients
    moments = 0 if config.optimizer == "sgd" else 1 if config.moments == "bfloat16" else 2  # in float32 tables
    window = T * B * (3 * L * m + n_out)
    return 4 * ((2 + moments) * n_params - sparse_tables * V * m + 2 * config.direct + window)


def check_memory(config, vocab_size):
    """RnnlmError, before anything is allocated, when the run cannot fit in this machine's memory."""
    need = memory_needed(config, vocab_size)
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return
    if need > have:
        direct = f" --direct {config.direct:,}" if config.direct else ""
        raise RnnlmError(f"--hidden {config.hidden} --layers {config.layers} --batch {config.batch} --bptt "
                         f"{config.bptt}{direct} with a vocabulary of {vocab_size:,} needs at least "
                         f"{need / 2**30:,.1f} GiB of memory; this machine has {have / 2**30:,.1f} GiB")
