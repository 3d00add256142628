"""Pretrained towers as open_clip users have them: tags through open_clip's own download
step (pointed at a local file here: nothing touches the network), OpenAI TorchScript
files, activation and size mismatches, the confirmation line, prompt files that record
the open_clip name and tag, and one-line errors before any data work."""
import logging
import os

import open_clip
import pytest
import torch
from open_clip import pretrained as oc_pretrained

from avstfp_fast import PromptedCLIP
from avstfp_fast.models import backbone as bb

NAME = "avstfp-test-ViT"          # a tiny open_clip configuration registered for the tests
TOWER = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32}
TEXT = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture
def oc(monkeypatch, tmp_path):
    """Register NAME (GELU) and NAME-quickgelu with open_clip, with tags 'openai'
    (QuickGELU) and 'laion' (GELU) whose hub download returns local files."""
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, NAME,
                        {"embed_dim": 32, "vision_cfg": dict(TOWER), "text_cfg": dict(TEXT)})
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, NAME + "-quickgelu",
                        {"embed_dim": 32, "quick_gelu": True, "vision_cfg": dict(TOWER),
                         "text_cfg": dict(TEXT)})
    monkeypatch.setitem(oc_pretrained._PRETRAINED, NAME, {
        "openai": {"hf_hub": "test-org/openai-tiny/", "quick_gelu": True},
        "laion": {"hf_hub": "test-org/laion-tiny/"}})
    files = {}
    for repo, qg in (("test-org/openai-tiny", True), ("test-org/laion-tiny", False)):
        m = open_clip.create_model(NAME, quick_gelu=qg)
        path = tmp_path / repo.replace("/", "_") / "open_clip_pytorch_model.bin"
        path.parent.mkdir(parents=True)
        torch.save(m.state_dict(), path)
        files[repo] = (str(path), m)
    calls = []

    def fake_hub_download(repo_id, filename, revision=None, cache_dir=None, **kw):
        calls.append((repo_id, filename))
        if repo_id not in files or filename != "open_clip_pytorch_model.bin":
            raise OSError(f"404 {repo_id}/{filename}")
        return files[repo_id][0]

    def no_network(*a, **k):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(oc_pretrained, "hf_hub_download", fake_hub_download)
    monkeypatch.setattr(oc_pretrained.urllib.request, "urlopen", no_network)
    return files, calls


def _act(visual):
    return type(visual.transformer.resblocks[0].mlp.gelu).__name__


def _same(visual, model):
    ref = model.visual.state_dict()
    return all(torch.equal(v, ref[k]) for k, v in visual.state_dict().items())


def test_tag_goes_through_open_clips_download_and_follows_its_activation(oc, caplog):
    files, calls = oc
    caplog.set_level(logging.INFO)
    vis = bb.load_visual(NAME, "openai")
    assert calls[-1] == ("test-org/openai-tiny", "open_clip_pytorch_model.bin")
    assert _act(vis) == "QuickGELU" and _same(vis, files["test-org/openai-tiny"][1])
    vis2 = bb.load_visual(NAME, "laion")
    assert _act(vis2) == "GELU" and _same(vis2, files["test-org/laion-tiny"][1])
    text = caplog.text
    lines = [r.getMessage() for r in caplog.records if r.name == "avstfp_fast.models"]
    assert any("loaded" in m and "'openai'" in m and "QuickGELU" in m for m in lines), lines
    assert "No pretrained weights loaded" not in text and "initialized randomly" not in text


def test_tag_offline_and_not_cached_is_one_line_naming_the_local_file_route(oc, monkeypatch):
    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")
    monkeypatch.setattr(oc_pretrained, "hf_hub_download", offline)
    with pytest.raises(ValueError) as e:
        bb.load_visual(NAME, "openai")
    msg = str(e.value)
    assert "\n" not in msg and "could not be downloaded" in msg and "--pretrained" in msg
    with pytest.raises(ValueError, match="neither a file nor an open_clip tag"):
        bb.load_visual(NAME, "not-a-tag")


def test_openai_torchscript_file_loads_as_open_clip_loads_it(oc, tmp_path):
    files, _ = oc
    src = files["test-org/openai-tiny"][1]

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = src.visual
            self.register_buffer("input_resolution", torch.tensor(32))

        def forward(self, x):
            return self.visual(x)
    path = str(tmp_path / "ViT-tiny.pt")
    torch.jit.save(torch.jit.trace(Wrap().eval(), torch.randn(1, 3, 32, 32), check_trace=False),
                   path)
    vis = bb.load_visual(NAME, path)
    assert _act(vis) == "QuickGELU" and _same(vis, src)


def test_quickgelu_state_dict_into_a_gelu_tower_is_refused_in_one_line(oc, tmp_path):
    files, _ = oc
    sd = files["test-org/openai-tiny"][1].state_dict()
    # open_clip's training checkpoint format names the model it was trained as
    path = str(tmp_path / "epoch_1.pt")
    torch.save({"name": NAME + "-quickgelu", "epoch": 1, "state_dict": sd}, path)
    with pytest.raises(ValueError) as e:
        bb.load_visual(NAME, path)
    msg = str(e.value)
    assert "\n" not in msg and "QuickGELU" in msg and f"--backbone {NAME}-quickgelu" in msg
    assert _act(bb.load_visual(NAME + "-quickgelu", path)) == "QuickGELU"
    # OpenAI-format keys mean OpenAI weights: the tower follows them, as for the archive
    path2 = str(tmp_path / "openai_sd.pt")
    torch.save({**sd, "input_resolution": torch.tensor(32), "vocab_size": torch.tensor(64)},
               path2)
    assert _act(bb.load_visual(NAME, path2)) == "QuickGELU"


def test_wrong_size_and_unreadable_files_are_one_line_errors(oc, tmp_path):
    big = open_clip.create_model("ViT-S-32" if "ViT-S-32" in open_clip.list_models()
                                 else NAME, device="meta")
    other = {k: torch.zeros(v.shape) for k, v in big.visual.state_dict().items()}
    path = str(tmp_path / "other.pt")
    torch.save(other, path)
    with pytest.raises(ValueError) as e:
        bb.load_visual(NAME, path)
    assert "does not fit the" in str(e.value) and "\n" not in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="cannot read") as e:
        bb.load_visual(NAME, str(junk))
    assert "\n" not in str(e.value)


def test_prompt_files_record_the_open_clip_name_and_tag(oc, tmp_path):
    files, _ = oc
    m = PromptedCLIP(NAME, pretrained="openai", backend="torch", task="ave", num_classes=3)
    path = m.save_prompts(str(tmp_path / "p.safetensors"))
    back = PromptedCLIP.from_prompts(path, backend="torch")      # tag from the file
    assert back.prompt_metadata["backbone"] == NAME
    assert back.prompt_metadata["pretrained_tag"] == "openai"
    assert _act(back.visual) == "QuickGELU"
    # a tower handed over as an open_clip model object records its open_clip name
    obj = open_clip.create_model(NAME, quick_gelu=True)
    obj.load_state_dict(files["test-org/openai-tiny"][1].state_dict())
    m2 = PromptedCLIP(obj, backend="torch", task="ave", num_classes=3)
    assert m2.model_name == NAME + "-quickgelu"
    p2 = m2.save_prompts(str(tmp_path / "p2.safetensors"))
    back2 = PromptedCLIP.from_prompts(p2, pretrained=files["test-org/openai-tiny"][0],
                                      backend="torch")
    assert back2.model_name == NAME + "-quickgelu"


def test_trainer_refuses_wrong_weights_in_one_line_before_any_data(oc, tmp_path, capsys,
                                                                    monkeypatch):
    from avstfp_fast.train.cli import main
    other = open_clip.create_model(NAME + "-quickgelu")
    sd = {k: v for k, v in other.state_dict().items()}
    sd["visual.conv1.weight"] = torch.zeros(64, 3, 8, 8)
    wrong = str(tmp_path / "wrong.pt")
    torch.save(sd, wrong)

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    cases = [(["--pretrained", wrong], "does not fit"),
             (["--pretrained", "openai"], "could not be downloaded")]
    for extra, want in cases:
        if extra[-1] == "openai":
            monkeypatch.setattr(oc_pretrained, "hf_hub_download", offline)
        out = tmp_path / ("run_" + extra[-1].replace("/", "_")[-8:])
        rc = main(["--task", "synthetic", "--backbone", NAME, "--out", str(out),
                   "--no-progress", "--device", "cpu", "--backend", "torch"] + extra)
        err = capsys.readouterr().err
        lines = [x for x in err.splitlines() if x.startswith("avstfp-train: error:")]
        assert rc == 2 and len(lines) == 1 and want in lines[0] and "Traceback" not in err
        assert not out.exists()                       # no run folder, no generated data


def test_prompt_file_from_local_weights_asks_for_that_file(oc, tmp_path):
    from avstfp_fast.models.prompt_file import PromptFileError
    files, _ = oc
    weights = files["test-org/laion-tiny"][0]
    m = PromptedCLIP(NAME, pretrained=weights, backend="torch", task="ave", num_classes=3)
    path = m.save_prompts(str(tmp_path / "p.safetensors"))
    with pytest.raises(PromptFileError, match="open_clip_pytorch_model.bin.*pretrained"):
        PromptedCLIP.from_prompts(path, backend="torch")
    back = PromptedCLIP.from_prompts(path, pretrained=weights, backend="torch")
    assert _same(back.visual, files["test-org/laion-tiny"][1])
