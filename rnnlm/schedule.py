"""The learning rate: the epoch-level schedules, and factors on their rate within an epoch.

Window k of a run (k = tokens seen / (T·B), counted over the whole run and never rolled back) trains at

    lr_k = lr_e · warmup(k) · guard(k) · schedule(progress_k)

with lr_e the rate the epoch-level schedule sets at each epoch's end (``Mikolov`` and ``Plateau`` halve
it after a stall) and schedule(progress_k) its factor within the epoch (1 but for ``Cosine``). Each is an
object; their state lives in the training state (``rnnlm.state.TrainState``: lr, halving, stalls,
guard_scale, guard_since), so a checkpoint carries it and a resumed run takes the same rates.
"""

import math

RECOVERY_WINDOWS = 1000  # the guard's recovery: one epoch's windows, at most this many
MIN_IMPROVEMENT = 0.003  # an epoch improving log validation perplexity by less than this stalls
PLATEAU_STOPS = 3


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


def improved(best, perplexity):
    """Whether validation ``perplexity`` improves on the ``best`` so far (None: none yet) by MIN_IMPROVEMENT."""
    return best is None or math.log(best) - math.log(perplexity) >= MIN_IMPROVEMENT


class Mikolov:
    """SGD's default: once an epoch stalls (``improved`` false) the rate is halved after every epoch, and
    training stops at the next stall. An epoch that made validation worse is rolled back."""

    rolls_back = True

    def factor(self, state):
        return 1.0

    def end_epoch(self, state, improved):
        """Update ``state``'s rate for the next epoch; True to stop."""
        stop = not improved and state.halving
        state.halving = state.halving or not improved
        if state.halving:
            state.lr /= 2
        return stop


class Plateau(Mikolov):
    """Adam's default: every stall halves the rate; training stops at the ``PLATEAU_STOPS``-th. An epoch
    that made validation worse is rolled back."""

    def end_epoch(self, state, improved):
        if improved:
            return False
        state.stalls += 1
        state.lr /= 2
        return state.stalls >= PLATEAU_STOPS


class Cosine:
    """The rate lowered after every window along half a cosine, from lr to 0 at the end of the run's
    ``total_tokens`` or of its time budget, whichever comes first: progress is the larger of the tokens'
    fraction and ``budget_fraction()`` (None: no budget; a run with one depends on the clock). Nothing
    happens at an epoch's end; no epoch is rolled back."""

    rolls_back = False

    def __init__(self, total_tokens, budget_fraction=None):
        self.total_tokens, self.budget_fraction = total_tokens, budget_fraction

    def factor(self, state):
        progress = state.tokens_seen / self.total_tokens
        if self.budget_fraction is not None:
            progress = max(progress, self.budget_fraction())
        return cosine(progress)

    def end_epoch(self, state, improved):
        return False


SCHEDULES = {"mikolov": Mikolov, "plateau": Plateau, "cosine": Cosine}


def cosine(progress):
    """Half a cosine from 1 at progress 0 down to 0 at progress 1 (and after)."""
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
