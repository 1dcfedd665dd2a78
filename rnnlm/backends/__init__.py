"""The kernels behind one interface: ``cpu`` (Numba ``@njit``) and ``cuda`` (``numba.cuda``).

Both modules define the same functions with the same signatures; ``rnnlm.step`` composes them.
"""

from rnnlm.errors import RnnlmError

DEVICES = ("cpu", "cuda", "auto")


def cuda_available():
    """True when numba.cuda finds a usable GPU (or runs under NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba import cuda
    except ImportError:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # a broken driver install reports itself here: treat it as no GPU
        return False


def get_backend(device="cpu"):
    """The kernel module for ``device``: 'cpu', 'cuda', or 'auto' (CUDA when available)."""
    if device not in DEVICES:
        raise RnnlmError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
    if device == "auto":
        device = "cuda" if cuda_available() else "cpu"
    if device == "cpu":
        from rnnlm.backends import cpu

        return cpu
    if not cuda_available():
        raise RnnlmError(
            "--device cuda needs an NVIDIA GPU with a working driver and numba-cuda: "
            "pip install 'rnnlm[cuda]' (none was found; use --device cpu)"
        )
    from rnnlm.backends import cuda

    return cuda
