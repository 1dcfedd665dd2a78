"""GEMMs: numpy's matmul (BLAS) for the three layouts of the output layer and the stacked layers, and a loop for
A Bᵀ with a few rows of A (dynamic evaluation's segments)."""

import numpy as np
from numba import njit, prange

SKINNY_ROWS = 16  # A Bᵀ with at most this many rows of A takes _skinny_nt


def matmul_nt(A, B, out):
    """numpy's matmul (BLAS) into out; with at most SKINNY_ROWS rows of A, ``_skinny_nt``: BLAS first packs the
    whole of B, a pass over memory as long as the product's own, which at a few rows is most of its time."""
    if A.shape[0] <= SKINNY_ROWS:
        _skinny_nt(A, B, out)
    else:
        np.matmul(A, B.T, out=out)


@njit(parallel=True, fastmath=True, cache=True)
def _skinny_nt(A, B, out):
    """out[r, v] = A[r] · B[v]: a parallel loop over the rows of B, each read once for every row of A."""
    n, k = A.shape
    for v in prange(B.shape[0]):
        b = B[v]
        for r in range(n):
            a = A[r]
            total = out.dtype.type(0)
            for i in range(k):
                total += a[i] * b[i]
            out[r, v] = total


def matmul_nn(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A, B, out=out)


def matmul_tn(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A.T, B, out=out)
