"""Prompt files: bit-exact round trips for every model configuration, and clear errors for
the wrong backbone, the wrong configuration, and damaged files."""
import json

import pytest
import torch

from avstfp_fast import PromptedCLIP
from avstfp_fast.models import prompt_file as pfm
from avstfp_fast.models.prompt_file import PromptFileError, fingerprint, load_prompts

TINY = dict(width=32, layers=2, heads=2, image_size=32, backend="torch")

CONFIGS = {
    "default": {},
    "temporal-only": dict(stages=("temporal",)),
    "spatial-only": dict(stages=("spatial",)),
    "no-stages": dict(stages=()),
    "fusion-only": dict(stages=("fusion",)),
    "audio-only": dict(modalities=("audio",), stages=("temporal", "spatial")),
    "visual-only": dict(modalities=("visual",), stages=("temporal", "spatial")),
    "zero-prompts": dict(n_temporal=0, n_spatial=0, n_fusion=0),
    "counts": dict(n_temporal=3, n_spatial=1, n_fusion=4, beta_init=0.5),
    "avar": dict(task="avar", num_classes=7),
    "features": dict(task=None),
    "full-finetune": dict(full_finetune=True),
}


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = PromptedCLIP.tiny(**TINY, **kw)
    with torch.no_grad():                      # trained-looking values, not the init
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return m


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_exact(tmp_path, name):
    m = _model(**CONFIGS[name])
    path = m.save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny", classes=None)
    # a fresh model on the same frozen tower (the same seed rebuilds it)
    torch.manual_seed(0)
    m2 = PromptedCLIP.from_prompts(path, backend="torch")
    assert m2.config == m.config
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k
    meta = m2.prompt_metadata
    assert meta["contents"] == ("everything" if m.config.full_finetune else "prompts")
    assert meta["backbone"] == "tiny" and meta["backbone_fingerprint"].startswith("sha256:")
    assert json.loads(meta["config"])["stages"] == list(m.config.stages)
    import avstfp_fast
    assert meta["library_version"] == avstfp_fast.__version__


def test_prompts_only_file_holds_no_tower_weights(tmp_path):
    m = _model()
    pf = pfm.read_prompt_file(m.save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny"))
    assert pf.tensors and not any(k.startswith("visual.") for k in pf.tensors)
    assert {k for k in pf.tensors} == {n for n, p in m.named_parameters() if p.requires_grad}
    full = pfm.read_prompt_file(m.save_prompts(str(tmp_path / "f.safetensors"),
                                               backbone="tiny", include_backbone=True))
    assert full.everything and set(full.tensors) == set(m.state_dict())
    # a random tower travels with the prompts: any fresh seed loads it
    torch.manual_seed(123)
    m2 = PromptedCLIP.from_prompts(str(tmp_path / "f.safetensors"), backend="torch")
    assert torch.equal(m2.visual.conv1.weight, m.visual.conv1.weight)


def test_wrong_backbone_weights_are_refused(tmp_path):
    path = _model(seed=0).save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny")
    torch.manual_seed(1)                                   # another random tower
    with pytest.raises(PromptFileError, match="backbone weights differ.*fingerprint"):
        PromptedCLIP.from_prompts(path, backend="torch")
    with pytest.raises(PromptFileError, match="backbone differs.*'tiny', got 'ViT-B-16'"):
        PromptedCLIP.from_prompts(path, backbone="ViT-B-16")
    other = PromptedCLIP.tiny(width=48, layers=2, heads=2, image_size=32, backend="torch")
    with pytest.raises(PromptFileError, match="architecture differs.*width: file 32, "
                                              "backbone 48"):
        load_prompts(other, path)


def test_wrong_config_is_refused_naming_the_fields(tmp_path):
    path = _model(n_spatial=4).save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny")
    torch.manual_seed(0)
    other = PromptedCLIP.tiny(**TINY, n_spatial=3, stages=("spatial", "temporal"))
    with pytest.raises(PromptFileError, match=r"configuration differs: n_spatial: file 4, "
                                              r"model 3; stages"):
        load_prompts(other, path)


def test_damaged_files_are_refused(tmp_path):
    path = _model().save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny")
    data = open(path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PromptFileError, match="truncated or damaged"):
        PromptedCLIP.from_prompts(str(cut))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(PromptFileError, match="truncated or damaged"):
        pfm.read_prompt_file(str(junk))
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(PromptFileError, match="not an avstfp_fast prompt file"):
        pfm.read_prompt_file(str(foreign))
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        pfm.read_prompt_file(str(tmp_path / "missing.safetensors"))


def test_fingerprint_is_cached_until_a_weight_changes(monkeypatch):
    m = _model()
    fp = fingerprint(m.visual)
    calls = {"n": 0}
    real = pfm.hashlib.sha256

    def counting(*a):
        calls["n"] += 1
        return real(*a)
    monkeypatch.setattr(pfm.hashlib, "sha256", counting)
    assert fingerprint(m.visual) == fp and calls["n"] == 0         # cached
    with torch.no_grad():
        m.visual.conv1.weight[0, 0, 0, 0] += 1.0
    assert fingerprint(m.visual) != fp and calls["n"] == 1          # recomputed


def test_a_loaded_model_saves_an_equivalent_file(tmp_path):
    m = _model()
    a = m.save_prompts(str(tmp_path / "a.safetensors"), backbone="tiny", include_backbone=True,
                       classes=["x", "y"], inputs={"segments": 10})
    b = PromptedCLIP.from_prompts(a, backend="torch").save_prompts(str(tmp_path / "b.safetensors"))
    pa, pb = pfm.read_prompt_file(a), pfm.read_prompt_file(b)
    assert pa.meta == pb.meta
    assert pa.tensors.keys() == pb.tensors.keys()
    assert all(torch.equal(pa.tensors[k], pb.tensors[k]) for k in pa.tensors)


# --------------------------------------------------------------------------------------
# AVQA models: the head's buffers, its settings, vocabulary and answers travel too
# --------------------------------------------------------------------------------------
WORDS = ["<pad>", "<unk>", "is", "the", "violin", "sounding", "before", "piano"]
ANSWERS = ["no", "yes", "two"]


def _avqa(seed=0, vocabulary=WORDS, **head):
    from avstfp_fast.models.avqa import PromptedCLIPAVQA
    kw = dict(vocab_size=len(WORDS), num_answers=len(ANSWERS), hidden=8, word_dim=8, heads=2,
              segments=2)
    kw.update(head)
    torch.manual_seed(seed)
    m = PromptedCLIPAVQA.tiny(**TINY, head=kw, vocabulary=vocabulary, answers=ANSWERS)
    with torch.no_grad():          # trained-looking values, BatchNorm statistics included
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
        for n, b in m.named_buffers():
            if n.endswith("running_mean"):
                b.normal_()
            elif n.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif n.endswith("num_batches_tracked"):
                b.fill_(17)
    return m


def test_avqa_round_trip_rebuilds_the_same_model(tmp_path):
    from avstfp_fast.models.avqa import PromptedCLIPAVQA
    m = _avqa().eval()
    path = m.save_prompts(str(tmp_path / "q.safetensors"), backbone="tiny")
    pf = pfm.read_prompt_file(path)
    assert pf.model_class == "PromptedCLIPAVQA"
    assert {"head.audio_norm.running_mean", "head.patch_norm.running_var",
            "head.visual_norm.num_batches_tracked"} <= set(pf.tensors)
    init = json.loads(pf.meta["model_init"])
    assert init == {"head": m.head_config.to_dict(), "vocabulary": WORDS, "answers": ANSWERS}
    torch.manual_seed(0)                        # the same random tower
    m2 = PromptedCLIPAVQA.from_prompts(path, backend="torch").eval()
    assert m2.head_config == m.head_config and m2.vocabulary == WORDS and m2.answers == ANSWERS
    s1, s2 = m.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k], s2[k]), k
    torch.manual_seed(5)
    a, v = torch.randn(2, 2, 98, 128), torch.randn(2, 2, 3, 32, 32)
    q = m.encode_questions(["is the <Object> sounding before the <Object>?", "is the tuba"],
                           [["violin", "piano"], []])
    assert q.tolist() == [[2, 3, 4, 5, 6, 3, 7], [2, 3, 1, 0, 0, 0, 0]]
    with torch.no_grad():
        out1, out2 = m(a, v, q), m2(a, v, q)
    assert torch.equal(out1.logits, out2.logits)
    assert m2.decode_answers(out2.logits) == m.decode_answers(out1.logits)
    assert set(m2.decode_answers(out2.logits)) <= set(ANSWERS)


def test_avqa_and_plain_files_are_refused_by_the_other_class(tmp_path):
    from avstfp_fast.models.avqa import PromptedCLIPAVQA
    q = _avqa().save_prompts(str(tmp_path / "q.safetensors"), backbone="tiny")
    p = _model().save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny")
    with pytest.raises(PromptFileError, match="holds a PromptedCLIPAVQA model, this is a "
                                              "PromptedCLIP; load it with PromptedCLIPAVQA"):
        PromptedCLIP.from_prompts(q)
    with pytest.raises(PromptFileError, match="holds a PromptedCLIP model, this is a "
                                              "PromptedCLIPAVQA"):
        PromptedCLIPAVQA.from_prompts(p)
    with pytest.raises(PromptFileError, match="model class differs"):
        load_prompts(_model(), q)
    # onto an existing AVQA model: settings, vocabulary and answers are compared
    other_words = WORDS[:-1] + ["cello"]
    with pytest.raises(PromptFileError, match=r"vocabulary: file 8 items, model 8; first "
                                              r"difference at \[7\]: file 'piano', model 'cello'"):
        load_prompts(_avqa(vocabulary=other_words), q)
    with pytest.raises(PromptFileError, match=r"head.hidden: file 8, model 12"):
        load_prompts(_avqa(hidden=12, word_dim=8, heads=2), q)
    # a model without a vocabulary accepts the file's (nothing to compare)
    load_prompts(_avqa(vocabulary=None), q)
    # load_model runs AVE/AVAR models only, and names the AVQA route
    from avstfp_fast.predict.core import load_model
    with pytest.raises(ValueError, match="PromptedCLIPAVQA model; load_model runs the "
                                         "AVE/AVAR.*--questions"):
        load_model(q)


def test_files_without_the_model_class_key_still_load(tmp_path):
    """Format-1 files written before ``model_class`` existed are plain PromptedCLIP files."""
    from safetensors.torch import save_file
    m = _model()
    pf = pfm.read_prompt_file(m.save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny"))
    assert pf.meta["model_class"] == "PromptedCLIP" and "model_init" not in pf.meta
    old = {k: v for k, v in pf.meta.items() if k != "model_class"}
    save_file(pf.tensors, str(tmp_path / "old.safetensors"), metadata=old)
    torch.manual_seed(0)
    m2 = PromptedCLIP.from_prompts(str(tmp_path / "old.safetensors"), backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  m2.state_dict().values()))


def test_files_with_the_old_extra_config_field_still_load(tmp_path):
    """Files written while AVSTFPConfig had its (never read) ``extra`` field load as
    before; files written now no longer carry it."""
    from safetensors.torch import save_file
    m = _model()
    pf = pfm.read_prompt_file(m.save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny"))
    assert "extra" not in json.loads(pf.meta["config"])
    old = dict(pf.meta, config=json.dumps({**json.loads(pf.meta["config"]), "extra": {}}))
    save_file(pf.tensors, str(tmp_path / "old.safetensors"), metadata=old)
    torch.manual_seed(0)
    m2 = PromptedCLIP.from_prompts(str(tmp_path / "old.safetensors"), backend="torch")
    assert m2.config == m.config
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  m2.state_dict().values()))
    load_prompts(m2, str(tmp_path / "old.safetensors"))       # config check ignores it too


def test_flipped_bit_in_tensor_data_is_detected(tmp_path):
    """A single flipped bit in the tensor bytes (not the header) is refused by checksum."""
    from avstfp_fast import PromptedCLIP
    from avstfp_fast.models.prompt_file import PromptFileError, read_prompt_file
    m = PromptedCLIP.tiny(backend="torch", task="ave", num_classes=3)
    path = m.save_prompts(str(tmp_path / "p.safetensors"), backbone="tiny")
    raw = bytearray(open(path, "rb").read())
    header = 8 + int.from_bytes(raw[:8], "little")
    raw[header + (len(raw) - header) // 2] ^= 0x04
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(raw))
    read_prompt_file(path)                               # the original reads
    with pytest.raises(PromptFileError, match="damaged .*checksum"):
        read_prompt_file(str(bad))
    with pytest.raises(PromptFileError, match="damaged"):
        PromptedCLIP.from_prompts(str(bad))


def test_from_prompts_on_a_trainer_checkpoint_says_what_it_is(tmp_path):
    from avstfp_fast import PromptedCLIP
    from avstfp_fast.models.prompt_file import PromptFileError
    path = tmp_path / "best.pt"
    torch.save({"format": "avstfp_fast.train/1", "model": {}}, path)
    with pytest.raises(PromptFileError, match="trainer checkpoint") as e:
        PromptedCLIP.from_prompts(str(path))
    assert "damaged" not in str(e.value)
