"""n-best lists: reading each format, writing it back with the LM score, and choosing the best hypothesis."""

import pytest

from rnnlm import nbest
from rnnlm.errors import RnnlmError


@pytest.mark.parametrize("fmt, line, group, key, text", [
    ("mikolov", "17 the cat  sat", "17", "17", "the cat  sat"),
    ("mikolov", "3", "3", "3", ""),
    ("kaldi", "utt-7-12 the cat", "utt-7", "utt-7-12", "the cat"),
    ("moses", "4 ||| the cat ||| lm= -3 tm= 1 2 ||| -0.5", "4", "4", "the cat"),
])
def test_read_and_write_round_trip(fmt, line, group, key, text):
    hypothesis = nbest.read(line, fmt, 0)
    assert (hypothesis.id, hypothesis.key, hypothesis.text) == (group, key, text)
    written = nbest.write(hypothesis, fmt, -12.25)
    again = nbest.read(written, fmt, 0, scored=fmt != "moses")
    assert (again.id, again.key, again.text.split()) == (group, key, text.split())
    if fmt == "moses":
        assert again.score == -0.5 and nbest.moses_feature(again) == -12.25
        assert written == "4 ||| the cat ||| lm= -3 tm= 1 2 RNNLM= -12.2500 ||| -0.5"
    else:
        assert again.score == -12.25


def test_moses_keeps_the_fields_after_the_score():
    line = "0 ||| a b ||| f= 1 ||| 2.5 ||| 0-0 1-1"
    written = nbest.write(nbest.read(line, "moses", 0), "moses", 1.0)
    assert written == "0 ||| a b ||| f= 1 RNNLM= 1.0000 ||| 2.5 ||| 0-0 1-1"
    assert nbest.moses_feature(nbest.read(line, "moses", 0)) is None


@pytest.mark.parametrize("fmt, line, message", [
    ("mikolov", "   ", "line 4: an n-best line needs an id"),
    ("kaldi", "utt the cat", "line 4: 'utt' is not a Kaldi n-best key"),
    ("kaldi", "utt-x the cat", "is not a Kaldi n-best key"),
    ("moses", "0 ||| text ||| f= 1", "line 4: not a Moses n-best line"),
    ("moses", " ||| text ||| f= 1 ||| 1", "not a Moses n-best line"),
    ("moses", "0 ||| text ||| f= 1 ||| nan?", "line 4: the score 'nan?' is not a number"),
    ("srilm", "0 a b", "unknown n-best format"),
])
def test_bad_lines_name_their_line(fmt, line, message):
    with pytest.raises(RnnlmError, match=message.replace("?", r"\?")):
        nbest.read(line, fmt, 3)


def test_best_keeps_the_highest_combined_score_per_id_in_first_appearance_order():
    best = nbest.Best(weight=2.0)
    lines = ["b ||| x ||| f= 0 ||| -1", "a ||| y ||| f= 0 ||| -5", "b ||| z ||| f= 0 ||| -3", "a ||| w ||| f= 0 ||| -1"]
    lm = [-4.0, -1.0, -0.5, -3.0]  # totals: b: -9, -4; a: -7, -7 (a tie keeps the first)
    for k, (line, score) in enumerate(zip(lines, lm, strict=True)):
        hypothesis = nbest.read(line, "moses", k)
        best.add(hypothesis, score, line)
    assert [(total, hypothesis.text) for total, hypothesis, _ in best.chosen()] == [(-4.0, "z"), (-7.0, "y")]
