"""Learning curves from a training log (JSON lines written beside the model).

The log is read as untrusted: every line must be a small JSON object, and the fields the curves use are
checked (``tokens_seen`` a count, ``train_loss`` a finite loss, ``valid_perplexity`` a positive number or
null); anything else is one ``RnnlmError`` naming the line.
"""

import json
import math
import stat
from pathlib import Path

from rnnlm.errors import RnnlmError
from rnnlm.paths import atomic_output, check_outputs

MAX_LINE_BYTES = 1 << 16  # a record is a few hundred bytes
MAX_LOSS = 700.0  # nats per token: exp of it is still a float
FORMATS = ("png", "svg", "pdf", "jpg", "jpeg", "eps", "ps", "webp", "tif", "tiff")


def _number(record, key, least, most, where):
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not least <= value <= most:
        raise RnnlmError(f"{where}: {key} must be a number from {least:g} to {most:g}, got {value!r:.40}")
    return value


def _check_record(record, where):
    """The record itself, once its fields that the curves use are checked."""
    if not isinstance(record, dict):
        raise RnnlmError(f"{where} is not a JSON object")
    if "train_loss" in record or record.get("valid_perplexity") is not None:
        for key in ("tokens_seen", "train_loss"):
            if key not in record:
                raise RnnlmError(f"{where} has no '{key}' field")
        _number(record, "tokens_seen", 0, math.inf, where)
        _number(record, "train_loss", 0, MAX_LOSS, where)
        if record.get("valid_perplexity") is not None:
            _number(record, "valid_perplexity", 1, math.exp(MAX_LOSS), where)
    return record


def _parse(raw, where):
    if len(raw) > MAX_LINE_BYTES:
        raise RnnlmError(f"{where} is longer than {MAX_LINE_BYTES:,} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RnnlmError(f"{where} is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise RnnlmError(f"{where} is nested too deeply") from None
    except ValueError:
        raise RnnlmError(f"{where} is not JSON") from None


def read_log(path):
    """The records of a training log, in order; RnnlmError if it is missing or not a training log."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        raise RnnlmError(f"no such log file: {path}") from None
    if not stat.S_ISREG(mode):
        raise RnnlmError(f"{path} is not a regular file, expected a training log (MODEL.log.jsonl)")
    records = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if raw.strip():
                    records.append(_check_record(_parse(raw, f"{path} line {number}"), f"{path} line {number}"))
    except OSError as exc:
        raise RnnlmError(f"cannot read {path}: {exc.strerror}") from None
    if not any("train_loss" in r for r in records):
        raise RnnlmError(f"{path} has no training records")
    return records


def image_format(out_path):
    """The image format of ``out_path``, told by its suffix; RnnlmError for one that cannot be drawn."""
    kind = Path(out_path).suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise RnnlmError(f"-o {out_path}: the image's name must end with one of "
                         f"{', '.join('.' + f for f in FORMATS)}")
    return kind


def plot_log(log_path, out_path):
    """Draw train and validation perplexity against tokens seen into an image file (PNG, SVG, PDF).

    The image is checked before the log is read (not the log itself, a writable file, a known format)
    and written atomically.
    """
    check_outputs([("-o", out_path)], inputs=[("LOG", log_path)])
    kind = image_format(out_path)
    records = read_log(log_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RnnlmError("plotting needs matplotlib: pip install 'rnnlm-numba[plot]'") from None
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
        with atomic_output(out_path) as f:
            fig.savefig(f, format=kind)
    finally:
        plt.close(fig)
    return {"records": len(records), "validations": len(valid), "output": str(out_path)}
