"""A faked sm_90 CUDA target for Triton: everything of a launch runs except the compile and
the final C launch.

Inside :func:`fake_sm90` every ``@triton.jit`` kernel launched as ``kernel[grid](...)``
goes through Triton's own Python launch path -- ``JITFunction.run`` with its argument
binder (pointer/integer specialisation), cache-key computation and kernel-cache lookup,
``launch_metadata``, and the real ``CudaLauncher.__call__`` (scratch checks, argument
pass-through) -- and stops at the compiled launcher's C ``launch`` function, which is
replaced by a recorder.  The driver reports device 0, stream 0 and target
``cuda:90`` (warp 32), so the binder specialises exactly as on an H100.

What is faked, and why:

- ``triton.compiler.compile`` returns a stub kernel (name, options, the launcher) instead
  of compiling: the host path and the launch ledger need the launch, not the binary, and
  a real sm_90 compile costs seconds per kernel (``bench/static_sm90.py`` compiles the
  same launches for real and checks the machine code).  The stub is built once per
  specialisation, like a compiled kernel, so the cache lookup is the real one.
- the C ``launch`` (argument unpacking and ``cuLaunchKernelEx``): a Python recorder that
  keeps ``(kernel name, grid, args)`` -- the tensors a kernel touches are among ``args``.

Tensors may be CPU tensors (the host-path benchmark), or fake CUDA tensors of
``torch._subclasses.FakeTensorMode`` (the ledger; their data pointer reads as 0, which
the binder sees as 16-byte aligned).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import warnings
from typing import Callable, List, Optional

SM90 = dict(max_shared_mem=232448, multiprocessor_count=132, max_num_regs=65536,
            warpSize=32, sm_clock_rate=1980000, mem_clock_rate=2619000, mem_bus_width=5120)


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple
    args: tuple


class _Utils:
    """The driver's C utilities: only what a launch needs."""

    def __init__(self, sink: Callable[[Launch], None]):
        self.sink = sink

    def launch(self, gx, gy, gz, stream, function, coop, pdl, packed_metadata,
               launch_metadata, enter_hook, exit_hook, global_scratch, profile_scratch,
               annotations, signature, args):
        if enter_hook is not None:          # what the C launcher does around the launch
            enter_hook(launch_metadata)
        self.sink(Launch(function, (gx, gy, gz), args))
        if exit_hook is not None:
            exit_hook(launch_metadata)

    def build_signature_metadata(self, kernel_signature):   # read only by the C launch
        return tuple(kernel_signature)

    def get_device_properties(self, device):
        return dict(SM90)

    def load_binary(self, name, kernel, shared, device):
        return None, name, 0, 0, 1024


def _c_arg_types():
    """The launcher annotates its arguments with C types of the driver module (built on
    first driver use, which needs libcuda): Python stand-ins, read only by the C launch."""
    from triton.backends.nvidia import driver as nv
    if nv.PyKernelArg is None:
        nv.PyKernelArg = collections.namedtuple("PyKernelArg", "nested_tuple type")
        nv.ARG_CONSTEXPR, nv.ARG_KERNEL, nv.ARG_TUPLE = 0, 1, 2


class _Driver:
    def __init__(self, sink):
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.driver import CudaLauncher
        _c_arg_types()
        self.utils = _Utils(sink)
        self.launcher_cls = CudaLauncher
        self.target = GPUTarget("cuda", 90, 32)

    @staticmethod
    def is_active():
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        import torch
        return torch.device("cuda", 0)

    def get_device_capability(self, device=None):
        return (9, 0)


_META_FIELDS = dict(global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
                    profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=False,
                    num_ctas=1, tensordesc_meta=None, instrumentation_mode="", shared=0)


class _StubKernel:
    """What ``triton.compile`` returns, minus the binary: the launcher is Triton's own
    ``CudaLauncher`` built from the specialised signature (its C launch recorded)."""

    def __init__(self, src, target=None, options=None, _env_vars=None):
        from triton.runtime.driver import driver
        opts = dict(options or {})
        fields = dict(_META_FIELDS, name=src.name, target=target,
                      num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3))
        self.metadata = collections.namedtuple("KernelMetadata", sorted(fields))(**fields)
        self.src, self.name, self.function = src, src.name, src.name
        self.packed_metadata = (self.metadata.num_warps, 1, 1, 1, 0)
        self.run = driver.active.launcher_cls(src, self.metadata)

    def launch_metadata(self, grid, stream, *args):     # CompiledKernel.launch_metadata
        from triton import knobs
        if knobs.runtime.launch_enter_hook is None:
            return None
        return {"name": self.name, "function": self.function, "stream": stream}


def _jit_functions(modules):
    import triton
    for mod in modules:
        for name in dir(mod):
            fn = getattr(mod, name)
            if isinstance(fn, triton.runtime.jit.JITFunction):
                yield fn


@contextlib.contextmanager
def fake_sm90(modules=(), sink: Optional[Callable[[Launch], None]] = None):
    """Launch ``kernel[grid](...)`` of the given modules' kernels on a faked sm_90
    device; yields the list of :class:`Launch` records (unless ``sink`` takes them).

    The kernels' per-device caches are reset on entry and exit, and the backend's launch
    plans are dropped on exit, so nothing compiled here leaks into real launches
    afterwards (and vice versa)."""
    import triton.compiler
    from triton.runtime.driver import driver
    records: List[Launch] = []
    sink = sink or records.append
    fns = list(_jit_functions(modules))
    saved = [(fn, fn.device_caches) for fn in fns]
    prev_driver, prev_compile = driver._active, triton.compiler.compile   # no real init
    driver.set_active(_Driver(sink))
    triton.compiler.compile = _StubKernel
    for fn in fns:
        fn.device_caches = collections.defaultdict(fn.create_binder)
    try:
        with warnings.catch_warnings():
            # the binder reads data_ptr() of fake tensors (0): expected here
            warnings.filterwarnings("ignore", message=".*data pointer of FakeTensor.*")
            yield records
    finally:
        # launch plans made here hold stub launchers: drop them (and the op's plans)
        import sys
        for name in ("avstfp_fast.ops.triton_backend", "avstfp_fast.ops.attention"):
            mod = sys.modules.get(name)
            if mod is not None and hasattr(mod, "_PLANS"):
                mod._PLANS.clear()
        triton.compiler.compile = prev_compile
        driver._active = prev_driver
        for fn, caches in saved:
            fn.device_caches = caches
