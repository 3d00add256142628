"""The op's per-layout plan cache (ops/attention.py): a repeated layout skips validation
and backend selection; any change to what validation reads validates again, with the
same errors as a first call; results stay those of the reference."""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from avstfp_fast.ops import attention as A
from avstfp_fast.ops import prompted_attention, prompted_attention_qkv
from avstfp_fast.ops.backends import get_backend
from avstfp_fast.ops.contract import make_problem
from avstfp_fast.testing import assert_close


def _kernel_backend():
    """A kernel backend that runs here (triton under TRITON_INTERPRET=1), else skip."""
    q = torch.randn(1, 4, 32)
    try:
        b = get_backend("triton")
    except (ImportError, ValueError) as e:
        pytest.skip(f"triton unavailable: {e}")
    if b.why_not(make_problem(q, q, q)) is not None:
        pytest.skip(f"triton cannot run here: {b.why_not(make_problem(q, q, q))}")
    return "triton"


@pytest.fixture
def validations(monkeypatch):
    """Counts make_problem calls made by the public op."""
    A._PLANS.clear()
    n = [0]
    real = A.make_problem

    def counting(*a, **k):
        n[0] += 1
        return real(*a, **k)
    monkeypatch.setattr(A, "make_problem", counting)
    yield n
    A._PLANS.clear()


def _qkv(B=2, L=6, H=2, d=32, dtype=torch.float32):
    return torch.randn(B, L, 3, H, d, dtype=dtype, requires_grad=True)


def _ref(qkv, pk, pv):
    q, k, v = (qkv.select(2, i).movedim(1, -2) for i in range(3))
    return prompted_attention(q, k, v, pk, pv, backend="reference")


def test_repeated_layout_is_validated_once_and_stays_exact(validations):
    be = _kernel_backend()
    for i in range(3):                      # fresh data, same layout
        qkv = _qkv()
        pk, pv = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
        out = prompted_attention_qkv(qkv, pk, pv, qkv_dim=2, seq_dim=1, backend=be)
        assert_close(out, _ref(qkv, pk, pv), torch.float32, f"call {i}")
        g = torch.randn_like(out)
        (dqkv,) = torch.autograd.grad(out, qkv, g)
        qkv2 = qkv.detach().requires_grad_()
        (ref,) = torch.autograd.grad(_ref(qkv2, pk, pv), qkv2, g)
        assert_close(dqkv, ref, torch.float32, f"dqkv call {i}")
    assert validations[0] == 1 + 6           # + the reference calls (never cached)


def test_unpacked_call_is_cached_too(validations):
    be = _kernel_backend()
    for _ in range(2):
        q, k, v = (torch.randn(2, 5, 32) for _ in range(3))
        pk = torch.randn(1, 2, 32).expand(2, 2, 32)          # stride-0 prompts
        out = prompted_attention(q, k, v, pk, pk, backend=be)
        assert_close(out, prompted_attention(q, k, v, pk, pk, backend="reference"),
                     torch.float32)
    assert validations[0] == 1 + 2           # + the reference calls (never cached)


def _error(fn):
    with pytest.raises((ValueError, TypeError)) as e:
        fn()
    return type(e.value), str(e.value)


@pytest.mark.parametrize("change", ["qkv stride", "prompt dtype", "prompt shape",
                                    "head dim", "segments", "scale type", "backend"])
def test_a_changed_layout_validates_again_with_the_same_error(validations, change):
    be = _kernel_backend()
    qkv = _qkv(L=6)
    pk, pv = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    kw = dict(qkv_dim=2, seq_dim=1, backend=be)
    prompted_attention_qkv(qkv, pk, pv, **kw)                 # cache the good layout
    bad = dict(qkv=qkv, pk=pk, pv=pv, kw=dict(kw))
    if change == "qkv stride":
        bad["qkv"] = torch.randn(6, 2, 3, 2, 32).transpose(0, 1)     # same shape, strided
    elif change == "prompt dtype":
        bad["pk"] = pk.double()
    elif change == "prompt shape":
        bad["pv"] = torch.randn(2, 4, 32)
    elif change == "head dim":
        bad["pk"], bad["pv"] = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    elif change == "segments":
        bad["kw"]["segments"] = (2, 3)
        bad["pk"], bad["pv"] = [pk, pk], [pv, pv]
    elif change == "scale type":
        bad["kw"]["scale"] = "0.1"
    elif change == "backend":
        bad["kw"]["backend"] = "nope"

    def call():
        return prompted_attention_qkv(bad["qkv"], bad["pk"], bad["pv"], **bad["kw"])
    cached = _error(call)
    A._PLANS.clear()
    assert cached == _error(call)              # exactly what an uncached call raises


def test_deterministic_switch_and_environment_are_part_of_the_key(validations, monkeypatch):
    be = _kernel_backend()
    qkv = _qkv()
    prompted_attention_qkv(qkv, qkv_dim=2, seq_dim=1, backend=be)
    prompted_attention_qkv(qkv, qkv_dim=2, seq_dim=1, backend=be)
    assert validations[0] == 1
    try:
        torch.use_deterministic_algorithms(True)
        prompted_attention_qkv(qkv, qkv_dim=2, seq_dim=1, backend=be)
    finally:
        torch.use_deterministic_algorithms(False)
    assert validations[0] == 2
    monkeypatch.setenv("TRITON_INTERPRET", "0")      # the triton backend's verdict changes
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        prompted_attention_qkv(qkv, qkv_dim=2, seq_dim=1, backend=be)


def test_autocast_and_generators_take_the_full_path(validations):
    be = _kernel_backend()
    qkv = _qkv()
    prompted_attention_qkv(qkv, qkv_dim=2, seq_dim=1, backend=be)
    with torch.autocast("cpu", dtype=torch.float16):
        prompted_attention_qkv(qkv.detach().half(), qkv_dim=2, seq_dim=1, backend=be)
        prompted_attention_qkv(qkv.detach().half(), qkv_dim=2, seq_dim=1, backend=be)
    assert validations[0] == 3
    q = torch.randn(1, 6, 32)
    out = prompted_attention(q, q, q, segments=(n for n in (2, 4)), backend=be)
    ref = prompted_attention(q, q, q, segments=(2, 4), backend="reference")
    assert_close(out, ref, torch.float32)


def test_saved_tensor_hooks_returning_copies_keep_gradients_exact(validations):
    """A saved-tensor hook may hand the backward copies in another layout (a clone of an
    expanded prompt is dense): that backward reads their strides, and calls before and
    after it, with and without the hook, keep the cached plans' layouts apart."""
    be = _kernel_backend()
    qkv = torch.randn(2, 5, 3, 2, 32, requires_grad=True)
    pk0 = torch.randn(1, 3, 32, requires_grad=True)
    pv0 = torch.randn(1, 3, 32, requires_grad=True)
    g = torch.randn(2, 2, 5, 32)

    def run(backend, hooked):
        for t in (qkv, pk0, pv0):
            t.grad = None
        pk, pv = pk0.expand(2, 3, 32), pv0.expand(2, 3, 32)     # stride-0 head dim
        with (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
              if hooked else contextlib.nullcontext()):
            out = prompted_attention_qkv(qkv, pk, pv, qkv_dim=2, seq_dim=1, backend=backend)
        out.backward(g)
        return [t.grad.clone() for t in (qkv, pk0, pv0)]
    ref = run("reference", False)
    for hooked in (False, True, False, True):
        for name, a, b in zip(("dqkv", "dpk", "dpv"), run(be, hooked), ref):
            assert_close(a, b, torch.float32, f"{name}, hook={hooked}")


def test_per_node_saved_tensor_hooks_registered_after_forward_keep_gradients_exact(validations):
    """Hooks registered on the node after its forward (``grad_fn._raw_saved_tensors``)
    may hand the backward copies in another layout (a clone of a permuted view is dense):
    the backward sees the changed strides and derives the layout from the copies."""
    be = _kernel_backend()
    base = torch.randn(2, 5, 2, 3, 32)                      # (B, L, H, 3, d)
    pk0 = torch.randn(1, 3, 32, requires_grad=True)
    pv0 = torch.randn(1, 3, 32, requires_grad=True)
    g = torch.randn(2, 2, 5, 32)

    def run(backend, hooked):
        leaf_ = base.clone().requires_grad_(True)
        q, k, v = (leaf_[..., i, :].transpose(1, 2) for i in range(3))  # (B, H, L, d) views
        pk, pv = pk0.expand(2, 3, 32), pv0.expand(2, 3, 32)
        for t in (pk0, pv0):
            t.grad = None
        out = prompted_attention(q, k, v, pk, pv, backend=backend)
        if hooked:
            for saved in out.grad_fn._raw_saved_tensors:
                saved.register_hooks(lambda t: t.clone(), lambda t: t)
        out.backward(g)
        return [leaf_.grad.clone()] + [t.grad.clone() for t in (pk0, pv0)]
    ref = run("reference", False)
    for hooked in (False, True, False):
        for name, a, b in zip(("dqkv", "dpk", "dpv"), run(be, hooked), ref):
            assert_close(a, b, torch.float32, f"{name}, hook={hooked}")


def test_env_reader_follows_os_environ(monkeypatch):
    """The plan keys' environment reads (backends.env_reader, env_token) see every update
    made through os.environ, as os.environ.get would."""
    from avstfp_fast.ops import backends as B
    read = B.env_reader("AVSTFP_TEST_ENV_READER")
    monkeypatch.delenv("AVSTFP_TEST_ENV_READER", raising=False)
    assert read() is None
    monkeypatch.setenv("AVSTFP_TEST_ENV_READER", "seq")
    first = read()
    assert first is not None
    monkeypatch.setenv("AVSTFP_TEST_ENV_READER", "fa2")
    assert read() != first
    monkeypatch.setenv("AVSTFP_TEST_ENV_READER", "seq")
    assert read() == first
    monkeypatch.delenv("AVSTFP_TEST_ENV_READER")
    assert read() is None
    token = B.env_token()
    monkeypatch.setenv("TRITON_INTERPRET", "0" if os.environ.get("TRITON_INTERPRET") == "1"
                       else "1")
    assert B.env_token() != token


def test_no_eager_binding_in_the_interpreter(validations):
    """The eager path needs cached compiled launchers: under TRITON_INTERPRET every call
    takes the full path (plan.problem, the backend's forward/backward), which the
    tests here check."""
    be = _kernel_backend()              # on the CPU: the interpreter
    q, k, v = (torch.randn(2, 5, 32) for _ in range(3))
    prompted_attention(q, k, v, backend=be)
    prompted_attention(q, k, v, backend=be)
    assert A._PLANS and all(pl.fast is None for pl in A._PLANS.values())
