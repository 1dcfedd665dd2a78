"""The CUDA kernels that tests launch, recorded under the simulator and compiled to PTX without it.

Numba's CUDA simulator runs kernels as Python, so it accepts code that numba's CUDA compiler refuses (an
unsupported call, a shared array whose size is not a constant, a type that does not unify). This module
closes that gap without a GPU, in two processes:

- under the simulator, ``Recorder`` (installed by conftest.py when RNNLM_LAUNCH_LOG names a file) notes
  every kernel the CUDA backend launches, with the numba types of its arguments: where the kernel lives
  (a module-level kernel of ``rnnlm.backends.cuda``, or the n-th kernel a cached factory built from given
  arguments), and writes them to that file when the session ends;
- without it, ``python -m tests.launch_log FILE`` builds each kernel again the same way and compiles it
  with those argument types to PTX for sm_90 (NVVM and NVRTC from the dev extra, no GPU), and exits 1
  when any kernel fails to compile or could not be located.
"""

import pickle
import sys

import numpy as np

CC = (9, 0)  # Hopper


def _encode(ops, value):
    """A factory argument as something picklable that names it again in the other process."""
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return "dtype", np.dtype(value).str
    if isinstance(value, (bool, int, float, str, type(None))):
        return "value", value
    for name, module_value in vars(ops).items():
        if module_value is value:
            return "global", name
    raise TypeError(f"cannot record the factory argument {value!r}")


def _decode(ops, encoded):
    kind, value = encoded
    return {"dtype": np.dtype, "value": lambda v: v, "global": lambda v: getattr(ops, v)}[kind](value)


class Recorder:
    """Notes every kernel launch of ``rnnlm.backends.cuda`` under the simulator (see the module's text)."""

    def __init__(self, monkeypatch):
        import numba
        from numba.cuda.simulator.kernel import FakeCUDAKernel

        from rnnlm.backends import cuda as ops

        self.ops, self.typeof = ops, numba.typeof
        self.addresses = {}  # id(kernel) -> ("global", name) or ("factory", name, encoded args, index)
        self.built = []  # every factory's results, kept so that no id is reused
        self.launches, self.unknown = set(), set()
        for name, value in list(vars(ops).items()):
            if isinstance(value, FakeCUDAKernel):
                self.addresses[id(value)] = ("global", name)
            elif callable(value) and hasattr(value, "cache_clear"):
                monkeypatch.setattr(ops, name, self._recording_factory(name, value))
        monkeypatch.setattr(ops, "_launch", self._recording_launch(ops._launch))

    def _recording_factory(self, name, factory):
        def build(*args):
            built = factory(*args)
            self.built.append(built)
            encoded = tuple(_encode(self.ops, a) for a in args)
            for index, kernel in enumerate(built if isinstance(built, tuple) else (built,)):
                self.addresses[id(kernel)] = ("factory", name, encoded, index)
            return built

        build.cache_clear = factory.cache_clear
        return build

    def _recording_launch(self, launch):
        def recording_launch(kernel, griddim, blockdim, *args):
            address = self.addresses.get(id(kernel))
            if address is None:
                self.unknown.add(repr(kernel))
            else:
                self.launches.add((address, tuple(self.typeof(a) for a in args)))
            launch(kernel, griddim, blockdim, *args)

        return recording_launch

    def write(self, path):
        with open(path, "wb") as f:
            pickle.dump({"launches": sorted(self.launches, key=repr), "unknown": sorted(self.unknown)}, f)


def _kernel(ops, address):
    if address[0] == "global":
        return getattr(ops, address[1])
    _, name, encoded, index = address
    built = getattr(ops, name)(*(_decode(ops, e) for e in encoded))
    return built[index] if isinstance(built, tuple) else built


def compile_all(path):
    """Compile every recorded (kernel, argument types) to PTX; prints one line per failure; returns the
    number compiled and the failures."""
    import types

    import numba.cuda.dispatcher
    from numba import cuda

    from rnnlm.backends import cuda as ops

    # device functions compile for the current device's compute capability: there is no device here
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
    with open(path, "rb") as f:
        log = pickle.load(f)
    failures = [f"launched but not located: {kernel}" for kernel in log["unknown"]]
    for address, argtypes in log["launches"]:
        kernel = _kernel(ops, address)
        try:
            cuda.compile_ptx(kernel.py_func, argtypes, cc=CC)
        except Exception as error:  # noqa: BLE001 - every compiler error is a finding
            failures.append(f"{address[1]}{argtypes}: {type(error).__name__}: {str(error).splitlines()[0]}")
    for failure in failures:
        print(failure)
    print(f"{len(log['launches'])} kernel signatures, {len(failures)} failures")
    return len(log["launches"]), failures


if __name__ == "__main__":
    _, failed = compile_all(sys.argv[1])
    sys.exit(1 if failed else 0)
