"""Data-parallel training over MPI processes: ``mpirun -n N rnnlm train ...``.

A run is distributed when an MPI launcher started it with N > 1 processes (its environment says so, or
``RNNLM_MPI=1`` asks for MPI); only then is mpi4py imported (the ``mpi`` extra). ``world()`` is then a
``Reducer`` over MPI's COMM_WORLD, otherwise ``SINGLE``, whose every method leaves the one-process run as
it is.

The B streams of a window are split over the ranks in blocks of b = B / N: rank r runs forward and backward
over streams [r·b, (r + 1)·b) and its gradients are of the mean loss of its b streams. Per step, every
rank sends (MPI allreduce, each a sum but the masks):

1. the masks of the rows with a slot in the sparse gradients, (V,) uint8 for W_x's columns (untied) and for
   the class softmax's W_o rows, combined by MAX into their union (whose rows then take the first slots);
2. one float32 buffer: every dense gradient (W_s and b_s of each layer, W_in between layers, b_o, the full
   softmax's W_o, the class softmax's W_c and b_c) and then the union's rows of each sparse gradient,
   divided by N after the sum;
3. the window's loss (float64).

Every rank then holds the gradient of the mean loss over all B streams, applies the same update and keeps
an identical model. Dropout masks are drawn for the whole (T, B) window from the generator every rank
carries and sliced per rank, so that neither the masks nor the model depend on N. What depends on the
clock or on a signal (the time budget, ``--checkpoint-every``, the cosine schedule under a budget,
SIGINT/SIGTERM) and the validation loss are agreed on (rank 0's value, or any rank's signal), so that every
rank takes the same path. Rank 0 alone writes the model, the log and the checkpoint, which holds the
carried states of all B streams (gathered), so that ``--resume`` restores each rank's own. Without
``--threads`` the ranks of a node share its cores; with ``--device cuda`` the ranks of a node with several
GPUs take one each.
"""

import os
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rnnlm import step
from rnnlm._env import set_threads
from rnnlm.errors import RnnlmError

LAUNCHER_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # Open MPI, MPICH/Intel, MVAPICH

ABORT_GRACE_S = 0.5  # seconds for mpirun to forward the last lines of a failing rank


def launched():
    """Whether this process is one of several that an MPI launcher started (or ``RNNLM_MPI=1``)."""
    asked = os.environ.get("RNNLM_MPI")
    if asked in ("0", "1"):
        return asked == "1"
    sizes = (os.environ.get(name, "") for name in LAUNCHER_SIZES)
    return "PMIX_RANK" in os.environ or any(size.isdigit() and int(size) > 1 for size in sizes)


class Single:
    """One process: every hook leaves the run as it is."""

    rank, size, is_writer = 0, 1, True

    def streams(self, array, axis=1):
        """This rank's streams of an array with B streams along ``axis``."""
        return array

    def gather_streams(self, array):
        """The (B, ...) array of every rank's (b, ...) streams, in rank order."""
        return array

    def mask_rng(self, rng, batch):
        """The generator of the dropout masks (T, b, m): the whole window's (T, B, m), this rank's streams."""
        return rng

    def reduce(self, ops, grads, window, loss):
        """Combine the window's gradients across ranks (in place) and return the loss summed over them."""
        return loss

    def on_writer(self, write, *args):
        """write(*args) on rank 0 alone (which writes every file of the run)."""
        return write(*args)

    def agree(self, value):
        """Rank 0's ``value`` (a picklable object) on every rank."""
        return value

    def any(self, flag):
        """Whether ``flag`` is true on any rank."""
        return bool(flag)


SINGLE = Single()
_world = None


def world():
    """The ``Reducer`` over COMM_WORLD when launched by MPI with several processes, else ``SINGLE``."""
    global _world
    if _world is None:
        if not launched():
            _world = SINGLE
            return _world
        try:
            from mpi4py import MPI
        except ImportError:
            raise RnnlmError("this process was started by an MPI launcher, which needs mpi4py: "
                             "pip install 'rnnlm-numba[mpi]' (or RNNLM_MPI=0 to run alone)") from None
        _world = Reducer(MPI.COMM_WORLD) if MPI.COMM_WORLD.Get_size() > 1 else SINGLE
    return _world


class _SlicedRng:
    """Draws the whole window's dropout masks and gives this rank its streams' part; ``bit_generator`` is
    the shared generator's (a checkpoint saves and restores its state)."""

    def __init__(self, rng, batch, streams):
        self.rng, self.batch, self.streams = rng, batch, streams
        self.bit_generator = rng.bit_generator

    def random(self, shape):
        T, _, *rest = shape
        return self.rng.random((T, self.batch, *rest))[:, self.streams]


def _one_gpu_each(local_rank, gpus=Path("/proc/driver/nvidia/gpus")):
    """Give the ranks of a node with several NVIDIA GPUs one each, round robin by their rank on the node,
    unless CUDA_VISIBLE_DEVICES already says which (effective before CUDA starts in this process)."""
    count = len(list(gpus.iterdir())) if gpus.is_dir() else 0
    if count > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(local_rank % count)


def _share_of_cores(local_size):
    """A rank's default thread count: the cores it may run on, shared with the other ranks of its node
    unless the launcher bound it to cores of its own."""
    allowed = len(os.sched_getaffinity(0))
    return max(1, allowed // local_size) if allowed == os.cpu_count() else allowed


def _host(ops, array):
    """A numpy array of ``array``: itself on the CPU (edits reach the backend array), else a copy."""
    return array if isinstance(array, np.ndarray) else ops.to_numpy(array)


def _reslot(ops, slots, rows):
    """Give ``rows`` (increasing) slots 0, 1, …, the other rows none: slots = (slot, claimed) arrays."""
    slot, claimed = slots
    new = np.full(slot.shape, -1, np.int32)
    new[rows] = np.arange(len(rows), dtype=np.int32)
    ops.copy_into(new, slot)
    ops.copy_into(np.array([len(rows)], np.int32), claimed)


class Reducer(Single):
    """The hooks over an mpi4py communicator of N > 1 ranks."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.is_writer = self.rank == 0
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        _one_gpu_each(node.Get_rank())
        set_threads(_share_of_cores(node.Get_size()))  # the default; --threads overrides it
        node.Free()

    def _block(self, batch):
        """The slice of streams of this rank out of ``batch``."""
        if self.size > batch:
            raise RnnlmError(f"{self.size} MPI processes but only {batch} streams (--batch {batch}): "
                             f"start at most {batch} processes")
        if batch % self.size:
            raise RnnlmError(f"--batch {batch} cannot be split evenly over {self.size} MPI processes: "
                             f"give a multiple of {self.size}")
        b = batch // self.size
        return slice(self.rank * b, (self.rank + 1) * b)

    def streams(self, array, axis=1):
        block = (slice(None),) * axis + (self._block(array.shape[axis]),)
        return np.ascontiguousarray(array[block])

    def gather_streams(self, array):
        array = np.ascontiguousarray(array)
        gathered = np.empty((self.size, *array.shape), array.dtype)
        self.comm.Allgather(array, gathered)
        return gathered.reshape(-1, *array.shape[1:])

    def mask_rng(self, rng, batch):
        return _SlicedRng(rng, batch, self._block(batch))

    def on_writer(self, write, *args):
        return write(*args) if self.is_writer else None

    def agree(self, value):
        return self.comm.bcast(value, root=0)

    def any(self, flag):
        return self.comm.allreduce(bool(flag), op=self.MPI.LOR)

    def reduce(self, ops, grads, window, loss):
        sparse = step.sparse_names(window)
        union = self._union(ops, sparse)
        host = {name: _host(ops, step.rows(name, grads[name])) for name in step.trainable(grads, window)}
        pieces = {name: host[name] for name in host if name not in sparse}  # dense ones as views
        pieces.update({name: step.unslotted(host[name], _host(ops, sparse[name][0]), union[name]) for name in sparse})
        buffer = np.concatenate([piece.ravel() for piece in pieces.values()])
        self.comm.Allreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)
        buffer *= np.float32(1.0 / self.size)
        start = 0
        for name, piece in pieces.items():
            summed = buffer[start:start + piece.size].reshape(piece.shape)
            start += piece.size
            if name in sparse:  # the union's rows take the first slots, in row order
                _reslot(ops, sparse[name], union[name])
            host[name][:len(summed)] = summed
            if name == "W_o" and window.dW_o_norm is not None and not window.tied:  # as class_xent_grad gives it
                ops.copy_into(np.array([np.sqrt(np.sum(np.square(summed, dtype=np.float64)))]), window.dW_o_norm)
            if not isinstance(grads[name], np.ndarray):
                ops.copy_into(host[name], step.rows(name, grads[name]))
        return self.comm.allreduce(float(loss), op=self.MPI.SUM)

    def _union(self, ops, sparse):
        """The rows with a slot on some rank, by name (increasing row indices)."""
        if not sparse:
            return {}
        union = np.concatenate([(_host(ops, slot) >= 0).astype(np.uint8) for slot, _ in sparse.values()])
        self.comm.Allreduce(self.MPI.IN_PLACE, union, op=self.MPI.MAX)
        cuts = np.cumsum([slot.shape[0] for slot, _ in sparse.values()])[:-1]  # W_o's rows need not be V
        return {name: np.flatnonzero(part) for name, part in zip(sparse, np.split(union, cuts), strict=True)}

    def abort(self, code):
        """End every rank of the job now (MPI_Abort), after a moment for the launcher to forward what this rank
        printed: MPI_Abort tears the job down at once, and a line still in transit to mpirun is lost."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(code)


def _report(line):
    print(line, file=sys.stderr, flush=True)


@contextmanager
def failing_together(passing=(), report=_report):
    """Under MPI, an exception on this rank (but SystemExit and the ``passing`` types, which every rank raises
    alike before any collective) is reported in one line by ``report`` (after the traceback of an unexpected
    one) and ends every rank with exit status 1, instead of leaving the others waiting in a collective.
    Usable as a decorator. Alone, exceptions pass unchanged."""
    try:
        yield
    except (SystemExit, *passing):
        raise
    except BaseException as error:
        reducer = _world
        if not isinstance(reducer, Reducer):
            raise
        if isinstance(error, KeyboardInterrupt):
            report(f"interrupted (MPI rank {reducer.rank})")
        elif isinstance(error, RnnlmError):
            report(f"Error: {error}")
        else:
            traceback.print_exc()
            report(f"Error: MPI rank {reducer.rank}: {type(error).__name__}: {error}")
        reducer.abort(1)
