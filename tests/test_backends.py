"""Backend capabilities as data, every refusal reason, the one registry of backend names."""
import pytest
import torch

from avstfp_fast import PromptedCLIP, explain
from avstfp_fast.ops.backends import (AUTO, Backend, Capabilities, KernelBackend,
                                      backend_choices, backend_names, check_backend_name,
                                      get_backend)
from avstfp_fast.ops.contract import make_problem


def _problem(dtype=torch.float32, E=64, Ev=None, batch=(2, 3), L=6, segments=None,
             transpose_q=False):
    Ev = Ev or E
    q = torch.randn(*batch, L, E, dtype=dtype)
    if transpose_q:
        q = torch.randn(*batch, E, L, dtype=dtype).transpose(-1, -2)
    k = torch.randn(*batch, L, E, dtype=dtype)
    v = torch.randn(*batch, L, Ev, dtype=dtype)
    if segments is None:
        pk, pv = torch.randn(batch[-1], 2, E, dtype=dtype), torch.randn(batch[-1], 2, Ev, dtype=dtype)
    else:
        pk = [torch.randn(2, E, dtype=dtype) for _ in segments]
        pv = [torch.randn(2, Ev, dtype=dtype) for _ in segments]
    return make_problem(q, k, v, pk, pv, segments=segments)


def test_registry_names_in_one_place():
    assert backend_names()[:4] == ("reference", "torch", "triton", "cuda")   # built in first
    assert AUTO not in backend_names()
    assert backend_choices() == backend_names() + (AUTO,)
    for name in backend_choices():
        assert check_backend_name(name) == name
    with pytest.raises(ValueError, match=r"backend: expected one of \('reference', 'torch'.*'auto'\), got 'fastest'"):
        check_backend_name("fastest")
    with pytest.raises(ValueError, match="mode: expected one of"):
        check_backend_name(3, arg="mode")


def test_model_accepts_exactly_literal_and_the_registry_choices():
    m = PromptedCLIP.tiny()
    for name in ("literal", "reference", "torch", AUTO):
        assert m.set_backend(name).backend == name
    assert m.set_backend("literal").layer_path == "literal"
    assert m.set_backend("reference").layer_path == "literal"
    assert m.set_backend("torch").layer_path == "fast"
    with pytest.raises(ValueError, match=r"expected one of \('literal', 'reference', 'torch', 'triton', 'cuda'.*'auto'\)"):
        m.set_backend("fast")        # the fast layer path is not a backend name


def test_backends_are_told_apart_by_class():
    assert not isinstance(get_backend("reference"), KernelBackend)
    assert not isinstance(get_backend("torch"), KernelBackend)
    for name in ("triton", "cuda"):
        b = get_backend(name)
        assert isinstance(b, KernelBackend) and isinstance(b.capabilities, Capabilities)


def test_capabilities_list_every_violated_limit():
    caps = Capabilities(devices=("cuda",), dtypes=(torch.float16,), head_dims=(32,),
                        value_dim_is_head_dim=True, dense_last_dim=("q", "prompt_k"),
                        max_segments=1, max_batch_dims=1)
    p = _problem(E=48, Ev=16, batch=(2, 3), L=6, segments=(3, 3), transpose_q=True)
    rs = caps.reasons(p, "mine")
    want = ["q is on device cpu; the mine backend needs CUDA tensors",
            "dtype torch.float32 is not supported by the mine backend",
            "head dim 48 is not supported by the mine backend: expected one of (32,)",
            "v: value dim 16 != head dim 48",
            "q: last-dim stride must be 1 for the mine backend",
            "segments: at most 1 segments are supported by the mine backend, got 2",
            "q: at most 1 batch dims of size > 1 are supported by the mine backend"]
    assert len(rs) == len(want), rs
    for w, r in zip(want, rs):
        assert w in r, (w, r)
    assert Capabilities().reasons(p, "any") == []


def test_dense_prompt_last_dim_names_the_segment():
    caps = Capabilities(dense_last_dim=("prompt_k", "prompt_v"))
    q = torch.randn(2, 4, 8)
    pk = torch.randn(8, 2).t()                     # (2, 8) with last-dim stride 2
    p = make_problem(q, q, q, [None, pk], [None, torch.randn(2, 8)], segments=(2, 2))
    rs = caps.reasons(p, "mine")
    assert len(rs) == 1 and rs[0].startswith("prompt_k[1]: last-dim stride must be 1"), rs


def test_deterministic_capability():
    caps = Capabilities(deterministic=False)
    p = _problem()
    assert caps.reasons(p, "mine") == []
    torch.use_deterministic_algorithms(True)
    try:
        rs = caps.reasons(p, "mine")
    finally:
        torch.use_deterministic_algorithms(False)
    assert len(rs) == 1 and "no deterministic mode" in rs[0]


def test_why_not_is_every_reason_in_one_sentence():
    b = get_backend("cuda")
    p = _problem(dtype=torch.float64, E=48, segments=(1, 1, 1, 1, 2))
    rs = b.reasons(p)
    assert len(rs) >= 4, rs                        # device, dtype, head dim, segments
    assert b.why_not(p) == "; ".join(rs)
    assert get_backend("torch").reasons(p) == [] and get_backend("torch").why_not(p) is None


def test_explain_prints_every_reason_and_the_limits():
    q = torch.randn(2, 3, 6, 48, dtype=torch.float64)
    pk = torch.randn(3, 2, 48, dtype=torch.float64)
    text = explain(q, q, q, pk, pk)
    cuda = text[text.index("  cuda"):]
    for w in ("device cpu", "dtype torch.float64", "head dim 48", "(supports: devices cuda"):
        assert w in cuda, text
    assert "auto picks: torch" in text


def test_a_subclass_adds_reasons_that_are_not_data():
    class Picky(Backend):
        name = "picky"
        capabilities = Capabilities(dtypes=(torch.float16,))

        def reasons(self, p):
            return super().reasons(p) + ["the moon is not full"]

    rs = Picky().reasons(_problem())
    assert len(rs) == 2 and "dtype torch.float32" in rs[0] and rs[1] == "the moon is not full"
