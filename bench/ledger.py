"""Byte and launch ledger of ``prompted_attention`` at the AV-STFP stage shapes (no GPU).

For every stage (temporal, spatial, fusion) x model (ViT-B/16, ViT-L/14) x direction
(forward, backward), bf16, batch 8, the real op path runs as the model calls it --
``prompted_attention_qkv`` on the packed QKV projection buffer, inside autograd -- on
fake CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, strides and dtypes, no
memory), with the kernels launched on a faked sm_90 target (``bench/fake_sm90.py``:
Triton's binder, cache and launcher run; the compile and the C launch are stubbed and
the launch is recorded).  A dispatch mode records every torch op on the way.

Recorded, per direction:

- **launches**: every kernel launch (Triton, and for the cuda backend each call of a
  ``torch.ops.avstfp_cuda`` op, counted as the kernels it launches) and every torch op
  that moves data (fill, zero, copy, cast, reduction: one GPU kernel each);
- **auxiliary bytes**: everything beyond the minimum -- each data-moving torch op in full
  (bytes read + bytes written, broadcast dims counted once), and each *scratch* buffer
  a kernel touches (allocated inside the call, neither an input nor alive after it:
  not returned, not saved for the backward), charged as one full read and one full
  write per kernel that touches it (an upper bound for a buffer only written or only
  read by that kernel; exact for an accumulator);
- **host syncs** (``.item()``-like ops): none may occur (CUDA-graph capture).

The minimum bytes are the floors of ``bench/floors.py`` (docs/design.md, "Floors: bytes
and FLOPs"): forward = read q, k, v and the prompts once, write o and the fp32 row
log-sum-exp (training keeps it for the backward); backward = the rest of ``fwdbwd``.

    python bench/ledger.py               # report: print the table (exit 0)
    python bench/ledger.py --ci          # enforce the bounds (exit 1 on a violation)
    python bench/ledger.py --out bench/results/ledger-after.md --title "..."

Bounds (``--ci``): forward aux <= 5% of min and 1 launch; backward aux <= 10% of min and
<= 2 launches; no host sync.  ``--backend cuda`` makes the cuda backend's rows: its ops
run as their registered fakes (the extension is not needed: the ops are defined from their
schemas when it is not loaded), and each op call counts the kernels the C++ launcher starts
for its plan, as ``avstfp_fast.ops.cuda_backend.launches`` decides them (the same function
the backend sizes its scratch by).  The torch ops around the call (fills, reductions,
casts) are recorded like any other; the scratch the backend allocates for the call (fp32
prompt-gradient partials, delta) is charged one write and one read.  The int32 ticket
counters of the prompt-gradient reduction are the binding's, zeroed once per device and
stream, not per call: not charged.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import weakref
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("B16", "L14")
STAGES = ("temporal", "spatial", "fusion")
BATCH = 8
BOUNDS = {"fwd": dict(aux=0.05, launches=1), "bwd": dict(aux=0.10, launches=2)}

# torch ops that allocate without writing, and ops that write without reading
_ALLOC = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like"}
_FILL = {"zero_", "fill_", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
         "new_zeros", "new_ones", "new_full", "scalar_tensor", "fill"}
_SYNC = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


def _span(t) -> int:
    """Bytes of the distinct elements a view addresses (broadcast dims once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return 0 if t.numel() == 0 else n * t.element_size()


@dataclasses.dataclass
class Item:
    kind: str                   # "kernel" | "torch" | "cuda-op" | "sync"
    name: str
    launches: int
    read: int = 0
    written: int = 0
    scratch: int = 0            # bytes charged for scratch buffers (kernels)
    note: str = ""

    @property
    def aux(self) -> int:
        return self.read + self.written + self.scratch if self.kind == "torch" else self.scratch


class Ledger:
    """Storage bookkeeping and the items of one direction."""

    def __init__(self):
        self.items: List[Item] = []
        self.known: Dict[int, weakref.ref] = {}      # storage key -> storage weakref
        self.new: Dict[int, tuple] = {}              # allocated in this phase: key -> (ref, nbytes)
        self.kernel_args: List[tuple] = []           # (item, [storage weakrefs])

    @staticmethod
    def _storage(t):
        from torch.multiprocessing.reductions import StorageWeakRef
        return StorageWeakRef(t.untyped_storage())

    def register(self, *tensors):
        for t in tensors:
            s = self._storage(t)
            self.known[s.cdata] = s

    def is_new(self, t) -> bool:
        s = self._storage(t)
        old = self.known.get(s.cdata)
        return old is None or old.expired()

    def allocated(self, t):
        s = self._storage(t)
        self.known[s.cdata] = s
        self.new[s.cdata] = (s, t.untyped_storage().nbytes())

    def touch(self, item, tensors):
        """``item`` (a launch) touches ``tensors``: keep weak references to their storages
        (a strong one would keep scratch buffers alive)."""
        self.kernel_args.append((item, [self._storage(t) for t in tensors]))

    def scratch_of(self, refs) -> int:
        """Bytes of the scratch storages among ``refs``: allocated in this phase and freed
        by its end (call after the phase)."""
        seen, total = set(), 0
        for ref in refs:
            key = ref.cdata
            if key in seen or key not in self.new or not ref.expired():
                continue
            seen.add(key)
            total += self.new[key][1]
        return total

    def finish(self):
        """Charge scratch buffers to the kernels that touched them: read + write each."""
        for item, tensors in self.kernel_args:
            item.scratch += 2 * self.scratch_of(tensors)


def _tensors(x):
    import torch
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _recorder(ledger_ref: list):
    """A dispatch mode that records data-moving torch ops into ``ledger_ref[0]``, runs the
    Python bodies of the Triton backend's custom ops under itself (so their launches and
    allocations are seen), and counts cuda-backend op calls as launches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            led: Ledger = ledger_ref[0]
            ns, name = func.namespace, func._schema.name.split("::")[-1]
            if ns == "avstfp_triton":                    # the eager launcher, recorded
                from torch._library.custom_ops import OPDEFS
                with self:
                    return OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
            if ns == "avstfp_cuda":
                from avstfp_fast.ops.cuda_backend import launches
                ks = launches(name, args[5]).kernels        # args[5]: the plan's ints
                # its scratch (prompt-grad partials, delta) is an argument the backend
                # allocated: charged below like any scratch (one write + one read)
                item = Item("cuda-op", func._schema.name, len(ks), note=" + ".join(ks))
                led.items.append(item)
                led.touch(item, _tensors((args, kwargs)))
                out = func(*args, **kwargs)
                for t in _tensors(out):
                    if led.is_new(t):
                        led.allocated(t)
                return out
            if (ns == "aten" and name not in _ALLOC
                    and torch._C._dispatch_has_kernel_for_dispatch_key(
                        func.name(), "CompositeImplicitAutograd")):
                with self:                                # see what it decomposes into
                    r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
            if name in _SYNC:
                led.items.append(Item("sync", f"{ns}.{name}", 0, note="host sync"))
            out = func(*args, **kwargs)
            new_outs = []                   # views (outputs of old storage) move nothing
            for t in _tensors(out):
                if led.is_new(t):
                    led.allocated(t)
                    new_outs.append(t)
            if name in _ALLOC:
                return out
            mutated = []
            for a, arg in zip(func._schema.arguments, args):
                if a.alias_info is not None and a.alias_info.is_write:
                    mutated += list(_tensors(arg))
            for a in func._schema.arguments:
                if a.name in kwargs and a.alias_info is not None and a.alias_info.is_write:
                    mutated += list(_tensors(kwargs[a.name]))
            written = sum(_span(t) for t in new_outs + mutated)
            if written == 0:
                return out
            ins = [t for t in _tensors((args, kwargs))]
            if name in _FILL:
                read = 0
            elif name in ("copy_", "copy"):
                read = sum(_span(t) for t in ins if not any(t is m for m in mutated))
            else:
                read = sum(_span(t) for t in ins)
            led.items.append(Item("torch", f"{ns}.{name}", 1, read, written))
            return out

    return Recorder()


@dataclasses.dataclass
class Row:
    model: str
    stage: str
    direction: str
    backend: str
    min_bytes: float
    items: List[Item]

    @property
    def launches(self) -> int:
        return sum(i.launches for i in self.items)

    @property
    def kernel_launches(self) -> int:
        return sum(i.launches for i in self.items if i.kind in ("kernel", "cuda-op"))

    @property
    def aux(self) -> int:
        return sum(i.aux for i in self.items)

    @property
    def syncs(self) -> int:
        return sum(1 for i in self.items if i.kind == "sync")

    def failures(self) -> List[str]:
        b = BOUNDS[self.direction]
        what = f"{self.backend} {self.stage} {self.model} {self.direction}"
        bad = []
        if self.aux > b["aux"] * self.min_bytes:
            bad.append(f"{what}: aux {self.aux / 1e6:.1f} MB > {100 * b['aux']:.0f}% of "
                       f"min {self.min_bytes / 1e6:.1f} MB")
        if self.launches > b["launches"]:
            bad.append(f"{what}: {self.launches} launches > {b['launches']}")
        if self.syncs:
            bad.append(f"{what}: {self.syncs} host syncs (breaks CUDA-graph capture)")
        return bad


def _call(shape):
    """floors.Call of one stage shape (bf16 elements)."""
    import floors
    a = shape.arch
    prompts = shape.prompts
    segs = shape.segments or (a.frames if shape.stage == "temporal" else a.tokens,)
    ps = shape.prompt_shape()
    rows_per = 1
    for n in ps[:-2]:
        rows_per *= n
    return floors.Call(batch=int(shape.batch * (a.tokens if shape.stage == "temporal" else
                                                a.frames) * a.heads),
                       q_segments=tuple(segs), k_segments=tuple(segs), prompts=tuple(prompts),
                       head_dim=a.head_dim, elem=2,
                       prompt_rows=sum(rows_per * P for P in prompts))


def min_bytes(shape) -> Dict[str, float]:
    import floors
    c = _call(shape)
    fwd = floors.min_bytes(c, "fwd") + 4 * c.batch * sum(c.q_segments)     # + lse
    return {"fwd": fwd, "bwd": floors.min_bytes(c, "fwdbwd") - fwd}


def run_case(model: str, stage: str, backend: str = "triton", batch: int = BATCH,
             dtype: str = "bf16") -> List[Row]:
    """Forward and backward rows of one stage call."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from fake_sm90 import fake_sm90
    from geometry import ARCHS, DTYPES, KernelShape
    from avstfp_fast.ops.attention import prompted_attention_qkv
    a = ARCHS[model]
    shape = KernelShape(a, batch, stage, DTYPES[dtype])
    mins = min_bytes(shape)
    ledger_ref = [Ledger()]
    modules = []
    if backend == "triton":
        from avstfp_fast.ops import triton_backend as TB
        modules = [TB._kernels()]
    else:
        from avstfp_fast.ops import cuda_backend as CB
        CB.define_ops_for_tracing()
    import contextlib
    from unittest import mock
    # the cuda backend's capability check reads the device: an sm_90 one, as for Triton
    cap = (mock.patch("torch.cuda.get_device_capability", lambda device=None: (9, 0))
           if backend == "cuda" else contextlib.nullcontext())

    def sink(launch):
        led = ledger_ref[0]
        item = Item("kernel", launch.kernel, 1, note=f"grid {launch.grid}")
        led.items.append(item)
        led.touch(item, _tensors(launch.args))

    rows = []
    with cap, FakeTensorMode(), fake_sm90(modules, sink=sink):
        dt, dev = shape.dtype, "cuda"
        qkv = torch.empty(batch, a.frames, a.tokens, 3, a.heads, a.head_dim, dtype=dt,
                          device=dev, requires_grad=True)
        ps = shape.prompt_shape()
        pks = [torch.empty(*ps[:-2], P, ps[-1], dtype=dt, device=dev, requires_grad=True)
               for P in shape.prompts]
        pvs = [torch.empty(*ps[:-2], P, ps[-1], dtype=dt, device=dev, requires_grad=True)
               for P in shape.prompts]
        segs = shape.segments
        seq_dim = 1 if stage == "temporal" else 2
        rec = _recorder(ledger_ref)
        led = ledger_ref[0]
        led.register(qkv, *pks, *pvs)
        with rec:
            o = prompted_attention_qkv(qkv, pks if segs else pks[0], pvs if segs else pvs[0],
                                       qkv_dim=3, seq_dim=seq_dim, segments=segs,
                                       backend=backend)
        led.finish()
        rows.append(Row(model, stage, "fwd", backend, mins["fwd"], led.items))

        dout = torch.empty_like(o)      # the layout the model's backward delivers (o's)
        bled = Ledger()
        bled.known = dict(led.known)
        bled.register(dout)
        ledger_ref[0] = bled
        with rec:
            # the autograd node's backward, as the engine calls it (the engine itself
            # cannot run on fake CUDA tensors without a device)
            grads = o.grad_fn.apply(dout)
        bled.finish()
        del grads
        rows.append(Row(model, stage, "bwd", backend, mins["bwd"], bled.items))
    return rows


# --------------------------------------------------------------------------- report
def markdown(rows: List[Row], title: str, enforce: bool) -> str:
    cuda = any(r.backend == "cuda" for r in rows)
    how = ("the cuda backend's ops as their registered fakes, each counted as the kernels "
           "its C++ launcher starts for the call's plan (`cuda_backend.launches`)" if cuda
           else "Triton's launch path on a faked sm_90 target")
    L = [f"# {title}", "",
         f"Generated by `python bench/ledger.py{' --backend cuda' if cuda else ''}` (no GPU: "
         "the op path as the model calls it, "
         f"`prompted_attention_qkv` inside autograd, on fake CUDA tensors, with {how}). bf16, batch 8, head dim 64. Launches: kernel "
         "launches + data-moving torch ops. Aux: bytes of those torch ops, plus each scratch "
         "buffer a kernel touches at one read + one write per kernel. Min: the byte floor "
         "(`bench/floors.py`).", "",
         "| backend | stage | model | dir | launches (kernels + torch ops) | min MB | aux MB | "
         "(min + aux) / min | bound |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = BOUNDS[r.direction]
        ok = "ok" if not r.failures() else "**over**"
        L.append(f"| {r.backend} | {r.stage} | {r.model} | {r.direction} | {r.launches} "
                 f"({r.kernel_launches} + {r.launches - r.kernel_launches}) | "
                 f"{r.min_bytes / 1e6:.1f} | {r.aux / 1e6:.1f} | "
                 f"{(r.min_bytes + r.aux) / r.min_bytes:.2f} | "
                 f"{ok} (<= {b['launches']}, aux <= {100 * b['aux']:.0f}%) |")
    L += ["", "## What each launch and torch op moves", "",
          "| stage | model | dir | kind | name | launches | read MB | written MB | "
          "scratch MB (charged) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for i in r.items:
            L.append(f"| {r.stage} | {r.model} | {r.direction} | {i.kind} | {i.name} | "
                     f"{i.launches} | {i.read / 1e6:.2f} | {i.written / 1e6:.2f} | "
                     f"{i.scratch / 1e6:.2f} | {i.note} |")
    bad = [f for r in rows for f in r.failures()]
    L += ["", "## Bounds", "",
          "Forward: 1 launch, aux <= 5% of min; backward: <= 2 launches, aux <= 10% of min; no "
          "host sync. " + ("Enforced (`--ci`)." if enforce else
                           "Report mode: printed, not enforced (`--ci` enforces)."), ""]
    L += [f"- OVER: {b}" for b in bad] or ["- all rows within bounds"]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ci", action="store_true",
                    help="enforce the bounds: exit 1 when a row is over (default: report)")
    ap.add_argument("--backend", default="triton", choices=("triton", "cuda"))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--out", default=None, help="also write the table to this Markdown file")
    ap.add_argument("--title", default="Byte and launch ledger")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("ledger: unset TRITON_INTERPRET (the ledger launches compiled kernels on a "
              "faked sm_90 target)", file=sys.stderr)
        return 2
    sys.path.insert(0, HERE)
    t0 = time.time()
    rows: List[Row] = []
    for model in a.models.split(","):
        for stage in a.stages.split(","):
            try:
                rows += run_case(model, stage, a.backend)
            except (RuntimeError, ValueError, ImportError) as e:
                if a.backend == "triton":
                    raise
                # e.g. no CUDA driver: the cuda backend's verdict reads the device
                print(f"ledger: the {a.backend} backend cannot run here: "
                      f"{str(e).splitlines()[0]}", file=sys.stderr)
                return 2
    md = markdown(rows, a.title, a.ci)
    if a.out:
        with open(a.out, "w") as f:
            f.write(md)
    print(md)
    bad = [f for r in rows for f in r.failures()]
    over = sum(1 for r in rows if r.failures())
    print(f"ledger: {len(rows)} rows, {over} over their bounds ({len(bad)} findings; "
          f"{'enforced' if a.ci else 'report mode: not enforced, --ci enforces'}), "
          f"{time.time() - t0:.1f} s")
    return 1 if (bad and a.ci) else 0


if __name__ == "__main__":
    sys.exit(main())
