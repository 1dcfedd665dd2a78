"""The learning rate within an epoch: factors on the rate that the epoch-level schedule sets.

Window k of a run (k = tokens seen / (T·B), counted over the whole run and never rolled back) trains at

    lr_k = lr_e · warmup(k) · guard(k) · cosine(progress_k)

with lr_e the rate of the epoch-level schedule (``mikolov`` and ``plateau`` halve it after a stall), the
cosine factor only under ``--schedule cosine``. Each factor is an object; the guard's state lives in the
training state (``rnnlm.state.TrainState``: guard_scale, guard_since), so a checkpoint carries it and a
resumed run takes the same rates.
"""

import math

RECOVERY_WINDOWS = 1000  # the guard's recovery: one epoch's windows, at most this many


class Warmup:
    """A linear warm-up over the first ``windows`` windows of a run: window k < W trains at (k + 1)/W of
    the rate, every later one at the rate; W = 0 is none."""

    def __init__(self, windows):
        self.windows = windows

    def factor(self, k):
        return 1.0 if k >= self.windows else (k + 1) / self.windows


class Guard:
    """The divergence guard's temporary cut: after a divergence at window d the rate is multiplied by s,
    which returns linearly to 1 over the next ``recovery`` windows, s + (1 - s)·min(1, (k - d)/recovery).
    A divergence cuts the factor it finds in half: s = guard(d)/2, so divergences close together compound
    and one after a full recovery halves the whole rate again. s and d are the state's guard_scale and
    guard_since (1 and 0 before any divergence)."""

    def __init__(self, recovery):
        self.recovery = max(1, recovery)

    def factor(self, state, k):
        scale, since = state.guard_scale, state.guard_since
        return scale + (1.0 - scale) * min(1.0, max(0, k - since) / self.recovery)

    def diverged(self, state, k):
        """Note a divergence at window k in ``state``: the rate from k on is half of what it was."""
        state.guard_scale, state.guard_since = self.factor(state, k) / 2, k


def cosine(progress):
    """Half a cosine from 1 at progress 0 down to 0 at progress 1 (and after)."""
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
