"""rnnlm: recurrent-neural-network language models with Numba kernels for the CPU and NVIDIA GPUs.

The Python API that the ``rnnlm`` command wraps::

    import rnnlm
    rnnlm.tokenize("train.txt", "tokens/")                  # vocab.json + tokens.npy
    rnnlm.train("train.txt", "model.npz", valid="valid.txt")
    model = rnnlm.load("model.npz")
    rnnlm.perplexity(model, "test.txt")                     # {"perplexity", "bits_per_token", ...}
    texts, _ = rnnlm.sample(model, prompt="the", num=3)
    rnnlm.score(model, ["the cat sat", "a dog"])             # ln p of each sentence, <eos> included
    decoder = rnnlm.Decoder(model)                          # step by step, for beam search
"""

from rnnlm import _env  # noqa: F401  (thread and cache settings before numpy and numba load)
from rnnlm._version import __version__
from rnnlm.errors import RnnlmError
from rnnlm.evaluate import perplexity
from rnnlm.model import Model
from rnnlm.sample import sample
from rnnlm.score import Decoder, score
from rnnlm.tokenizer import Vocab
from rnnlm.tokenizer import tokenize_file as tokenize
from rnnlm.train import RunOptions, TrainConfig, TrainingInterrupted, resume, train

load = Model.load

__all__ = [
    "Decoder", "Model", "RnnlmError", "RunOptions", "TrainConfig", "TrainingInterrupted", "Vocab", "__version__",
    "load", "perplexity", "resume", "sample", "score", "tokenize", "train",
]
