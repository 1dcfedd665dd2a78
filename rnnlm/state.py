"""The training state: a run's schedule and cursor, everything its checkpoint carries besides arrays.

``TrainState.to_json()`` is the checkpoint's ``meta.state`` object less what ``rnnlm.checkpoint`` adds
(the optimizer scalars and the dropout RNG), its keys in the order of the fields; ``from_json`` reads it
back (``checkpoint.check_state`` has checked it).
"""

from dataclasses import asdict, dataclass, field, fields


@dataclass
class TrainState:
    """epoch (1-based; the last + 1 once the run has ended) and window (the next one, within the epoch) are
    the cursor; epoch_loss the epoch's summed nats so far; lr the epoch-level rate, halving and stalls the
    schedule's marks (``rnnlm.schedule``);
    best the best validation perplexity (None before the first epoch ends); divergences so far; tokens_seen
    over the run (never rolled back); elapsed_s the run's time when written; records the log's records so
    far; guard_scale and guard_since the divergence guard's cut (``schedule.Guard``)."""

    epoch: int = 1
    window: int = 0
    epoch_loss: float = 0.0
    lr: float = 0.0
    halving: bool = False
    stalls: int = 0
    best: float | None = None
    divergences: int = 0
    tokens_seen: int = 0
    elapsed_s: float = 0.0
    records: list = field(default_factory=list)
    guard_scale: float = 1.0
    guard_since: int = 0

    def to_json(self):
        """The JSON object of this state, its keys in the order of the fields."""
        return asdict(self)

    @classmethod
    def from_json(cls, record):
        """The state of a checkpoint's JSON object holding every field (other keys are ignored: the
        ``tokens_per_s`` that older checkpoints may hold)."""
        return cls(**{f.name: record[f.name] for f in fields(cls)})
