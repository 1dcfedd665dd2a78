"""The CUDA kernels that tests launch, recorded under the simulator and compiled to PTX without it.

Numba's CUDA simulator runs kernels as Python, so it accepts code that numba's CUDA compiler refuses (an
unsupported call, a shared array whose size is not a constant, a type that does not unify). This module
closes that gap without a GPU, in two processes:

- under the simulator, ``Recorder`` (installed by conftest.py when RNNLM_LAUNCH_LOG names a file) notes
  every kernel the CUDA backend launches, with the numba types of its arguments: where the kernel lives
  (a module-level kernel of a module of ``rnnlm.backends.cuda``, or the n-th kernel a cached factory of one
  built from given arguments), and writes them to that file when the session ends;
- without it, ``python -m tests.launch_log FILE`` builds each kernel again the same way and compiles it
  with those argument types to PTX for sm_90 (NVVM and NVRTC from the dev extra, no GPU), and exits 1
  when any kernel fails to compile or could not be located.
"""

import importlib
import pickle
import pkgutil
import sys

import numpy as np

CC = (9, 0)  # Hopper


def backend_modules():
    """The modules of the CUDA backend package, by name."""
    import rnnlm.backends.cuda as package

    names = [f"{package.__name__}.{info.name}" for info in pkgutil.iter_modules(package.__path__)]
    return {name: importlib.import_module(name) for name in names}


def _encode(modules, value):
    """A factory argument as something picklable that names it again in the other process."""
    if isinstance(value, np.dtype) or (isinstance(value, type) and issubclass(value, np.generic)):
        return "dtype", np.dtype(value).str
    if isinstance(value, (bool, int, float, str, type(None))):
        return "value", value
    for module_name, module in modules.items():
        for name, module_value in vars(module).items():
            if module_value is value:
                return "global", (module_name, name)
    raise TypeError(f"cannot record the factory argument {value!r}")


def _decode(modules, encoded):
    kind, value = encoded
    if kind == "global":
        return getattr(modules[value[0]], value[1])
    return np.dtype(value) if kind == "dtype" else value


class Recorder:
    """Notes every kernel launch of ``rnnlm.backends.cuda`` under the simulator (see the module's text)."""

    def __init__(self, monkeypatch):
        import numba
        from numba.cuda.simulator.kernel import FakeCUDAKernel

        self.modules, self.typeof = backend_modules(), numba.typeof
        self.addresses = {}  # id(kernel) -> ("global", (module, name)) or ("factory", (module, name), args, index)
        self.built = []  # every factory's results, kept so that no id is reused
        self.launches, self.unknown = set(), set()
        for module_name, module in self.modules.items():
            for name, value in list(vars(module).items()):
                if isinstance(value, FakeCUDAKernel):
                    self.addresses[id(value)] = ("global", (module_name, name))
                elif callable(value) and hasattr(value, "cache_clear") and value.__module__ == module_name:
                    monkeypatch.setattr(module, name, self._recording_factory((module_name, name), value))
        device = self.modules["rnnlm.backends.cuda.device"]
        monkeypatch.setattr(device, "launch", self._recording_launch(device.launch))

    def _recording_factory(self, where, factory):
        def build(*args):
            built = factory(*args)
            self.built.append(built)
            encoded = tuple(_encode(self.modules, a) for a in args)
            for index, kernel in enumerate(built if isinstance(built, tuple) else (built,)):
                self.addresses[id(kernel)] = ("factory", where, encoded, index)
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


def _kernel(modules, address):
    module_name, name = address[1]
    if address[0] == "global":
        return getattr(modules[module_name], name)
    _, _, encoded, index = address
    built = getattr(modules[module_name], name)(*(_decode(modules, e) for e in encoded))
    return built[index] if isinstance(built, tuple) else built


def compile_all(path):
    """Compile every recorded (kernel, argument types) to PTX; prints one line per failure; returns the
    number compiled and the failures."""
    import types

    import numba.cuda.dispatcher
    from numba import cuda

    # device functions compile for the current device's compute capability: there is no device here
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=CC)
    with open(path, "rb") as f:
        log = pickle.load(f)
    modules = backend_modules()
    failures = [f"launched but not located: {kernel}" for kernel in log["unknown"]]
    for address, argtypes in log["launches"]:
        kernel = _kernel(modules, address)
        try:
            cuda.compile_ptx(kernel.py_func, argtypes, cc=CC)
        except Exception as error:  # noqa: BLE001 - every compiler error is a finding
            failures.append(f"{address[1][1]}{argtypes}: {type(error).__name__}: {str(error).splitlines()[0]}")
    for failure in failures:
        print(failure)
    print(f"{len(log['launches'])} kernel signatures, {len(failures)} failures")
    return len(log["launches"]), failures


if __name__ == "__main__":
    _, failed = compile_all(sys.argv[1])
    sys.exit(1 if failed else 0)
