"""Token streams for training and evaluation: reading a corpus and cutting it into (T, B) windows.

Training reads B parallel streams: stream b is the corpus's ids [b·steps, (b + 1)·steps) read from the
token before them (the boundary token for b = 0), steps = (N // B) // T · T. :class:`Windows` cuts window w's
(T, B) inputs and targets out of the ids as it is asked for them, so memory does not grow with the corpus;
:func:`batchify` is the same cut materialized at once.
"""

from pathlib import Path

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.store import TokenIds
from rnnlm.tokenizer import encode_file, load_token_dir, open_token_dir, tokenize_text

READ_IDS = 1 << 16  # ids read ahead per training stream, at most
READ_IDS_TOTAL = 1 << 22  # and over all streams (16 MiB of int32: 1 GiB at --batch 4096 had it been READ_IDS each)


def load_corpus(path, vocab=None, level="word", min_count=1, max_vocab=None, lowercase=False):
    """Token ids and vocabulary of ``path``: a text file, or a directory written by ``tokenize``.

    With ``vocab`` given, a text file is encoded with it and a token directory must have been encoded
    with the same token list. Returns (ids (N,) unsigned ints, vocab).
    """
    if str(path) != "-" and Path(path).is_dir():
        ids, dir_vocab = load_token_dir(path)
        _check_vocab(path, dir_vocab, vocab)
        return ids, dir_vocab
    if vocab is None:
        ids, vocab, _ = tokenize_text(path, level, min_count, max_vocab, lowercase)
        return ids, vocab
    ids, _ = encode_file(path, vocab)
    return ids, vocab


def _check_vocab(path, dir_vocab, vocab):
    if vocab is not None and dir_vocab.tokens != vocab.tokens:
        raise RnnlmError(f"{path} was tokenized with another vocabulary than the model's")


def load_ids(path, vocab=None, level="word", min_count=1, max_vocab=None, lowercase=False):
    """As :func:`load_corpus`, the ids as :class:`rnnlm.store.TokenIds` (a store's shards stay on disk)."""
    if str(path) != "-" and Path(path).is_dir():
        ids, dir_vocab = open_token_dir(path)
        _check_vocab(path, dir_vocab, vocab)
        return ids, dir_vocab
    ids, vocab = load_corpus(path, vocab, level, min_count, max_vocab, lowercase)
    return TokenIds.of(ids), vocab


def stream_pairs(ids, boundary_id):
    """(inputs, targets) of one stream read from the boundary token: every token of ids is a target.

    inputs[k] = the token before ids[k] (the boundary token for k = 0); both (N,) int32.
    """
    targets = np.asarray(ids, dtype=np.int32)
    inputs = np.empty_like(targets)
    inputs[0] = boundary_id
    inputs[1:] = targets[:-1]
    return inputs, targets


def batchify(ids, boundary_id, batch, bptt):
    """Cut one stream into ``batch`` parallel streams, read in windows of ``bptt`` steps.

    Returns (inputs, targets), each (n_windows · bptt, batch) int32 and C-contiguous, so that window w
    is rows [w·bptt, (w+1)·bptt). Stream b continues where stream b - 1's text ends; the tail that does
    not fill a whole window is left out.
    """
    inputs, targets = stream_pairs(ids, boundary_id)
    steps = (len(targets) // batch) // bptt * bptt
    if steps == 0:
        return None
    shape = (batch, steps)
    return (
        np.ascontiguousarray(inputs[: batch * steps].reshape(shape).T),
        np.ascontiguousarray(targets[: batch * steps].reshape(shape).T),
    )


class Windows:
    """The (T, b) windows of ``streams`` (indices among the B streams; default all) of ``ids``, cut on demand.

    ``window(w)`` returns [inputs, targets] (and the targets' classes when ``classes``, a (V,) table, is
    given), each (T, b) int32 and C-contiguous, equal to rows [w·T, (w+1)·T) of :func:`batchify`'s arrays
    (classes: ``classes[targets]``). Stream b at window w reads ids[b·steps + w·T - 1 : b·steps + (w+1)·T],
    out of a buffer of the stream's next READ_IDS ids (b, READ_IDS), refilled from ``ids`` as it runs out (fewer
    ids a stream when b · READ_IDS would pass READ_IDS_TOTAL, never fewer than a window's T + 1).
    """

    def __init__(self, ids, boundary_id, batch, bptt, classes=None, streams=None):
        self.ids, self.boundary_id, self.bptt, self.classes = TokenIds.of(ids), boundary_id, bptt, classes
        self.steps = (len(self.ids) // batch) // bptt * bptt
        self.n_windows = self.steps // bptt
        self.starts = np.asarray(range(batch) if streams is None else streams, np.int64) * self.steps
        read_ahead = min(READ_IDS, READ_IDS_TOTAL // len(self.starts))
        self.buffer = np.zeros((len(self.starts), max(read_ahead, bptt + 1)), self.ids.dtype)
        self.first = np.full(len(self.starts), -(1 << 62), np.int64)  # where each stream's buffer starts: none yet

    def window(self, w):
        T = self.bptt
        lo = self.starts + w * T - 1  # (b,) the first position each stream reads: its inputs' first token
        stale = (lo < self.first) | (np.maximum(lo, 0) + T + 1 > self.first + self.buffer.shape[1])
        for b in np.flatnonzero(stale):
            self.first[b] = max(lo[b], 0)
            filled = self.ids.read(self.first[b], min(self.first[b] + self.buffer.shape[1], len(self.ids)))
            self.buffer[b, :len(filled)] = filled
        offsets = lo[None, :] - self.first[None, :] + np.arange(T + 1)[:, None]  # (T + 1, b)
        ids = self.buffer[np.arange(len(lo))[None, :], np.maximum(offsets, 0)].astype(np.int32)
        ids[offsets < 0] = self.boundary_id
        tokens = [np.ascontiguousarray(ids[:-1]), np.ascontiguousarray(ids[1:])]
        if self.classes is not None:
            tokens.append(self.classes[tokens[1]])
        return tokens

    def history(self, w, n):
        """The n inputs (n, b) int32 of each stream before window w's, -1 before the stream's first input (and
        so everywhere for w = 0: an epoch starts its streams afresh)."""
        out = np.full((n, len(self.starts)), -1, np.int32)
        for b, start in enumerate(self.starts):
            first_input = start - 1  # the stream's first input, the boundary token when it lies before ids[0]
            lo = start + w * self.bptt - 1
            first = max(lo - n, first_input)
            if first >= lo:
                continue
            ids = np.asarray(self.ids.read(max(first, 0), lo), np.int32)
            out[n - (lo - first):, b] = np.concatenate([[self.boundary_id], ids]) if first < 0 else ids
        return out
