"""rnnlm: recurrent-neural-network language models with Numba kernels."""

from rnnlm import _env  # noqa: F401  (thread and cache settings before numpy and numba load)
from rnnlm._version import __version__

__all__ = ["__version__"]
