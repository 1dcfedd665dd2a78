"""The trainer's parameters on the host and in its checkpoints: the best model, the epoch's start, writing and
restoring checkpoints (``Checkpoints``, a part of ``rnnlm.train.Trainer``).

The rank that writes the checkpoint keeps neither the best model nor the epoch's start (weights and optimizer
state, which a rolled-back epoch or a divergence restores) in memory, but in the checkpoint on disk: one is
written at a run's start and at every epoch's end, so that the epoch's start is always its ``params/`` and
``optimizer/`` members, and the best model its ``best/`` ones (or, from an improvement to the checkpoint that
follows it at once, the live parameters). Each later checkpoint copies them from the file it replaces
(``rnnlm.stored.StoredArray``); restoring reads them back a piece at a time: the same bits as an in-memory copy,
without the gigabytes of one at a vocabulary of 10⁶. The other ranks of an MPI run keep host copies.
"""

import time
from dataclasses import asdict

import numpy as np

from rnnlm import runplan
from rnnlm.checkpoint import Saved, write_checkpoint
from rnnlm.state import TrainState
from rnnlm.stored import in_memory, put, stored_as


def _equal(a, b, rows=1 << 14):
    """Whether two arrays both C-contiguous (or both Fortran-contiguous) hold the same bits (-0.0 is not 0.0),
    compared a block of rows at a time (no temporary as large as a)."""
    if a.flags.f_contiguous and b.flags.f_contiguous and not a.flags.c_contiguous:
        a, b = a.T, b.T
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
        """Make the device parameters the model (the best so far): the writer's CPU arrays themselves (the
        checkpoint that follows stores them), else host copies."""
        for name in self.trainable:
            array = self.params[name]
            live = self.reducer.is_writer and isinstance(array, np.ndarray)
            self.model.params[name] = array if live else self.ops.to_numpy(array)
        if self.model.tied:
            self.model.params["W_x"] = self.model.params["W_o"].T

    def push_params(self):
        """Restore the device parameters from the model (roll back to the best so far)."""
        for name in self.trainable:
            put(self.ops, self.model.params[name], self.params[name])
        self.checkpoint_is_now = False

    def mark_epoch_start(self):
        """Keep the parameters and optimizer as they are now as the epoch's start: on the writing rank, the
        checkpoint's members (written first unless it holds them), elsewhere host copies."""
        writer = self.reducer.is_writer
        if not self.checkpoint_is_now:  # every rank: a checkpoint gathers the ranks' carried states
            self.epoch_start = self.snapshot(copy=not writer)
            self.write_checkpoint()
        elif not writer:
            self.epoch_start = self.snapshot()
        if not writer:
            return
        path, scalars = self.checkpoint_path, self.optimizer.state(copy=False)[1]
        self.epoch_start = (stored_as(path, "params/", {name: self.params[name] for name in self.trainable}),
                            (stored_as(path, "optimizer/", self.optimizer.arrays()), scalars))

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
        self.reducer.on_writer(write_checkpoint, self.checkpoint_path, settings, saved, self.model.structure_arrays())
        self.last_checkpoint = time.perf_counter()
        if self.reducer.is_writer:  # the best model and the epoch's start are now the new file's copies
            path, (params, (arrays, scalars)) = self.checkpoint_path, self.epoch_start
            self.epoch_start = (stored_as(path, "epoch_start/params/", params),
                                (stored_as(path, "epoch_start/optimizer/", arrays), scalars))
            self.model.params = stored_as(path, "best/", self.model.params)
        self.checkpoint_is_now = True

    def restore(self, saved):
        """Load a checkpoint's ``Saved`` run into this freshly built trainer (its arrays in memory or stored; the
        writer keeps the best model stored, another rank copies the epoch's start into memory)."""
        self.restore_snapshot(saved.now)
        params, (arrays, scalars) = saved.epoch_start
        if self.reducer.is_writer:
            self.model.params = dict(saved.best)
        else:
            params, arrays = ({name: in_memory(a) for name, a in group.items()} for group in (params, arrays))
        self.epoch_start = params, (arrays, scalars)
        for S, carried in zip(self.window.S, saved.carried, strict=True):
            self.ops.copy_into(self.reducer.streams(carried, axis=0), S[0])
        self.rng.bit_generator.state = saved.rng
        self.state = TrainState.from_json(saved.state)
        self.start_log()
        if self.state.best is not None:  # the model file may be another than the interrupted run's
            self.save_model()
