"""Learning curves from a training log (JSON lines written beside the model)."""

import json
import math
from pathlib import Path

from rnnlm.errors import RnnlmError


def read_log(path):
    """The records of a training log, in order; RnnlmError if it is missing or not JSON lines."""
    path = Path(path)
    if not path.is_file():
        raise RnnlmError(f"no such log file: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    raise RnnlmError(f"{path} line {number} is not JSON") from None
    if not any("train_loss" in r for r in records):
        raise RnnlmError(f"{path} has no training records")
    return records


def plot_log(log_path, out_path):
    """Draw train and validation perplexity against tokens seen into an image file (PNG, SVG, PDF)."""
    records = read_log(log_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RnnlmError("plotting needs matplotlib: pip install 'rnnlm[plot]'") from None
    train = [(r["tokens_seen"], math.exp(r["train_loss"])) for r in records if "train_loss" in r]
    valid = [(r["tokens_seen"], r["valid_perplexity"]) for r in records if r.get("valid_perplexity") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*zip(*train, strict=True), label="train (running mean over the epoch)", color="tab:blue", alpha=0.7)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation", color="tab:orange")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(Path(log_path).name)
    fig.tight_layout()
    try:
        fig.savefig(out_path)
    except (OSError, ValueError) as exc:
        raise RnnlmError(f"cannot write {out_path}: {exc}") from None
    finally:
        plt.close(fig)
    return {"records": len(records), "validations": len(valid), "output": str(out_path)}
