"""The trainer's parameters on the host and in its checkpoints: the best model, the epoch's start, writing and
restoring checkpoints (``Checkpoints``, a part of ``rnnlm.train.Trainer``).

The epoch's start, which a rolled-back epoch or a divergence restores (weights and optimizer state), is kept
in the checkpoint on disk by the rank that writes it: a checkpoint is written at a run's start and at every
epoch's end, so that the epoch's start is always its ``params/`` and ``optimizer/`` members, carried into each
later checkpoint of the epoch as its ``epoch_start/`` members (``rnnlm.stored.StoredArray``, copied from the
file being replaced). Restoring reads them back a piece at a time: the same bits as an in-memory copy, without
the gigabytes of one at a vocabulary of 10⁶. The other ranks of an MPI run keep host copies (``snapshot``).
"""

import time
from dataclasses import asdict

import numpy as np

from rnnlm import runplan
from rnnlm.checkpoint import Saved, write_checkpoint
from rnnlm.state import TrainState
from rnnlm.stored import StoredArray, put


def _equal(a, b, rows=1 << 14):
    """Whether two C-contiguous arrays hold the same bits (-0.0 is not 0.0), compared a block of rows at a
    time (no temporary as large as a)."""
    if a.shape != b.shape or a.dtype != b.dtype or not (a.flags.c_contiguous and b.flags.c_contiguous):
        return False
    return all(np.array_equal(a[k:k + rows].view(np.uint8), b[k:k + rows].view(np.uint8))
               for k in range(0, len(a), rows))


class Checkpoints:
    """The host side of a ``Trainer``: needs its ops, params, trainable, optimizer, model, window, state, rng,
    reducer, config, options, paths, checkpoint_path and clock. checkpoint_is_now: whether the checkpoint on
    disk holds the parameters and optimizer as they are now (cleared by every change to them)."""

    epoch_start = None  # (params by name, (optimizer arrays by name, optimizer scalars)): see ``snapshot``
    checkpoint_is_now = False

    def pull_params(self):
        """Copy the device parameters into the model (the best so far)."""
        for name in self.trainable:
            self.model.params[name] = np.ascontiguousarray(self.ops.to_numpy(self.params[name]), np.float32)
        if self.model.tied:
            self.model.params["W_x"] = self.model.params["W_o"].T

    def push_params(self):
        """Restore the device parameters from the model (roll back to the best so far)."""
        for name in self.trainable:
            self.ops.copy_into(self.model.params[name], self.params[name])
        self.checkpoint_is_now = False

    def mark_epoch_start(self):
        """Keep the parameters and optimizer as they are now as the epoch's start: on the writing rank, the
        checkpoint's members (written first unless it holds them), elsewhere host copies."""
        if not self.reducer.is_writer:
            self.epoch_start = self.snapshot()
            return
        if not self.checkpoint_is_now:
            self.epoch_start = self.snapshot(copy=False)
            self.write_checkpoint()
        self.epoch_start = self.stored_snapshot("", self.optimizer.state(copy=False)[1])

    def stored_snapshot(self, prefix, scalars):
        """The snapshot whose arrays are the members ``prefix + "params/" ...`` and ``prefix + "optimizer/" ...``
        of the checkpoint on disk, with the optimizer ``scalars``."""
        path = self.checkpoint_path
        params = {name: StoredArray.like(path, f"{prefix}params/{name}", self.params[name]) for name in self.trainable}
        arrays = {name: StoredArray.like(path, f"{prefix}optimizer/{name}", array)
                  for name, array in self.optimizer.arrays().items()}
        return params, (arrays, scalars)

    def snapshot(self, copy=True):
        """The parameters and the optimizer state on the host: (params by name, (arrays, scalars)).

        copy: copies that later steps leave as they are, where a parameter equal to the best model's is that
        array itself (the best model's arrays are replaced, never written into); else (a checkpoint being
        written now) the CPU's arrays themselves.
        """
        params = {}
        for name in self.trainable:
            array, best = self.params[name], self.model.params[name]
            on_host = isinstance(array, np.ndarray)
            if copy and on_host and _equal(array, best):
                params[name] = best
            else:
                params[name] = self.ops.to_numpy(array) if copy or not on_host else array
        return params, self.optimizer.state(copy)

    def restore_snapshot(self, snapshot):
        """Set the parameters and the optimizer to a ``snapshot`` (host arrays or stored members)."""
        params, (arrays, scalars) = snapshot
        for name, array in params.items():
            put(self.ops, array, self.params[name])
        self.optimizer.load_state(arrays, scalars)
        self.checkpoint_is_now = False

    def write_checkpoint(self):
        """Everything needed to continue (``rnnlm.checkpoint``), written by the writer rank."""
        carried = [self.reducer.gather_streams(self.ops.to_numpy(S[0])) for S in self.window.S]
        state = dict(self.state.to_json(), elapsed_s=time.perf_counter() - self.clock)
        saved = Saved(self.snapshot(copy=False), self.epoch_start, self.model.params, carried,
                      self.rng.bit_generator.state, state)
        sources, options = runplan.stored_paths(self.paths, asdict(self.options))
        settings = {"config": asdict(self.config), "options": options, "sources": sources,
                    "vocab": self.model.vocab.tokens}
        self.reducer.on_writer(write_checkpoint, self.checkpoint_path, settings, saved, self.model.class_bounds)
        self.last_checkpoint = time.perf_counter()
        if self.reducer.is_writer:  # the epoch's start is now the new file's copy
            self.epoch_start = self.stored_snapshot("epoch_start/", self.epoch_start[1][1])
            self.checkpoint_is_now = True

    def restore(self, saved):
        """Load a checkpoint's ``Saved`` run into this freshly built trainer (its arrays in memory or stored:
        another rank than the writer copies stored ones into memory)."""
        self.restore_snapshot(saved.now)
        params, (arrays, scalars) = saved.epoch_start
        if not self.reducer.is_writer:
            params, arrays = ({name: _in_memory(a) for name, a in group.items()} for group in (params, arrays))
        self.epoch_start = params, (arrays, scalars)
        for S, carried in zip(self.window.S, saved.carried, strict=True):
            self.ops.copy_into(self.reducer.streams(carried, axis=0), S[0])
        self.rng.bit_generator.state = saved.rng
        self.state = TrainState.from_json(saved.state)
        self.start_log()
        if self.state.best is not None:  # the model file may be another than the interrupted run's
            self.save_model()


def _in_memory(array):
    return array.to_numpy() if isinstance(array, StoredArray) else array
