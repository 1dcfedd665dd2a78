"""The large-vocabulary configuration (benchmarks/large_vocab.py: a token store, the class softmax with its
bounds from the store's counts, lazy Adam) at toy size, through the CUDA backend under the simulator and on
the CPU."""

import numpy as np
import pytest

import rnnlm


def zipf_text(n_words, V, seed):
    """n_words words w0 .. w{V-1} drawn with p ∝ 1/rank, in lines of 6."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, V + 1)
    ids = rng.choice(V, n_words, p=p / p.sum())
    words = [f"w{i}" for i in ids]
    return "".join(" ".join(words[k:k + 6]) + "\n" for k in range(0, n_words, 6))


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_large_vocabulary_configuration_on_the_cuda_backend_gives_the_cpus_losses(tmp_path, tied):
    (tmp_path / "train.txt").write_text(zipf_text(96, 40, 0), encoding="utf-8")
    (tmp_path / "valid.txt").write_text(zipf_text(30, 40, 1), encoding="utf-8")
    rnnlm.tokenize(tmp_path / "train.txt", tmp_path / "store")
    vocab = rnnlm.Vocab.load(tmp_path / "store" / "vocab.json")
    rnnlm.tokenize(tmp_path / "valid.txt", tmp_path / "valid", vocab=vocab)
    config = rnnlm.TrainConfig(hidden=8, bptt=3, batch=2, epochs=2, optimizer="lazyadam", lr=0.01, softmax="class",
                               classes=4, tied=tied)
    runs = {}
    for device in ("cpu", "cuda"):
        records = rnnlm.train(tmp_path / "store", tmp_path / f"{device}.npz", valid=tmp_path / "valid",
                              config=config, options=rnnlm.RunOptions(device=device))
        runs[device] = records, rnnlm.load(tmp_path / f"{device}.npz")
    (cpu_records, cpu_model), (gpu_records, gpu_model) = runs["cpu"], runs["cuda"]
    assert len(cpu_records) == 2
    for key in ("train_loss", "valid_perplexity"):
        np.testing.assert_allclose([r[key] for r in gpu_records], [r[key] for r in cpu_records], rtol=1e-5)
    for name, array in cpu_model.params.items():
        np.testing.assert_allclose(gpu_model.params[name], array, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("shape", [(10, 7), (7, 10), (1, 33)])
def test_initial_weights_drawn_by_blocks_are_those_of_one_draw(shape):
    """model._scaled_normal draws a table a block of rows at a time (no float64 copy of a 10⁶-row table), and
    gives the numbers of the whole-array draw it replaced, so seeds keep their models."""
    from rnnlm.model import _scaled_normal

    whole = (np.random.default_rng(4).standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    np.testing.assert_array_equal(_scaled_normal(np.random.default_rng(4), shape, np.float32, block=16), whole)
