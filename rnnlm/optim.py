"""Optimizers over backend arrays: SGD (with Mikolov's L2 term), Adam and lazy Adam.

All clip the gradient's global norm first (``clip`` = 0: off) and treat the sparse gradients of
``rnnlm.step`` (W_x's columns, the class softmax's W_o rows) by their slots, leaving them cleared. The
direct features' table W_d has no gradient array: every optimizer steps it by plain SGD through
``step.direct_update`` (see ``rnnlm.direct``) at the rate lr · ``direct_scale``, so that it follows the
schedule of the optimizer's rate.
"""

import numpy as np

from rnnlm.step import direct_update, rows, sparse_names, trainable
from rnnlm.stored import put

OPTIMIZERS = ("sgd", "adam", "lazyadam")
MOMENTS = ("float32", "bfloat16")


def grad_norm(ops, grads, window, clip, clipping):
    """clipping[:] = (‖g‖, min(1, clip / ‖g‖)): the global L2 norm of all gradients (sparse ones over
    their marked rows) and the clipping factor, in a (2,) float64 backend array that the update kernels
    read, so that the host need not wait for the norm. With clip = 0 nothing is computed: the factor stays
    1 (and the norm as it was).

    The class softmax's dW_o enters through the norm class_xent_grad computed (a one-element array whose
    square is its sum of squares), unless tying has since added W_x's rows to it.
    """
    if clip == 0:
        return
    sparse = sparse_names(window)
    pairs = []
    for name in trainable(grads, window):
        if name == "W_o" and window.dW_o_norm is not None and not window.tied:
            pairs.append((window.dW_o_norm, None))
        elif name in sparse:
            pairs.append((rows(name, grads[name]), sparse[name][0]))
        else:
            pairs.append((grads[name], None))
    ops.grad_norm(pairs, clip, clipping)


class _Clipped:
    """The gradient norm of an optimizer's last step, kept on the device with its clipping factor; and the
    direct features' SGD step, at lr · direct_scale."""

    def __init__(self, ops, direct_scale=1.0):
        self.ops, self.direct_scale = ops, direct_scale
        self.clipping = ops.asarray(np.array([0.0, 1.0]))  # (‖g‖, factor): see grad_norm

    def direct_step(self, params, window, lr):
        if "W_d" in params:
            direct_update(self.ops, params, window, lr * self.direct_scale)

    def last_norm(self):
        """‖g‖ before clipping at the last step with clip > 0, as a float (waits for the device)."""
        return float(self.ops.to_numpy(self.clipping)[0])


class SGD(_Clipped):
    """θ ← θ - lr (g · min(1, clip / ‖g‖) + 2λ θ): SGD on the mean loss plus λ‖θ‖²."""

    name = "sgd"

    def __init__(self, ops, params, clip=0.0, l2=0.0, direct_scale=1.0):
        super().__init__(ops, direct_scale)
        self.clip, self.l2 = clip, l2

    def update(self, params, grads, window, lr):
        """Apply one step (queued on the device, like the kernels that computed grads)."""
        ops, sparse, clipping = self.ops, sparse_names(window), self.clipping
        grad_norm(ops, grads, window, self.clip, clipping)
        shrink = 1.0 - lr * 2.0 * self.l2
        self.direct_step(params, window, lr)
        dense = []
        for name, param in trainable(params, window).items():
            if name == "W_d":
                continue
            param_rows, grad_rows = rows(name, param), rows(name, grads[name])
            if name in sparse:
                if self.l2 > 0:
                    ops.sgd_update(param_rows, grad_rows, 0.0, param.dtype.type(shrink), clipping)
                ops.sparse_sgd_update(param_rows, grad_rows, *sparse[name], lr, clipping)
            else:
                dense.append((param_rows, grad_rows))
        ops.sgd_updates(dense, lr, shrink, clipping)

    def arrays(self):
        """The arrays of ``state`` as the backend holds them (none)."""
        return {}

    def state(self, copy=True):
        """Arrays and scalars a checkpoint needs to continue exactly (none for SGD); copy: see Adam's."""
        return {}, {}

    def load_state(self, arrays, scalars):
        """Restore what ``state`` returned."""


class Adam(_Clipped):
    """Adam (Kingma & Ba) on the clipped gradient plus 2λθ, with bias-corrected moments.

    moments "bfloat16": the moments are uint16 arrays of bfloat16 bits (half the memory), stepped in float32
    and stored back by stochastic rounding whose random bits are a hash of the step count and the element
    (``rnnlm.backends``): round to nearest would freeze the second moment, whose step (1 - β2)(g² - v) is
    below half a bfloat16 ulp of v; the hash makes a run, and a resumed one, the same to the bit.
    """

    name = "adam"
    lazy = False

    def __init__(self, ops, params, clip=0.0, l2=0.0, beta1=0.9, beta2=0.999, eps=1e-8, direct_scale=1.0,
                 moments="float32"):
        """params: the trainable parameters (``step.trainable``), for the moments' shapes (W_d has none)."""
        super().__init__(ops, direct_scale)
        self.clip, self.l2 = clip, l2
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.bfloat16 = moments == "bfloat16"
        params = {name: p for name, p in params.items() if name != "W_d"}
        self.moment1 = {name: ops.zeros(rows(name, p).shape, self.moment_dtype(p)) for name, p in params.items()}
        self.moment2 = {name: ops.zeros(rows(name, p).shape, self.moment_dtype(p)) for name, p in params.items()}
        self.t = 0

    def moment_dtype(self, param):
        """uint16 (bfloat16 bits) or the parameter's own dtype."""
        return np.dtype(np.uint16) if self.bfloat16 else param.dtype

    def update(self, params, grads, window, lr):
        """Apply one step (queued on the device, like the kernels that computed grads)."""
        ops, sparse, clipping = self.ops, sparse_names(window), self.clipping
        grad_norm(ops, grads, window, self.clip, clipping)
        self.t += 1
        lr_t, eps_t = self.corrected(lr)
        self.direct_step(params, window, lr)
        sparse_step = ops.sparse_adam_update_bf16 if self.bfloat16 else ops.sparse_adam_update
        for name, param in trainable(params, window).items():
            if name == "W_d":
                continue
            param_rows, grad_rows = rows(name, param), rows(name, grads[name])
            if name in sparse:  # every row (Adam) or the slotted ones (lazy Adam); clears the slots as it goes
                sparse_step(param_rows, grad_rows, *self.moments(name), *sparse[name], not self.lazy,
                            *self.scalars(param, lr_t, eps_t))
            else:
                self.dense_step(name, param_rows, grad_rows, lr_t, eps_t)

    def moments(self, name):
        return self.moment1[name], self.moment2[name]

    def scalars(self, param, lr_t, eps_t):
        """The update kernels' arguments after the moments (after the slots and ``every``, sparse), in param's dtype."""
        dtype = param.dtype.type
        step_count = (self.t,) if self.bfloat16 else ()  # the bfloat16 rounding's random bits depend on it
        return (*step_count, dtype(lr_t), self.clipping, dtype(2.0 * self.l2), dtype(self.beta1), dtype(self.beta2),
                dtype(eps_t))

    def dense_step(self, name, param_rows, grad_rows, lr_t, eps_t):
        """The step of every row of one parameter (rows as ``step.rows`` gives them)."""
        dense = self.ops.adam_update_bf16 if self.bfloat16 else self.ops.adam_update
        dense(param_rows, grad_rows, *self.moments(name), *self.scalars(param_rows, lr_t, eps_t))

    def corrected(self, lr):
        """(lr_t, ε_t) of step t: the bias corrections folded into the step, lr m̂ / (√v̂ + ε) = lr_t m / (√v + ε_t)."""
        unbias2 = np.sqrt(1 - self.beta2**self.t)
        return lr * unbias2 / (1 - self.beta1**self.t), self.eps * unbias2

    def arrays(self):
        """The moments as the backend holds them, by their names in ``state``."""
        arrays = {f"moment1/{k}": v for k, v in self.moment1.items()}
        arrays.update({f"moment2/{k}": v for k, v in self.moment2.items()})
        return arrays

    def state(self, copy=True):
        """The moments and the step count; copy False: the CPU's moment arrays themselves, not copies (for a
        checkpoint written at once: at a vocabulary of 10⁶ a copy of the moments is gigabytes)."""
        def host(array):
            return array if not copy and isinstance(array, np.ndarray) else self.ops.to_numpy(array)

        return {name: host(array) for name, array in self.arrays().items()}, {"t": self.t}

    def load_state(self, arrays, scalars):
        """Restore what ``state`` returned, or ``rnnlm.stored.StoredArray`` members that hold it."""
        for name, array in self.arrays().items():
            put(self.ops, arrays[name], array)
        self.t = int(scalars["t"])


class LazyAdam(Adam):
    """Adam that steps a sparse gradient's rows (W_x's columns, the class softmax's W_o rows) only where
    the window touched them, moments included, like TensorFlow's LazyAdam and PyTorch's SparseAdam. The
    dense Adam's pass over every row of W_x, W_o and their moments at every step is what bounds the
    class softmax's speed; an untouched row here keeps its weights and moments until its token returns."""

    name = "lazyadam"
    lazy = True


def make_optimizer(name, ops, params, clip=0.0, l2=0.0, direct_scale=1.0, moments="float32"):
    """The optimizer ``name`` of OPTIMIZERS; moments (one of MOMENTS) is Adam's (SGD has none)."""
    if name == "sgd":
        return SGD(ops, params, clip=clip, l2=l2, direct_scale=direct_scale)
    adam = {"adam": Adam, "lazyadam": LazyAdam}[name]
    return adam(ops, params, clip=clip, l2=l2, direct_scale=direct_scale, moments=moments)
