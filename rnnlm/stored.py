"""Arrays that a run keeps in a file it wrote rather than in memory: ``StoredArray``, one float32 member of
an .npz, and ``put``, which copies an array, in memory or stored, into a backend array.

At a vocabulary of 10⁶ every V × m table is most of a gigabyte: the best model and the epoch's start, which a
rolled-back epoch restores, are kept as the checkpoint's members (``rnnlm.checkpointing``) and read back a piece
at a time, so that neither keeping nor restoring them needs a table's worth of memory.
"""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from rnnlm.untrusted import Npz


@dataclass(frozen=True)
class StoredArray:
    """Member ``name`` of the .npz at ``path``: float32 (or dtype "uint16": bfloat16 bits, Adam's moments with
    --moments bfloat16), of ``shape``, in Fortran order if ``fortran_order`` (as ``np.lib.format.write_array``
    wrote it from an array of that layout)."""

    path: Path
    name: str
    shape: tuple
    fortran_order: bool
    dtype: str = "float32"

    @classmethod
    def like(cls, path, name, array):
        """The member ``name`` of ``path`` that holds an array laid out like ``array`` (numpy or backend)."""
        flags = array.flags  # a dict for numba's device arrays
        fortran_order = bool(flags["F_CONTIGUOUS"] and not flags["C_CONTIGUOUS"])
        return cls(Path(path), name, tuple(array.shape), fortran_order, np.dtype(array.dtype).name)

    @classmethod
    def checked(cls, npz, name, shape, dtype="float32"):
        """Member ``name`` of the open ``npz`` (``rnnlm.untrusted.Npz``), read through once to check it: a float
        array (uint16 for dtype "uint16") of ``shape``, every value finite."""
        fortran_order = npz.read_pieces(name, shape, None, lambda start, piece: None, dtype)
        return cls(npz.path, name, tuple(shape), fortran_order, dtype)

    def read(self, store):
        """store(start, piece) for the member's consecutive pieces (of its dtype), in the file's order."""
        with Npz(self.path, "checkpoint") as npz:
            npz.read_pieces(self.name, self.shape, self.fortran_order, store, self.dtype)

    def write_npy(self, file):
        """Write the member as an .npy into ``file``, byte for byte what ``np.lib.format.write_array`` writes for
        the array it holds."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype)), "fortran_order": self.fortran_order,
                  "shape": self.shape}
        np.lib.format.write_array_header_1_0(file, header)
        self.read(lambda start, piece: file.write(piece.tobytes()))

    def to_numpy(self):
        """The member as a numpy array (all of it in memory)."""
        flat = np.empty(int(np.prod(self.shape)), self.dtype)

        def store(start, piece):
            flat[start:start + len(piece)] = piece

        self.read(store)
        return flat.reshape(self.shape, order="F" if self.fortran_order else "C")


def stored_as(path, prefix, arrays):
    """{name: the member ``prefix + name`` of the .npz at ``path``} for ``arrays`` (by name: numpy, backend or
    ``StoredArray``) just written there, each laid out as it was."""
    return {name: replace(array, path=Path(path), name=prefix + name) if isinstance(array, StoredArray)
            else StoredArray.like(path, prefix + name, array) for name, array in arrays.items()}


def in_memory(array):
    """A ``StoredArray`` read into memory; anything else as it is."""
    return array.to_numpy() if isinstance(array, StoredArray) else array


def put(ops, source, dst):
    """dst (a backend array) := source, a host array or a ``StoredArray`` laid out like dst, read into dst a piece
    at a time."""
    if not isinstance(source, StoredArray):
        ops.copy_into(source, dst)
        return
    if source.fortran_order != StoredArray.like(source.path, source.name, dst).fortran_order:
        ops.copy_into(source.to_numpy(), dst)  # laid out otherwise than this run writes it: a whole copy
        return
    flat = (dst.T if source.fortran_order else dst).reshape(-1)  # the file's order: a view of dst
    source.read(lambda start, piece: ops.copy_into(piece, flat[start:start + len(piece)]))
