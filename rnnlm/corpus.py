"""Token streams for training and evaluation: reading a corpus and cutting it into (T, B) windows."""

from pathlib import Path

import numpy as np

from rnnlm.errors import RnnlmError
from rnnlm.tokenizer import encode_file, load_token_dir, tokenize_text


def load_corpus(path, vocab=None, level="word", min_count=1, max_vocab=None, lowercase=False):
    """Token ids and vocabulary of ``path``: a text file, or a directory written by ``tokenize``.

    With ``vocab`` given, a text file is encoded with it and a token directory must have been encoded
    with the same token list. Returns (ids (N,) unsigned ints, vocab).
    """
    if str(path) != "-" and Path(path).is_dir():
        ids, dir_vocab = load_token_dir(path)
        if vocab is not None and dir_vocab.tokens != vocab.tokens:
            raise RnnlmError(f"{path} was tokenized with another vocabulary than the model's")
        return ids, dir_vocab
    if vocab is None:
        ids, vocab, _ = tokenize_text(path, level, min_count, max_vocab, lowercase)
        return ids, vocab
    ids, _ = encode_file(path, vocab)
    return ids, vocab


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
