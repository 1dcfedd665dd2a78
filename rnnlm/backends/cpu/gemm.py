"""GEMMs: numpy's matmul (BLAS) for the three layouts of the output layer and the stacked layers."""

import numpy as np


def matmul_nt(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A, B.T, out=out)


def matmul_nn(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A, B, out=out)


def matmul_tn(A, B, out):
    """numpy's matmul (BLAS) into out."""
    np.matmul(A.T, B, out=out)
