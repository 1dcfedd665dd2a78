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

RELEASE_IDS = 1 << 16  # ids a stream reads between two releases of what it has read


def _check_vocab(path, dir_vocab, vocab):
    if vocab is not None and dir_vocab.tokens != vocab.tokens:
        raise RnnlmError(f"{path} was tokenized with another vocabulary than the model's")


def load_ids(path, vocab=None, level="word", min_count=1, max_vocab=None, lowercase=False):
    """As :func:`load_corpus`, the ids as :class:`rnnlm.store.TokenIds` (a store's shards stay mapped)."""
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
    (classes: ``classes[targets]``). Stream b at window w reads ids[b·steps + w·T - 1 : b·steps + (w+1)·T];
    the ids before that are released from memory (``TokenIds.release``) as the streams move on.
    """

    def __init__(self, ids, boundary_id, batch, bptt, classes=None, streams=None):
        self.ids, self.boundary_id, self.bptt, self.classes = TokenIds.of(ids), boundary_id, bptt, classes
        self.steps = (len(self.ids) // batch) // bptt * bptt
        self.n_windows = self.steps // bptt
        self.starts = np.asarray(range(batch) if streams is None else streams, np.int64) * self.steps
        self.released = self.starts.copy()

    def window(self, w):
        T = self.bptt
        positions = self.starts[None, :] + (w * T + np.arange(-1, T, dtype=np.int64))[:, None]  # (T + 1, b)
        ids = self.ids.gather(np.maximum(positions, 0)).astype(np.int32)
        ids[positions < 0] = self.boundary_id
        tokens = [np.ascontiguousarray(ids[:-1]), np.ascontiguousarray(ids[1:])]
        if self.classes is not None:
            tokens.append(self.classes[tokens[1]])
        self._release(positions[0])
        return tokens

    def _release(self, needed):
        """Release every stream's ids before ``needed`` (its next window's first), from where it last stopped."""
        if (needed < self.released).any():  # a new epoch: the streams start over
            self.released = self.starts.copy()
        due = needed - self.released >= RELEASE_IDS
        for start, stop in zip(self.released[due].tolist(), needed[due].tolist(), strict=True):
            self.ids.release(start, stop)
        self.released[due] = needed[due]
