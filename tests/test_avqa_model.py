"""The AVQA model: per-segment tokens from the tower, the ST-AVQA head, backend parity."""
import pytest
import torch

from avstfp_fast import PromptedCLIP
from avstfp_fast.models import backbone as bb
from avstfp_fast.models.avqa import AVQAHeadConfig, PromptedCLIPAVQA, avqa_loss
from avstfp_fast.testing import rel_err

VOCAB, ANSWERS = 23, 7


def randomize_(model, scale=0.5):
    """Random prompts and gates (open gates: every stage contributes)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.startswith(("visual.", "head.")):
                p.copy_(torch.randn_like(p) * scale)
    return model


def make(modalities=("audio", "visual"), **head):
    kw = dict(vocab_size=VOCAB, num_answers=ANSWERS, hidden=32, dropout=0.0, segments=4)
    kw.update(head)
    stages = ("temporal", "spatial", "fusion") if len(modalities) == 2 else ("temporal", "spatial")
    return randomize_(PromptedCLIPAVQA.tiny(head=kw, modalities=modalities, stages=stages,
                                            backend="torch"))


def inputs(model, B=3, M=4, dtype=torch.float64):
    s = model.image_size
    a = torch.randn(B, M, 98, 128, dtype=dtype) if "audio" in model.config.modalities else None
    v = torch.randn(B, M, 3, s, s, dtype=dtype) if "visual" in model.config.modalities else None
    q = torch.randint(0, VOCAB, (B, 9))
    y = torch.randint(0, ANSWERS, (B,))
    neg = torch.stack([torch.randint(0, B, (B, M)), torch.randint(0, M, (B, M))], dim=-1)
    return a, v, q, y, neg


@pytest.mark.parametrize("mods", [("audio", "visual"), ("visual",), ("audio",)])
def test_tokens_fast_path_matches_reference(mods):
    """encode(tokens=True): every row, float64, both paths; CLS row == encode()."""
    stages = ("temporal", "spatial", "fusion") if len(mods) == 2 else ("temporal", "spatial")
    m = randomize_(PromptedCLIP.tiny(task=None, modalities=mods, stages=stages)).double()
    s = m.image_size
    a = torch.randn(2, 3, 98, 128, dtype=torch.float64) if "audio" in mods else None
    v = torch.randn(2, 3, 3, s, s, dtype=torch.float64) if "visual" in mods else None
    out = {}
    for backend in ("reference", "torch"):
        m.set_backend(backend)
        out[backend] = (m.encode(a, v, tokens=True), m.encode(a, v))
    (ref_tok, _), (tok, cls) = out["reference"], out["torch"]
    for x, r, c, name in zip(tok, ref_tok, cls, ("audio", "visual")):
        assert (x is None) == (name not in mods) and (r is None) == (name not in mods)
        if x is None:
            continue
        n = 1 + (a.shape[2] // 16) * (a.shape[3] // 16) if name == "audio" else 1 + (s // 16) ** 2
        assert x.shape == (2, 3, n, m.width)
        assert rel_err(x, r) <= 1e-10, name
        assert rel_err(x[:, :, 0], c) <= 1e-12, f"{name}: CLS row differs from encode()"


@pytest.mark.parametrize("mods", [("audio", "visual"), ("visual",)])
def test_reference_and_torch_backends_agree_in_float64(mods):
    """Answer logits, matching logits and every trainable gradient of the loss."""
    m = make(mods).double()
    a, v, q, y, neg = inputs(m)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    res = {}
    for backend in ("reference", "torch"):
        m.set_backend(backend)
        out = m(a, v, q, neg)
        grads = torch.autograd.grad(avqa_loss(out, y), [p for p in m.parameters() if p.requires_grad],
                                    allow_unused=True)
        res[backend] = (out, grads)
    (ref, ref_g), (out, g) = res["reference"], res["torch"]
    assert rel_err(out.logits, ref.logits) <= 1e-10
    if "audio" in mods:
        assert rel_err(out.match_pos, ref.match_pos) <= 1e-10
        assert rel_err(out.match_neg, ref.match_neg) <= 1e-10
    else:
        assert out.match_pos is None and out.match_neg is None
    for n, x, r in zip(names, g, ref_g):
        assert (x is None) == (r is None), n
        if x is not None:
            assert rel_err(x, r) <= 1e-10, f"grad {n}: {rel_err(x, r):.3g}"


def test_shapes_and_every_trainable_parameter_gets_gradient():
    m = make()
    a, v, q, y, neg = inputs(m, dtype=torch.float32)
    out = m(a, v, q, neg)
    assert out.logits.shape == (3, ANSWERS)
    assert out.match_pos.shape == (3, 4) and out.match_neg.shape == (3, 4)
    loss = avqa_loss(out, y)
    loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert n.startswith("visual.") and p.grad is None, n
    # without negatives (evaluation): no matching loss, same answer logits
    m.eval()
    with torch.no_grad():
        o1, o2 = m(a, v, q), m(a, v, q, neg)
    assert o1.match_neg is None and torch.equal(o1.logits, o2.logits)
    # answers outside the vocabulary of the training split (-1) are ignored by the loss
    l_ign = avqa_loss(o1, torch.tensor([-1, y[1], y[2]]))
    assert torch.isfinite(l_ign)


def test_param_groups_summary_and_state_dict():
    m = make()
    groups = {g["name"]: g for g in m.param_groups(1e-3, 2e-3)}
    head = {id(p) for p in m.head.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head
    assert all(id(p) not in head for p in groups["prompts"]["params"])
    assert "head" in m.parameter_summary(print_it=False)
    sd = m.state_dict()
    m.set_backend("reference")
    assert list(m.state_dict()) == list(sd)
    assert any(k.startswith("head.question.") for k in sd)


def test_temporal_position_embedding_starts_at_zero_and_can_be_off():
    m = make()
    assert torch.count_nonzero(m.head.segment_pos) == 0
    off = make(temporal_pos=False)
    assert not hasattr(off.head, "segment_pos")
    a, v, q, y, _ = inputs(off)
    off.double()(a, v, q)        # runs without it


def test_bad_inputs_are_refused():
    m = make()
    a, v, q, y, neg = inputs(m, dtype=torch.float32)
    with pytest.raises(TypeError, match="question"):
        m(a, v, q.float())
    with pytest.raises(ValueError, match="question"):
        m(a, v, q[:2])
    with pytest.raises(ValueError, match=r"question.*\[0, 23\)"):
        m(a, v, torch.full_like(q, VOCAB))
    with pytest.raises(ValueError, match="negatives"):
        m(a, v, q, neg[:, :2])
    with pytest.raises(ValueError, match="negatives"):
        m(a, v, q, neg + 5)
    with pytest.raises(TypeError, match="negatives"):
        m(a, v, q, neg.float())
    with pytest.raises(ValueError, match="segments"):
        a5, v5, q5, _, _ = inputs(m, M=5, dtype=torch.float32)
        m(a5, v5, q5)
    with pytest.raises(ValueError, match="task"):
        PromptedCLIPAVQA.tiny(head=dict(vocab_size=5), task="ave")
    with pytest.raises(ValueError, match="divisible"):
        AVQAHeadConfig(vocab_size=5, hidden=30, heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        AVQAHeadConfig(vocab_size=1)


def test_vocabulary_and_answers_are_checked_and_used():
    head = dict(vocab_size=4, num_answers=2, hidden=8, heads=2)
    words, answers = ["<pad>", "<unk>", "is", "it"], ["no", "yes"]
    with pytest.raises(ValueError, match=r"vocabulary: expected 4 entries \(head.vocab_size\)"):
        PromptedCLIPAVQA.tiny(head=head, vocabulary=words[:3])
    with pytest.raises(ValueError, match="token id 0 must be '<pad>'"):
        PromptedCLIPAVQA.tiny(head=head, vocabulary=words[::-1])
    with pytest.raises(ValueError, match="distinct"):
        PromptedCLIPAVQA.tiny(head=head, vocabulary=words[:3] + ["is"])
    with pytest.raises(ValueError, match=r"answers: expected 2 entries \(head.num_answers\)"):
        PromptedCLIPAVQA.tiny(head=head, answers=["yes"])
    bare = PromptedCLIPAVQA.tiny(head=head)
    with pytest.raises(ValueError, match="vocabulary: this model has none"):
        bare.encode_questions("is it")
    with pytest.raises(ValueError, match="answers: this model has none"):
        bare.decode_answers(torch.zeros(1, 2))
    m = PromptedCLIPAVQA.tiny(head=head, vocabulary=words, answers=answers)
    assert m.encode_questions("is it ok?").tolist() == [[2, 3, 1]]
    assert m.encode_questions(["it"], max_len=3).tolist() == [[3, 0, 0]]
    with pytest.raises(ValueError, match="longer than max_len=1"):
        m.encode_questions("is it", max_len=1)
    assert m.decode_answers(torch.tensor([[0.0, 1.0], [2.0, 1.0]])) == ["yes", "no"]


def test_vit_l14_trainable_parameter_count():
    """ViT-L/14, all prompts, the 512-wide head, 93 words and 42 answers (MUSIC-AVQA):
    9.64M trainable (paper Table 2: 9.3M), 313.6M total (paper: 312.7M)."""
    vis = bb.load_visual("ViT-L-14", device="meta")
    m = PromptedCLIPAVQA(vis, head=dict(vocab_size=93, num_answers=42))
    n = m.parameter_counts()
    assert n["prompts"] == PromptedCLIP(vis, task=None).parameter_counts()["prompts"]
    assert n["trainable"] == n["prompts"] + n["head"]
    assert abs(n["trainable"] / 1e6 - 9.3) <= 0.5, n
    assert abs(n["total"] / 1e6 - 312.7) <= 2.0, n
