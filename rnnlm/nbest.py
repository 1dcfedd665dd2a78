"""n-best lists: read the hypotheses of the usual formats, write them back with the LM score added.

Formats (one hypothesis per line, the hypotheses of one id need not be adjacent):

- ``mikolov`` (Mikolov's ``rnnlm -nbest``): ``ID w1 w2 ...``. Written back as ``ID LM w1 w2 ...``.
- ``kaldi`` (Kaldi's n-best text): ``UTT-N w1 w2 ...``, the utterance id, a dash and the hypothesis'
  number. Written back as ``UTT-N LM w1 w2 ...``.
- ``moses`` (Moses' n-best list): ``ID ||| text ||| features ||| score [||| more]``. Written back with the
  feature ``RNNLM= LM`` appended to the features, the other fields as they were.

LM is the sentence's log-probability in the chosen units. ``read`` with ``scored=True`` reads the
written form back. The score a hypothesis already has is Moses' total score; a ``mikolov`` or ``kaldi``
line carries none unless it is read ``scored`` (then its LM field is that score).
"""

import re
from dataclasses import dataclass, field

from rnnlm.errors import RnnlmError

FORMATS = ("mikolov", "kaldi", "moses")
MOSES_FEATURE = "RNNLM="
_KALDI_KEY = re.compile(r"^(.+)-(\d+)$")


@dataclass
class Hypothesis:
    """One n-best line: ``id`` groups the hypotheses of one input (Kaldi: the utterance, without -N),
    ``key`` is the line's first field as written, ``text`` the words, ``score`` the score it carries."""

    line: int
    id: str
    key: str
    text: str
    score: float = 0.0
    fields: list = field(default_factory=list)  # Moses: the fields after the text, stripped


def _number(text, what, line):
    try:
        return float(text)
    except ValueError:
        raise RnnlmError(f"line {line + 1}: {what} {text!r} is not a number") from None


def read(text, fmt, line, scored=False):
    """The ``Hypothesis`` of one line (``line``: its 0-based number, for the error messages)."""
    if fmt not in FORMATS:
        raise RnnlmError(f"unknown n-best format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fmt == "moses":
        return _read_moses(text, line)
    parts = text.split(None, 2 if scored else 1)
    if not parts:
        raise RnnlmError(f"line {line + 1}: an n-best line needs an id ({fmt} format: ID words...)")
    key = parts[0]
    group = key
    if fmt == "kaldi":
        match = _KALDI_KEY.match(key)
        if match is None:
            raise RnnlmError(f"line {line + 1}: {key!r} is not a Kaldi n-best key UTTERANCE-N")
        group = match.group(1)
    score = 0.0
    if scored:
        if len(parts) < 2:
            raise RnnlmError(f"line {line + 1}: a scored {fmt} line needs ID LM words...")
        score = _number(parts.pop(1), "the LM score", line)
    return Hypothesis(line, group, key, parts[1] if len(parts) > 1 else "", score)


def _read_moses(text, line):
    fields = [part.strip() for part in text.split("|||")]
    if len(fields) < 4 or not fields[0]:
        raise RnnlmError(f"line {line + 1}: not a Moses n-best line (ID ||| text ||| features ||| score)")
    score = _number(fields[3], "the score", line)
    return Hypothesis(line, fields[0], fields[0], fields[1], score, fields[2:])


def write(hypothesis, fmt, lm):
    """The hypothesis' line in format ``fmt`` with the LM score ``lm`` added."""
    number = f"{lm:.4f}"
    if fmt == "moses":
        features, *rest = hypothesis.fields
        features = f"{features} {MOSES_FEATURE} {number}".strip()
        return " ||| ".join([hypothesis.key, hypothesis.text, features, *rest])
    return f"{hypothesis.key} {number} {hypothesis.text}".rstrip()


def moses_feature(hypothesis):
    """The value of the RNNLM= feature in a Moses hypothesis' features (None when absent)."""
    tokens = hypothesis.fields[0].split()
    if MOSES_FEATURE not in tokens:
        return None
    return _number(tokens[tokens.index(MOSES_FEATURE) + 1], "the RNNLM= feature", hypothesis.line)


class Best:
    """The best hypothesis of every id by ``score + weight × LM``, in the order the ids first appear."""

    def __init__(self, weight):
        self.weight = weight
        self.best = {}

    def add(self, hypothesis, lm, line_text):
        total = hypothesis.score + self.weight * lm
        kept = self.best.get(hypothesis.id)
        if kept is None or total > kept[0]:
            self.best[hypothesis.id] = (total, hypothesis, line_text)

    def chosen(self):
        """(total, hypothesis, its written line) of every id, in the order the ids first appeared."""
        return list(self.best.values())
