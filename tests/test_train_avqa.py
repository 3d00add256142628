"""AVQA through the trainer: run folder, per-type metrics, resume, backend swap, synthetic run."""
import json
import os
import time

import pytest
import torch

from avstfp_fast.train import run_synthetic
from avstfp_fast.train.avqa_metrics import REPORT_ROWS
from avstfp_fast.train.avqa_synthetic import make_synthetic_avqa
from avstfp_fast.train.cli import main

SMALL = ["--synthetic-train", "4", "--synthetic-val", "2", "--synthetic-test", "2",
         "--batch-size", "8", "--no-progress", "--threads", "1", "--backend", "torch",
         "--n-spatial", "4", "--head-hidden", "32"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("avqa") / "data")
    make_synthetic_avqa(root, n_train=4, n_val=2, n_test=2, hop=1, seed=3)
    return root


def records(run, kind):
    return [r for r in map(json.loads, open(os.path.join(run, "metrics.jsonl")))
            if r["kind"] == kind]


def test_cli_trains_writes_per_type_metrics_and_figures(data, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["--task", "synthetic_avqa", "--data-root", data, "--out", out,
                 "--epochs", "2"] + SMALL) == 0
    for f in ("config.json", "metrics.jsonl", "summary.json", "avqa_val.png", "avqa_test.png",
              "checkpoints/last.pt", "checkpoints/best.pt"):
        assert os.path.isfile(os.path.join(out, f)), f
    steps = records(out, "step")
    n = {s: len(json.load(open(os.path.join(data, f"avqa-{s}.json"))))
         for s in ("train", "val", "test")}
    assert len(steps) == 2 * -(-n["train"] // 8) and all(r["negatives"] for r in steps)
    evals = records(out, "eval")
    assert len(evals) == 2 and {k for k, _, _ in REPORT_ROWS} <= set(evals[0])
    assert evals[0]["acc"] == evals[0]["overall"] and evals[0]["n"] == n["val"]
    final = {r["split"]: r for r in records(out, "final_eval")}
    assert set(final) == {"val", "test"} and final["test"]["n_overall"] == n["test"]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["val_acc"] == final["val"]["overall"] and s["selected"].startswith("best.pt")
    printed = capsys.readouterr().out
    assert "val Overall avg" in printed and "test Audio-Visual Temporal" in printed
    # the checkpoint evaluated with the reference backend gives the same answers
    ev = str(tmp_path / "eval")
    assert main(["--task", "synthetic_avqa", "--data-root", data, "--out", ev, "--eval-only",
                 "--resume", os.path.join(out, "checkpoints", "best.pt"),
                 "--backend", "reference", "--no-progress", "--threads", "1"]) == 0
    ref = json.load(open(os.path.join(ev, "summary.json")))
    assert ref["backend"] == "reference" and ref["val_acc"] == s["val_acc"]
    assert ref["test_acc"] == s["test_acc"]


def test_resume_replays_the_same_steps(data, tmp_path):
    """Stopped after 2 steps and resumed == uninterrupted (negatives drawn per step)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    common = ["--task", "synthetic_avqa", "--data-root", data, "--epochs", "2",
              "--no-final-eval", "--eval-every", "0"] + SMALL
    assert main(common + ["--out", full]) == 0
    assert main(common + ["--out", part, "--max-steps", "2"]) == 0
    assert main(common + ["--out", part, "--resume",
                          os.path.join(part, "checkpoints", "last.pt")]) == 0
    want = [r["loss"] for r in records(full, "step")]
    got = [r["loss"] for r in records(part, "step")]
    assert len(want) >= 4 and got == want


def test_checkpoint_keeps_head_buffers_without_the_tower():
    """A pretrained run saves trainable parameters only: the head's BatchNorm statistics
    must travel too."""
    from avstfp_fast.models.avqa import PromptedCLIPAVQA
    from avstfp_fast.train import checkpoint as ck
    m = PromptedCLIPAVQA.tiny(head=dict(vocab_size=5, num_answers=3, hidden=8, heads=2))
    with torch.no_grad():
        m.head.audio_norm.running_mean.normal_()
    state = ck.model_state(m, full=False)
    assert "head.audio_norm.running_mean" in state
    assert not any(k.startswith("visual.") for k in state)
    fresh = PromptedCLIPAVQA.tiny(head=dict(vocab_size=5, num_answers=3, hidden=8, heads=2))
    ck.load_model_state(fresh, state, full=False)
    assert torch.equal(fresh.head.audio_norm.running_mean, m.head.audio_norm.running_mean)


def test_prompt_file_beside_best_pt_rebuilds_the_checkpoint_model(data, tmp_path):
    """The trainer's best.prompts.safetensors loads onto a fresh PromptedCLIPAVQA (head
    settings, BatchNorm statistics, vocabulary and answers included) and answers exactly
    like the best.pt model; avstfp-predict refuses both with a clear message."""
    from avstfp_fast.models.avqa import PromptedCLIPAVQA
    from avstfp_fast.predict.core import load_model
    from avstfp_fast.train import checkpoint as ck
    from avstfp_fast.train.config import TrainConfig
    from avstfp_fast.train.registry import make_task
    out = str(tmp_path / "run")
    assert main(["--task", "synthetic_avqa", "--data-root", data, "--out", out, "--epochs",
                 "1", "--no-final-eval"] + SMALL) == 0
    best = os.path.join(out, "checkpoints", "best.pt")
    prompts = os.path.join(out, "checkpoints", "best.prompts.safetensors")
    # the checkpoint's model, rebuilt as the trainer builds it
    ckpt = ck.load_checkpoint(best)
    cfg = TrainConfig.from_dict(ckpt["config"])
    task = make_task(cfg)
    classes = task.prepare_data(out, 0).classes
    assert task.classes == classes and set(task.splits) >= {"train", "val"}
    torch.manual_seed(cfg.seed)
    want = task.build_model(len(classes))
    ck.load_model_state(want, ckpt["model"], ckpt["model_full"])
    assert any(float(b.abs().sum()) for n, b in want.head.named_buffers()
               if n.endswith("running_mean"))                        # trained statistics
    torch.manual_seed(cfg.seed + 1)               # any seed: the tiny tower is in the file
    got = PromptedCLIPAVQA.from_prompts(prompts, backend="torch")
    assert got.vocabulary == task.vocab.words and got.answers == list(classes)
    assert got.head_config == want.head_config
    s1, s2 = want.state_dict(), got.state_dict()
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    ds = task.dataset("val", False, want.image_size)
    batch = task.collate([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        a, v, q = batch["audio"], batch["video"], batch["question"]
        l1, l2 = want.eval()(a, v, q).logits, got.eval()(a, v, q).logits
    assert torch.equal(l1, l2)
    assert got.decode_answers(l2) == [classes[i] for i in l1.argmax(-1).tolist()]
    for path in (prompts, best):
        with pytest.raises(ValueError, match="load_model runs the AVE/AVAR"):
            load_model(path)


def test_avqa_needs_a_data_root(tmp_path, capsys):
    assert main(["--task", "avqa", "--backbone", "tiny", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 2
    assert "data_root" in capsys.readouterr().err
    assert main(["--task", "avqa", "--backbone", "tiny", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "r2"), "--no-progress"]) == 2
    assert "avqa-train.json" in capsys.readouterr().err


@pytest.mark.slow
def test_synthetic_avqa_needs_sound_and_reaches_85_percent(tmp_path):
    """The full synthetic run: >= 85 % test answer accuracy within 5 minutes with both
    modalities; without audio clearly lower (the questions need the sound)."""
    t0 = time.time()
    both = run_synthetic(task="synthetic_avqa", out=str(tmp_path / "both"))
    wall = time.time() - t0
    vis = run_synthetic(task="synthetic_avqa", out=str(tmp_path / "visual"),
                        data_root=os.path.join(str(tmp_path / "both"), "synthetic_avqa"),
                        modalities=("visual",), stages=("temporal", "spatial"))
    print(f"synthetic avqa: both {both['test_acc']:.4f} (val {both['val_acc']:.4f}, "
          f"{wall:.0f} s), visual only {vis['test_acc']:.4f} (val {vis['val_acc']:.4f})")
    assert both["test_acc"] >= 0.85 and wall <= 300
    assert vis["test_acc"] <= both["test_acc"] - 0.15
