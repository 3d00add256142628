"""PromptedCLIP fast path ("torch" backend) against the literal reference model."""
import pytest
import torch

from avstfp_fast import PromptedCLIP, ReferenceAVSTFP
from avstfp_fast.models import backbone as bb
from avstfp_fast.testing import assert_close, randomize_, rel_err


def inputs(model, B, M, dtype=torch.float64, audio=True, video=True):
    a = torch.randn(B, M, 98, 128, dtype=dtype) if audio else None
    s = model.image_size
    v = torch.randn(B, M, 3, s, s, dtype=dtype) if video else None
    return a, v


def _run(model, backend, dtype, a, v, go):
    model = model.to(dtype)
    model.set_backend(backend)
    out = model(None if a is None else a.to(dtype), None if v is None else v.to(dtype))
    out = out if isinstance(out, torch.Tensor) else torch.cat([t for t in out if t is not None], -1)
    if go is None:
        go = torch.randn_like(out)
    params = [p for p in model.parameters() if p.requires_grad]
    return out, torch.autograd.grad(out, params, go.to(dtype), allow_unused=True), go


# The gates β are scalars per layer whose gradient sums ~B*M*N*D products with heavy
# cancellation; in fp32 that sum alone carries ~1e-5 relative rounding, so they get 5e-5.
# Every gradient (gates included) is also checked in float64 against 1e-10, which is what
# proves the fast path computes the same function.
GATE_TOL32 = 5e-5


def compare(model, a, v, what="", backend="torch"):
    """Fast path vs the reference in fp64: logits and every trainable gradient, in
    float64 (exact rewrite, 1e-10) and float32 (docs/design.md, "Tolerances")."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ref, ref_g, go = _run(model, "reference", torch.float64, a, v, None)
    for dtype in (torch.float64, torch.float32):
        out, g, _ = _run(model, backend, dtype, a, v, go)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        assert rel_err(out, ref) <= tol, f"{what} logits {dtype}: {rel_err(out, ref):.3g}"
        for n, x, y in zip(names, g, ref_g):
            assert (x is None) == (y is None), n      # e.g. the unused visual.proj
            if x is None:
                continue
            t = GATE_TOL32 if dtype == torch.float32 and n.startswith("beta_") else tol
            e = rel_err(x, y)
            assert e <= t, f"{what} grad {n} {dtype}: relative error {e:.3g} > {t:g}"


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("quick_gelu", [False, True])
def test_fast_matches_reference_default_config(B, quick_gelu):
    torch.manual_seed(B)
    m = randomize_(PromptedCLIP.tiny(quick_gelu=quick_gelu))
    a, v = inputs(m, B, 3)
    compare(m, a, v, f"B={B}")


ABLATIONS = [
    dict(n_temporal=0),
    dict(n_spatial=0),
    dict(n_fusion=0),
    dict(n_temporal=0, n_spatial=0, n_fusion=0),
    dict(stages=("temporal",)),
    dict(stages=("spatial",)),
    dict(stages=("fusion",)),
    dict(stages=("temporal", "spatial")),
    dict(stages=("spatial", "fusion")),
    dict(stages=("temporal", "fusion")),
    dict(stages=()),
    dict(modalities=("audio",), stages=("temporal", "spatial")),
    dict(modalities=("visual",), stages=("temporal", "spatial")),
    dict(full_finetune=True),
    dict(task="avar"),
    dict(task=None),
    dict(n_temporal=3, n_spatial=1, n_fusion=5),
]


@pytest.mark.parametrize("kw", ABLATIONS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_every_ablation_switch(kw):
    m = randomize_(PromptedCLIP.tiny(**kw))
    mods = m.config.modalities
    a, v = inputs(m, 2, 2, audio="audio" in mods, video="visual" in mods)
    compare(m, a, v, str(kw))


def test_vit_b16_shaped_layer():
    """One layer with ViT-B/16 width, heads and token counts (197 visual, 49 audio)."""
    vis = bb.tiny_visual(width=768, layers=1, heads=12, patch_size=16, image_size=224)
    m = randomize_(PromptedCLIP(vis), scale=0.05)
    a, v = inputs(m, 1, 2)
    compare(m, a, v, "B/16 layer")


def test_zero_prompts_equal_frozen_open_clip_tower():
    """All prompt counts 0, β = 0, fusion off: visual features == open_clip's ln_post(CLS)."""
    vis = bb.tiny_visual()
    m = PromptedCLIP(vis, n_temporal=0, n_spatial=0, n_fusion=0, beta_init=0.0,
                     stages=("temporal", "spatial"), task=None).double()
    _, v = inputs(m, 2, 3)
    vis.output_tokens = False
    with torch.no_grad():
        want = torch.stack([vis.ln_post(vis.transformer(vis._embeds(v[:, i]))[:, 0])
                            for i in range(3)], dim=1)
        for backend in ("reference", "torch"):
            m.set_backend(backend)
            _, got = m.encode(None if "audio" not in m.config.modalities else
                              torch.randn(2, 3, 98, 128, dtype=torch.float64), v)
            assert_close(got, want, torch.float64, backend)


def test_state_dict_identical_across_backends_and_reference_class():
    m1 = PromptedCLIP.tiny(backend="torch")
    m2 = ReferenceAVSTFP(bb.tiny_visual())
    assert m2.backend == "literal" and m2.layer_path == "literal"
    assert list(m1.state_dict()) == list(m2.state_dict())
    m2.load_state_dict(m1.state_dict())
    m2.set_backend("torch")
    a, v = inputs(m1, 1, 2, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(m1(a, v), m2(a, v))


def test_shares_weights_with_given_open_clip_model():
    vis = bb.tiny_visual()
    m = PromptedCLIP(vis)
    assert m.visual is vis
    assert not any(p.requires_grad for p in vis.parameters())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert all(not n.startswith("visual.") for n in trainable)


def test_backend_switch_and_errors():
    m = PromptedCLIP.tiny()
    assert m.set_backend("reference").backend == "reference"
    with pytest.raises(ValueError, match="backend.*'literal'.*'reference'.*'fastest'"):
        m.set_backend("fastest")


def test_literal_names_the_literal_layers_and_reference_still_selects_them():
    """Backend "literal" runs models/reference.py; "reference" (the op oracle's name)
    still does, with the same output and the same state_dict."""
    m = randomize_(PromptedCLIP.tiny(backend="literal"))
    assert (m.backend, m.layer_path) == ("literal", "literal")
    a, v = inputs(m, 2, 2, dtype=torch.float32)
    with torch.no_grad():
        lit = m(a, v)
        assert torch.equal(m.set_backend("reference")(a, v), lit)
        assert m.layer_path == "literal"
        assert_close(m.set_backend("torch")(a, v), lit, torch.float32, "torch")
    assert list(m.state_dict()) == list(PromptedCLIP.tiny(backend="torch").state_dict())
    with pytest.raises(ValueError, match="backend"):
        PromptedCLIP.tiny(backend=3)


@pytest.mark.parametrize("case,exc,words", [
    ("segments_mismatch", ValueError, ["audio/video", "(2, 3, 98, 128)", "(2, 4, 3, 64, 64)"]),
    ("batch_mismatch", ValueError, ["audio/video", "(1, 3, 98, 128)"]),
    ("video_size", ValueError, ["video", "(B, M, 3, 64, 64)", "(2, 3, 3, 32, 32)"]),
    ("audio_rank", ValueError, ["audio", "(B, M, T, F)", "(2, 98, 128)"]),
    ("audio_type", TypeError, ["audio", "list"]),
    ("missing_modality", ValueError, ["video", "modalities"]),
])
def test_model_bad_input(case, exc, words):
    m = PromptedCLIP.tiny()
    a, v = torch.randn(2, 3, 98, 128), torch.randn(2, 3, 3, 64, 64)
    if case == "segments_mismatch":
        v = torch.randn(2, 4, 3, 64, 64)
    elif case == "batch_mismatch":
        a = torch.randn(1, 3, 98, 128)
    elif case == "video_size":
        v = torch.randn(2, 3, 3, 32, 32)
    elif case == "audio_rank":
        a = torch.randn(2, 98, 128)
    elif case == "audio_type":
        a = [1]
    elif case == "missing_modality":
        m = PromptedCLIP.tiny(modalities=("audio",), stages=("spatial",))
    with pytest.raises(exc) as ei:
        m(a, v)
    for w in words:
        assert w in str(ei.value), f"{w!r} not in {ei.value}"


def test_config_errors():
    with pytest.raises(ValueError, match="fusion"):
        PromptedCLIP.tiny(modalities=("audio",))
    with pytest.raises(ValueError, match="n_spatial"):
        PromptedCLIP.tiny(n_spatial=-1)
    with pytest.raises(ValueError, match="stages"):
        PromptedCLIP.tiny(stages=("temporal", "bogus"))
    with pytest.raises(ValueError, match="pretrained"):
        PromptedCLIP("ViT-B-16", pretrained="openai", device="meta")


def test_load_local_checkpoint(tmp_path):
    """A CLIP checkpoint on local disk (full-model keys, DDP prefix, wrapper) loads."""
    src = bb.load_visual("ViT-S-32")
    sd = {f"module.visual.{k}": v for k, v in src.state_dict().items()}
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": sd}, path)
    m = PromptedCLIP("ViT-S-32", pretrained=str(path), n_spatial=1)
    for k, v in src.state_dict().items():
        assert torch.equal(m.visual.state_dict()[k], v), k
    torch.save({"visual.conv1.weight": sd["module.visual.conv1.weight"]}, path)
    with pytest.raises(ValueError, match="pretrained: .* lacks"):
        PromptedCLIP("ViT-S-32", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="pretrained: no such file"):
        PromptedCLIP("ViT-S-32", pretrained=str(tmp_path / "missing.pt"))


def test_param_groups_cover_trainable():
    m = PromptedCLIP.tiny()
    groups = m.param_groups(1e-3, 1e-2, 0.2)
    ids = {id(p) for g in groups for p in g["params"]}
    assert ids == {id(p) for p in m.parameters() if p.requires_grad}
    assert {g["name"] for g in groups} == {"prompts", "head"}


def test_fast_path_traces_without_graph_breaks():
    """torch.compile(fullgraph=True) captures the whole fast path (dynamo, eager backend)."""
    m = randomize_(PromptedCLIP.tiny(backend="torch"))
    a, v = inputs(m, 2, 3, dtype=torch.float32)
    cm = torch.compile(m, backend="eager", fullgraph=True)
    out = cm(a, v)
    out.sum().backward()
    with torch.no_grad():
        assert torch.allclose(out, m(a, v), atol=1e-6)


def test_built_from_a_loaded_open_clip_model_shares_its_tower():
    import open_clip
    clip = open_clip.create_model("ViT-S-32", pretrained=None)
    m = PromptedCLIP(clip, n_spatial=1)
    assert m.visual is clip.visual
    assert m.visual.conv1.weight.data_ptr() == clip.visual.conv1.weight.data_ptr()
    with pytest.raises(ValueError, match="pretrained"):
        PromptedCLIP(clip, pretrained="/some/file.pt")
    with pytest.raises(TypeError, match="model"):
        PromptedCLIP(42)


def test_audio_pos_embed_resizes_in_the_tower_dtype():
    """A float64 tower resizes its positional embedding in float64 (no float32 detour);
    half towers resize in float32 and return their own dtype."""
    import torch.nn.functional as F
    vis = bb.tiny_visual().double()
    with torch.no_grad():
        vis.positional_embedding.copy_(torch.randn_like(vis.positional_embedding))
    pos = vis.positional_embedding
    g = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 8), mode="bicubic", align_corners=False)
    want = torch.cat([pos[:1], want.flatten(2).transpose(1, 2)[0]])
    got = bb.audio_pos_embed(vis, 6, 8)
    assert got.dtype == torch.float64
    assert rel_err(got, want) <= 1e-15, rel_err(got, want)
    half = bb.audio_pos_embed(bb.tiny_visual().to(torch.bfloat16), 6, 8)
    assert half.dtype == torch.bfloat16 and half.shape == got.shape


def test_layer_paths_side_by_side_without_an_import_cycle():
    """models/reference.py (literal) and models/fast.py do not import the model class; the
    model picks one through LAYER_PATHS; "reference" names the op backend too."""
    import ast
    import inspect

    from avstfp_fast.models import fast, prompted_clip, reference
    for mod in (fast, reference):
        tree = ast.parse(inspect.getsource(mod))
        imported = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not any("prompted_clip" in m for m in imported), (mod.__name__, imported)
    assert prompted_clip.LAYER_PATHS == {"literal": reference.encode_tokens,
                                         "fast": fast.encode_tokens}
    assert prompted_clip.layer_path("reference") == "literal"
    assert prompted_clip.layer_path("literal") == "literal"
    assert {prompted_clip.layer_path(b) for b in ("torch", "triton", "cuda", "auto")} == {"fast"}


def test_prompt_keys_name_the_parameters():
    from avstfp_fast.models.config import PromptKey, PromptKind
    m = PromptedCLIP.tiny()
    for key, name in [(PromptKey(PromptKind.TEMPORAL_KEY, "audio"), "temporal_key_audio"),
                      (PromptKey(PromptKind.TEMPORAL_VALUE, "visual"), "temporal_value_visual"),
                      (PromptKey(PromptKind.SPATIAL, "audio"), "spatial_audio"),
                      (PromptKey(PromptKind.FUSION), "fusion_prompts")]:
        assert key.param_name == name
        assert torch.equal(m.layer_prompts(1, key), getattr(m, name)[1])
    assert PromptedCLIP.tiny(n_fusion=0).layer_prompts(0, PromptKey(PromptKind.FUSION)) is None
