"""Adapting a trained model to new text: ``rnnlm train TEXT --init-from MODEL -o ADAPTED``.

The run keeps MODEL's vocabulary (TEXT's tokens outside it are read as <unk>, counted and reported), its
architecture (level, state size, layers, tying, softmax and class bounds, direct features) and starts from its
weights; the optimizer, the schedule and the warm-up start afresh with the run's own settings.
``ARCHITECTURE`` names the settings such a run takes from the model rather than from its config (the command
line refuses them). Its checkpoint holds everything it needs: a resume does not read MODEL again
(``runplan.resumed_vocab``).
"""

from dataclasses import replace

from rnnlm.errors import RnnlmError
from rnnlm.model import Model

ARCHITECTURE = ("hidden", "layers", "tied", "softmax", "classes", "init", "min_count", "max_vocab", "lowercase",
                "direct", "direct_order")


def load_source(path, config):
    """(the Model at ``path``, ``config`` with its architecture); (None, config) when path is None."""
    if path is None:
        return None, config
    source = Model.load(path)
    return source, adapted_config(config, source, path)


def adapted_config(config, source, path):
    """``config`` with the architecture of ``source`` (the Model read from ``path``).

    config.level None means the model's; another level than the model's is an RnnlmError.
    """
    level = source.vocab.level
    if config.level is not None and config.level != level:
        raise RnnlmError(f"--init-from {path} is a {level}-level model; it cannot be trained at --level {config.level}")
    n_classes = None if source.class_bounds is None else len(source.class_bounds) - 1
    return replace(config, level=level, lowercase=source.vocab.lowercase, hidden=source.hidden,
                   layers=source.layers, tied=source.tied, softmax=source.softmax, classes=n_classes,
                   direct=source.direct_size, direct_order=source.direct_order or config.direct_order)


def announce(log, path, text_tokens, unknown, on_init=None):
    """Open an adapted run's log (``log``: ``Trainer.log``) with the record {"event": "init_from", "model",
    "tokens", "oov"}: the model it starts from, how many tokens TEXT has and how many of them are outside the
    model's vocabulary (None: not counted, TEXT being a token directory); pass it to on_init."""
    record = log({"event": "init_from", "model": str(path), "tokens": text_tokens, "oov": unknown})
    if on_init:
        on_init(record)


def describe(record):
    """One line for a person: what the start record says."""
    unknown = "not counted" if record["oov"] is None else f"{record['oov']:,}"
    return (f"adapting {record['model']}: {record['tokens']:,} tokens of text, {unknown} of them outside its "
            "vocabulary (read as <unk>)")
