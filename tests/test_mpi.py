"""Data-parallel training under MPI (``rnnlm.distributed``): ``mpirun -n 2 rnnlm train`` against one process
over the same B streams, ranks that cannot split the streams, a resume after a signal, a failing rank.

Skipped without mpi4py and an ``mpirun`` (the ``mpi`` extra installs both, with MPICH). Open MPI refuses to
run as root and to start more ranks than cores unless told: its flags are added when it is the one found.
"""

import importlib.util
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnlm import RnnlmError, distributed

REPO = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
under_mpirun = pytest.mark.skipif(MPIRUN is None or importlib.util.find_spec("mpi4py") is None,
                                  reason="needs mpi4py and mpirun (the mpi extra)")

TINY = ["--hidden", "16", "--bptt", "5", "--batch", "4", "--epochs", "2", "--threads", "1"]
RECIPES = {
    "full softmax, SGD": ["--softmax", "full", "--optimizer", "sgd", "--lr", "0.5"],
    "class softmax, lazy Adam, dropout": ["--softmax", "class", "--classes", "4", "--optimizer", "lazyadam",
                                          "--dropout", "0.3"],
    "hierarchical softmax, lazy Adam": ["--softmax", "hs", "--optimizer", "lazyadam"],
}


def test_only_a_launcher_with_several_processes_or_rnnlm_mpi_means_mpi(monkeypatch):
    for name in (*distributed.LAUNCHER_SIZES, "PMIX_RANK", "RNNLM_MPI"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.launched()
    monkeypatch.setenv("PMI_SIZE", "1")
    assert not distributed.launched()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert distributed.launched()
    monkeypatch.setenv("RNNLM_MPI", "0")
    assert not distributed.launched()


def test_a_launcher_without_mpi4py_is_an_error_that_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.delenv("RNNLM_MPI", raising=False)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py fails
    monkeypatch.setattr(distributed, "_world", None)
    with pytest.raises(RnnlmError, match=r"needs mpi4py: pip install 'rnnlm-numba\[mpi\]'"):
        distributed.world()


def test_plain_import_and_a_lone_run_leave_mpi4py_unloaded():
    code = "import sys, rnnlm; from rnnlm import distributed; print(distributed.world().size, 'mpi4py' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k not in (*distributed.LAUNCHER_SIZES, "PMIX_RANK", "RNNLM_MPI")}
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.stdout.split() == ["1", "False"], run.stderr


def test_a_ranks_dropout_masks_are_its_streams_of_the_whole_windows_masks():
    sliced = distributed._SlicedRng(np.random.default_rng(3), 4, slice(2, 4))
    whole = np.random.default_rng(3)
    for _ in range(2):
        np.testing.assert_array_equal(sliced.random((5, 2, 3)), whole.random((5, 4, 3))[:, 2:4])
    assert sliced.bit_generator.state == whole.bit_generator.state


def test_the_ranks_of_a_node_take_one_gpu_each(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # so that the test's own setting is undone too
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    (tmp_path / "0000:01:00.0").mkdir()
    distributed._one_gpu_each(3, tmp_path)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # one GPU: nothing to share out
    for bus in ("0000:02:00.0", "0000:03:00.0"):
        (tmp_path / bus).mkdir()
    distributed._one_gpu_each(4, tmp_path)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    distributed._one_gpu_each(2, tmp_path)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # set by the user (here: above): kept


def test_the_ranks_of_a_node_share_its_cores_unless_bound_to_their_own(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert distributed._share_of_cores(4) == 4
    assert distributed._share_of_cores(32) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 3})  # bound by the launcher
    assert distributed._share_of_cores(4) == 2


def mpirun(n, *args, timeout=120):
    """``mpirun -n n python *args`` in the repository, its CompletedProcess (text)."""
    flags = []
    version = subprocess.run([MPIRUN, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        flags = ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    env = {k: v for k, v in os.environ.items() if k != "RNNLM_MPI"}
    return subprocess.run([MPIRUN, *flags, "-n", str(n), sys.executable, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def train_command(corpus, model, *options):
    return ["-m", "rnnlm", "train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"), "-o", str(model),
            *TINY, *options]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    words = ["the", "a", "cat", "dog", "sat", "on", "mat", "and", "ran", "fast", "slow", "big", "red"]
    for name, lines in (("train.txt", 600), ("valid.txt", 60)):
        text = "".join(" ".join(rng.choices(words, k=rng.randint(3, 12))) + "\n" for _ in range(lines))
        (folder / name).write_text(text)
    return folder


def weights(path):
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files if npz[name].dtype.kind == "f"}


@pytest.mark.slow
@under_mpirun
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_ranks_end_with_the_one_process_model(corpus, tmp_path, recipe):
    alone = subprocess.run([sys.executable, *train_command(corpus, tmp_path / "one.npz", *RECIPES[recipe])],
                           cwd=REPO, capture_output=True, text=True)
    assert alone.returncode == 0, alone.stderr
    both = mpirun(2, *train_command(corpus, tmp_path / "two.npz", *RECIPES[recipe]))
    assert both.returncode == 0, both.stderr
    assert both.stdout.count("epoch 1:") == 1 and both.stdout.count("model written") == 1  # rank 0 alone prints
    one, two = weights(tmp_path / "one.npz"), weights(tmp_path / "two.npz")
    assert one.keys() == two.keys()
    for name in one:  # the sums run in another order: equal to float32 rounding, not to the bit
        np.testing.assert_allclose(two[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.slow
@under_mpirun
@pytest.mark.parametrize(("ranks", "batch", "message"), [
    (3, 2, "3 MPI processes but only 2 streams (--batch 2)"),
    (2, 3, "--batch 3 cannot be split evenly over 2 MPI processes"),
])
@pytest.mark.slow
def test_streams_that_the_ranks_cannot_split_are_an_error(corpus, tmp_path, ranks, batch, message):
    run = mpirun(ranks, *train_command(corpus, tmp_path / "model.npz", "--batch", str(batch)))
    assert run.returncode != 0
    assert f"Error: {message}" in run.stderr
    assert "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []


INTERRUPT = """
import os, signal, sys
import rnnlm

def on_window(done, total, stats):
    if done == 7 and rnnlm.distributed.world().rank == 1:  # a signal that reaches one rank only
        os.kill(os.getpid(), signal.SIGTERM)

config = rnnlm.TrainConfig(hidden=16, bptt=5, batch=4, epochs=2, dropout=0.3, optimizer="adam",
                           softmax="class", classes=4)
try:
    rnnlm.train(sys.argv[1], sys.argv[2], valid=sys.argv[3], config=config, options=rnnlm.RunOptions(threads=1),
                on_window=on_window)
except rnnlm.TrainingInterrupted:
    sys.exit(130)
"""


@pytest.mark.slow
@under_mpirun
def test_a_signal_on_one_rank_stops_all_and_resume_ends_as_the_uninterrupted_run(corpus, tmp_path):
    (tmp_path / "interrupt.py").write_text(INTERRUPT)
    model = tmp_path / "resumed.npz"
    stopped = mpirun(2, str(tmp_path / "interrupt.py"), str(corpus / "train.txt"), str(model),
                     str(corpus / "valid.txt"))
    assert stopped.returncode == 130, stopped.stderr
    resumed = mpirun(2, "-m", "rnnlm", "train", str(corpus / "train.txt"), "--valid", str(corpus / "valid.txt"),
                     "--resume", str(tmp_path / "resumed.ckpt.npz"))
    assert resumed.returncode == 0, resumed.stderr
    whole = mpirun(2, *train_command(corpus, tmp_path / "whole.npz", "--dropout", "0.3", "--optimizer", "adam",
                                     "--softmax", "class", "--classes", "4"))
    assert whole.returncode == 0, whole.stderr
    assert model.read_bytes() == (tmp_path / "whole.npz").read_bytes()


FAILING = """
import sys
import rnnlm
from rnnlm import distributed

def on_epoch(record):
    if record["epoch"] == 2 and distributed.world().rank == 1:
        raise rnnlm.RnnlmError("rank 1 failed")

config = rnnlm.TrainConfig(hidden=16, bptt=5, batch=4, epochs=3)
with distributed.failing_together():
    rnnlm.train(sys.argv[1], sys.argv[2], options=rnnlm.RunOptions(threads=1), on_epoch=on_epoch)
"""


@pytest.mark.slow
@under_mpirun
def test_a_failing_rank_ends_every_rank_and_the_last_checkpoint_stays(corpus, tmp_path):
    from rnnlm.checkpoint import read_checkpoint

    (tmp_path / "failing.py").write_text(FAILING)
    run = mpirun(2, str(tmp_path / "failing.py"), str(corpus / "train.txt"), str(tmp_path / "model.npz"), timeout=60)
    assert run.returncode != 0
    assert [line for line in run.stderr.splitlines() if line.startswith("Error:")] == ["Error: rank 1 failed"]
    _, meta = read_checkpoint(tmp_path / "model.ckpt.npz")
    assert meta["state"]["epoch"] == 2  # written at the end of epoch 1, before the failure
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]  # no temporary files
