"""Per-layout launch cache of Triton kernels: call the compiled kernel's launcher directly.

``kernel[grid](*args, **kwargs)`` runs Triton's whole Python launch path on every call:
keyword parsing, the argument binder (a specialisation of every argument: pointer
alignment, integers equal to 1 or divisible by 16), a cache-key computation and lookup,
the launch metadata.  For a launch whose non-tensor arguments are fixed by the layout
(strides, lengths, tiles, grid -- everything a launcher's per-layout plan holds), all of
that gives the same answer every time except the tensors' data pointers.

:func:`launch` keeps, per plan (``slots``, a dict the plan owns) and kernel (keyed by
``id(kernel)``: a JITFunction's own hash is a Python method that costs ~1.5 µs), the compiled
kernel and the bound values of its trailing (keyword) parameters from the first launch,
and afterwards calls the kernel's launcher with the new positional arguments.  What can
still change between calls of one layout is checked on every call, and any change takes
the full path (which specialises and compiles as usual):

- the 16-byte alignment of every tensor's data pointer (the binder's specialisation);
- the current device (compiled kernels are loaded per device);
- Triton's launch hooks (a profiler attached after the first launch gets them).

The stream is read on every call (CUDA-graph capture runs on its own stream), and
nothing is allocated or synchronised, so the path stays capturable.

Contract for callers: the positional arguments are the kernel's leading parameters, in
order; between calls with the same ``slots``, only tensors (alone or in tuples) may
change; keyword arguments must be the same.  A cached launch may take a tensor's data
pointer (an int) in its place -- the compiled launcher uses an int as the address as is,
which spares building a view just to pass its address (``full`` rebuilds the tensors
when the full path must run).  In the Triton interpreter, or when the
launcher cannot be reused, every call takes the full path.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch


def _flat_tensors(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, tuple):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b


def _aligned(args) -> bool:
    return all(not (t.data_ptr() & 15) for t in _flat_tensors(args))


_PTR = torch.Tensor.data_ptr


def _c_launch(run):
    """Triton 3.8's ``CudaLauncher`` without its Python ``__call__``: the arguments it
    passes to the C launch when the kernel needs no scratch memory (the compiled
    launchers of this package need none) and no sanitizer is on -- then ``__call__``
    only allocates nothing and forwards them.  None under other versions or
    launchers (their ``__call__`` runs)."""
    try:
        import triton
        from triton.backends.nvidia.driver import CudaLauncher
    except ImportError:
        return None
    if (not triton.__version__.startswith("3.8.") or type(run) is not CudaLauncher
            or getattr(run, "gsan_enabled", True) or run.global_scratch_size
            or run.profile_scratch_size):
        return None
    return (run.launch, run.launch_cooperative_grid, run.launch_pdl, run.arg_annotations,
            run.kernel_signature)


class _Entry:
    __slots__ = ("run", "fn_handle", "packed", "grid", "tail", "device", "driver", "knobs",
                 "tpos", "tuppos", "c", "fn")

    def __init__(self, fn, kernel, grid, tail, device, driver, knobs, args):
        g = tuple(grid) + (1, 1)
        self.fn = fn            # keeps id(fn), the slot's key, from being reused
        self.run, self.fn_handle, self.packed = kernel.run, kernel.function, kernel.packed_metadata
        self.c = _c_launch(kernel.run)
        self.grid, self.tail, self.device = (g[0], g[1], g[2]), tail, device
        self.driver, self.knobs = driver, knobs
        # where the tensors are: alone, or in tuples of tensors only
        self.tpos = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
        self.tuppos = tuple(i for i, a in enumerate(args) if isinstance(a, tuple)
                            and a and all(isinstance(b, torch.Tensor) for b in a))

    def _aligned(self, args) -> bool:
        # a pointer argument may also be a raw address (int): the C launcher takes either
        m = 0
        for i in self.tpos:
            a = args[i]
            m |= a if a.__class__ is int else _PTR(a)
        for i in self.tuppos:
            for t in args[i]:
                m |= t if t.__class__ is int else _PTR(t)
        return not (m & 15)

    def __call__(self, args, ptrs: Optional[int] = None) -> bool:
        """Launch with new positional ``args``; False (nothing launched) if the full path
        is needed.  Where the first launch had a tensor, ``args`` may hold the tensor or
        its data pointer as an int (the compiled launcher accepts both: an int is used as
        the address as is).  ``ptrs``: the bitwise OR of every pointer in ``args``, where
        the caller has them as ints anyway (else they are read here)."""
        rt = self.knobs.runtime
        if rt.launch_enter_hook.calls or rt.launch_exit_hook.calls:
            return False
        drv = self.driver.active
        device = drv.get_current_device()
        if device != self.device or (ptrs & 15 if ptrs is not None
                                     else not self._aligned(args)):
            return False
        g = self.grid
        c = self.c
        if c is not None:
            c[0](g[0], g[1], g[2], drv.get_current_stream(device), self.fn_handle, c[1], c[2],
                 self.packed, None, None, None, None, None, c[3], c[4], args + self.tail)
        else:
            self.run(g[0], g[1], g[2], drv.get_current_stream(device), self.fn_handle,
                     self.packed, None, None, None, *args, *self.tail)
        return True


def _make_entry(fn, kernel, grid, args, kwargs) -> Optional[_Entry]:
    """The reusable launcher of the launch just made, or None where it cannot be reused."""
    try:
        from triton import knobs
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
        if not isinstance(fn, JITFunction) or kernel is None or hasattr(kernel, "result"):
            return None
        rt = knobs.runtime
        if rt.launch_enter_hook.calls or rt.launch_exit_hook.calls or fn.pre_run_hooks:
            return None
        if not _aligned(args):          # rare; keep such layouts on the full path
            return None
        if any(isinstance(a, tuple) and any(isinstance(b, torch.Tensor) for b in a)
               and not all(isinstance(b, torch.Tensor) for b in a) for a in args):
            return None                 # tensors mixed with other values in a tuple
        device = driver.active.get_current_device()
        binder = fn.device_caches[device][4]
        kw = dict(kwargs)
        kw["debug"] = kw.get("debug", fn.debug) or rt.debug
        kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        bound = tuple(binder(*args, **kw)[0].values())
        if len(bound) < len(args):
            return None
        return _Entry(fn, kernel, grid, bound[len(args):], device, driver, knobs, args)
    except (ImportError, AttributeError, KeyError, IndexError, TypeError):
        return None          # another Triton version's internals: stay on the full path


_NONE: Any = object()


def launch(fn, grid: Tuple[int, ...], args: tuple, kwargs: Callable[[], Dict[str, Any]],
           slots: Dict[Any, Any], full: Optional[Callable[[], tuple]] = None) -> None:
    """``fn[grid](*args, **kwargs())``, through the launcher cached in ``slots`` when
    possible (see the module docstring for the contract).  ``kwargs`` is a function
    returning the keyword arguments: a cached launch does not need them built.
    ``full``: where ``args`` pass raw addresses (ints) in place of tensors, a function
    returning the same arguments with the tensors, for the full path (Triton's binder
    reads each pointer's element type from its tensor)."""
    ent = slots.get(id(fn), _NONE)
    if ent is not _NONE and ent is not None and ent(args):
        return
    if full is not None:
        args = full()
    kwargs = kwargs()
    kernel = fn[grid](*args, **kwargs)
    if ent is _NONE:                # first launch of this plan (a refused call keeps it)
        slots[id(fn)] = _make_entry(fn, kernel, grid, args, kwargs)
