"""The byte and launch ledger (bench/ledger.py): its accounting on a toy op sequence, its
bounds, and one real stage run (in a subprocess: the ledger needs compiled, not
interpreted, Triton kernels)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import ledger

HERE = os.path.dirname(os.path.abspath(__file__))


def test_span_counts_broadcast_dims_once():
    t = torch.empty(4, 1, 8, dtype=torch.bfloat16).expand(4, 6, 8)
    assert ledger._span(t) == 4 * 8 * 2
    assert ledger._span(torch.empty(0, 3)) == 0


def test_recorder_charges_data_moving_ops_only():
    from torch._subclasses.fake_tensor import FakeTensorMode
    led = ledger.Ledger()
    ref = [led]
    with FakeTensorMode():
        x = torch.empty(64, 32, device="cuda", dtype=torch.float32)
        led.register(x)
        with ledger._recorder(ref):
            a = torch.zeros(64, 32, device="cuda")                 # fill: written only
            a.copy_(x)                                               # read x, write a
            b = x.to(torch.bfloat16)                                 # cast: read + write
            v = x.view(32, 64).t()                                   # views: nothing
            s = x.sum(0)                                             # reduction
            e = torch.empty(8, device="cuda")                        # allocation: nothing
    names = [(i.name, i.read, i.written) for i in led.items]
    n = 64 * 32 * 4
    assert names == [("aten.zeros", 0, n), ("aten.copy_", n, n), ("aten._to_copy", n, n // 2),
                     ("aten.sum", n, 32 * 4)], names
    assert all(i.launches == 1 for i in led.items)
    del a, b, v, s, e


def test_scratch_is_what_dies_inside_the_call():
    from torch._subclasses.fake_tensor import FakeTensorMode
    led = ledger.Ledger()
    with FakeTensorMode():
        with ledger._recorder([led]):
            keep = torch.empty(10, device="cuda")
            tmp = torch.empty(100, device="cuda")
        item = ledger.Item("kernel", "k", 1)
        led.touch(item, [keep, tmp])
        del tmp
        led.finish()
    assert item.scratch == 2 * 100 * 4            # one read + one write of the dead buffer
    del keep


def _row(direction, launches, aux, syncs=0):
    items = [ledger.Item("kernel", "k", launches)]
    items += [ledger.Item("torch", "aten.zeros", 0, 0, aux)] if aux else []
    items += [ledger.Item("sync", "aten._local_scalar_dense", 0)] * syncs
    return ledger.Row("B16", "spatial", direction, "triton", 1000.0, items)


@pytest.mark.parametrize("direction,launches,aux,syncs,bad", [
    ("fwd", 1, 50, 0, 0), ("fwd", 1, 51, 0, 1), ("fwd", 2, 0, 0, 1),
    ("bwd", 2, 100, 0, 0), ("bwd", 2, 101, 0, 1), ("bwd", 3, 0, 0, 1), ("bwd", 1, 0, 1, 1)])
def test_bounds(direction, launches, aux, syncs, bad):
    assert len(_row(direction, launches, aux, syncs).failures()) == bad


def test_ledger_runs_a_stage_in_report_mode():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "ledger.py"), "--models", "B16",
                        "--stages", "temporal"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| triton | temporal | B16 | fwd | 1 (1 + 0) |" in r.stdout
    assert "| triton | temporal | B16 | bwd |" in r.stdout


# ------------------------------------------------------------------ cuda backend's launches
def _plan_ints(dtype, segments, prompts, head_dim=64, nseq=8):
    from avstfp_fast.ops.layout import LaunchPlan
    L = sum(segments)
    q = torch.empty(nseq, L, head_dim, dtype=dtype)
    pks = [torch.empty(p, head_dim, dtype=dtype) if p else None for p in prompts]
    pl = LaunchPlan(q, q, q, pks, pks, segments, segments, 0.125, out=q, dout=q, dq=q, dk=q,
                    dv=q, backward=True)
    return pl.ints()


@pytest.mark.parametrize("dtype,segments,prompts,kernels,slots,delta", [
    (torch.bfloat16, (10,), (2,), ("seq_bwd_kernel",), 1, False),   # seq_reps 8: 1 row set
    (torch.float16, (10, 6), (0, 0), ("seq_bwd_kernel",), 0, False),
    (torch.bfloat16, (1, 196), (10, 10), ("dq_kernel", "dkv_kernel"), 8, True),
    (torch.float32, (10,), (2,), ("dq_kernel", "dkv_kernel"), 8, True),
    (torch.bfloat16, (0,), (2,), ("seq_bwd_kernel",), 1, False),  # dK/dV of the prompts
])
def test_cuda_launches_follow_the_plan(dtype, segments, prompts, kernels, slots, delta):
    """At most 2 kernels per backward and nothing around them: delta is computed by the
    dQ kernel, the prompt gradients are finished in the last kernel (scratch: fp32
    partials, one slot per sequence or per seq_reps row set, then delta)."""
    from avstfp_fast.ops.cuda_backend import launches
    la = launches("bwd", _plan_ints(dtype, segments, prompts))
    assert la.kernels == kernels
    L = sum(segments)
    assert la.scratch_floats == sum(2 * slots * P * 64 for P in prompts) + (8 * L if delta else 0)
    assert la.tickets == (sum(1 for P in prompts if P))     # one row set per prompted segment
    fwd = ("fwd_kernel",) if sum(segments) else ()          # no query tile: no launch
    assert launches("fwd", _plan_ints(dtype, segments, prompts)).kernels == fwd
    assert launches("bwd", _plan_ints(dtype, segments, prompts, nseq=0)).kernels == ()
    with pytest.raises(ValueError, match="op"):
        launches("dq", _plan_ints(dtype, segments, prompts))


def test_cuda_op_schemas_are_the_bindings():
    from avstfp_fast.ops.cuda_backend import OP_SCHEMAS
    src = open(os.path.join(HERE, "..", "csrc", "binding.cpp")).read()
    flat = "".join(part for part in src.replace('"\n', '"').split('"')[1::2])
    for schema in OP_SCHEMAS.values():
        assert schema in flat, schema


def test_ledger_runs_a_cuda_stage_in_report_mode():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(HERE, "ledger.py"), "--backend", "cuda",
                        "--models", "B16", "--stages", "temporal,spatial"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "seq_bwd_kernel" in r.stdout and "| dq_kernel + dkv_kernel |" in r.stdout


def test_seq_reps_rule():
    """The short backward sums the prompt gradients of the sequences sharing a prompt row
    set in one warp when those sequences are r * (nseq / R) + g; else by tickets."""
    from avstfp_fast.ops import layout
    from avstfp_fast.ops.cuda_backend import launches
    e = lambda *s: torch.empty(*s, 2, 64)            # noqa: E731  (P = 2, E = 64)
    assert layout.seq_reps([e(197, 12)], [e(197, 12)], (8, 197, 12)) == 8   # temporal
    assert layout.seq_reps([e()], [e()], (2, 3)) == 6                      # shared by all
    assert layout.seq_reps([e(2, 1)], [e(2, 1)], (2, 3)) == 0              # kept dim leads
    assert layout.seq_reps([e(3)], [e(2, 1)], (2, 3)) == 1                 # own slices: (2, 3)
    assert layout.seq_reps([e(3), e(2, 3)], [e(3), e(2, 3)], (2, 3)) == 0  # patterns differ
    assert layout.seq_reps([None], [None], (2, 3)) == 0
    assert layout.seq_reps([e()], [e()], (layout.SEQ_REPS_MAX + 1,)) == 0
    ints = _plan_ints(torch.bfloat16, (10,), (2,), nseq=layout.SEQ_REPS_MAX + 1)
    assert ints[15] == 0 and ints[13] == 0                 # the ticket reduction instead
    ints = _plan_ints(torch.bfloat16, (10,), (2,), nseq=8)
    assert ints[15] == 8 and ints[13] == 0
    ints = _plan_ints(torch.float32, (10,), (2,), nseq=8)
    assert ints[15] == 0 and ints[13] == 0                 # fp32: the two-kernel path
    assert launches("bwd", ints).kernels == ("dq_kernel", "dkv_kernel")
