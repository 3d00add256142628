"""avstfp-predict on the synthetic videos with a model trained for a few steps: outputs and
their schema, timeline pictures, equality with the trainer's --eval-only, bad inputs."""
import csv
import json
import os
import shutil

import pytest
import torch

from avstfp_fast.predict import event_segments, plot_timeline
from avstfp_fast.predict.cli import main
from avstfp_fast.train import TrainConfig, train
from avstfp_fast.train import cli as train_cli
from avstfp_fast.train.synthetic import make_synthetic_ave

COMMON = ["--no-progress", "--threads", "1", "--backend", "torch"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # same shape as test_avqa_eval's fixture on purpose: another task, data and trainer entry
    base = tmp_path_factory.mktemp("predict")
    data = str(base / "data")
    make_synthetic_ave(data, n_events=3, n_train=4, n_val=2, n_test=3, seed=3)
    run = str(base / "run")
    train(TrainConfig(task="synthetic", backbone="tiny", backend="torch", data_root=data,
                      out=run, epochs=2, max_steps=2, batch_size=4, num_workers=0,
                      visual_aug="none", mixup_prob=0.0, lr_prompts=3e-3, lr_head=3e-3,
                      final_eval=False, progress=False, threads=1, seed=3))
    ck = os.path.join(run, "checkpoints")
    return {"data": data, "run": run, "best": os.path.join(ck, "best.pt"),
            "prompts": os.path.join(ck, "best.prompts.safetensors"),
            "ann": os.path.join(data, "Annotations.txt")}


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_trainer_writes_a_prompt_file_beside_best(trained):
    from avstfp_fast.models.prompt_file import read_prompt_file
    pf = read_prompt_file(trained["prompts"])
    assert pf.everything           # the tiny tower is random: it travels with the prompts
    assert pf.json("classes") == ["event_0", "event_1", "event_2", "background"]
    assert pf.json("inputs")["segments"] == 10 and pf.meta["trainer_task"] == "synthetic"
    summary = json.load(open(os.path.join(trained["run"], "summary.json")))
    assert summary["prompt_file"] == trained["prompts"]
    assert summary["prompt_file_contents"].startswith("everything")


def test_predict_folder_json_csv_and_timeline(trained, tmp_path):
    src = tmp_path / "videos"
    (src / "nested").mkdir(parents=True)
    ave = os.path.join(trained["data"], "AVE")
    shutil.copy(os.path.join(ave, "syn_val_0000.mp4"), src / "syn_val_0000.mp4")
    shutil.copy(os.path.join(ave, "syn_test_0001.mp4"), src / "nested" / "syn_test_0001.mp4")
    (src / "notes.txt").write_text("not a video")
    out = str(tmp_path / "out")
    assert main([trained["prompts"], str(src), "--out", out, "--plot", "--annotations",
                 trained["ann"], "--batch-size", "2"] + COMMON) == 0
    names = sorted(os.listdir(out))
    assert names == ["predictions.csv", "run.json", "syn_test_0001.json", "syn_test_0001.png",
                     "syn_val_0000.json", "syn_val_0000.png"]
    rows = _read_csv(os.path.join(out, "predictions.csv"))
    for vid in ("syn_val_0000", "syn_test_0001"):
        r = json.load(open(os.path.join(out, vid + ".json")))
        assert {"video", "id", "task", "classes", "segments", "seconds_per_segment",
                "probabilities", "predicted", "events", "ground_truth",
                "ground_truth_events", "segment_accuracy"} <= set(r)
        assert r["task"] == "ave" and r["id"] == vid and len(r["classes"]) == 4
        p = torch.tensor(r["probabilities"])
        assert p.shape == (10, 4) and torch.allclose(p.sum(-1), torch.ones(10), atol=1e-5)
        assert r["predicted"] == [r["classes"][i] for i in p.argmax(-1)]
        for ev in r["events"]:
            assert 0 <= ev["start"] < ev["end"] <= 10 and ev["class"] != "background"
            assert 0 < ev["confidence"] <= 1
        assert 0.0 <= r["segment_accuracy"] <= 1.0
        mine = [x for x in rows if x["id"] == vid]
        assert [(float(x["start"]), float(x["end"]), x["class"]) for x in mine] == \
            [(e["start"], e["end"], e["class"]) for e in r["events"]]
    assert set(rows[0]) == {"video", "id", "start", "end", "class", "confidence"} if rows \
        else True
    with open(os.path.join(out, "syn_val_0000.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread
    img = imread(os.path.join(out, "syn_val_0000.png"))
    assert img.shape[0] > 300 and img.shape[1] > 800 and img[..., :3].std() > 0.05
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["processed"] == 2 and run["skipped"] == [] and run["clips_per_s"] > 0


@pytest.mark.parametrize("which", ["best", "prompts"])
def test_split_evaluation_equals_trainer_eval_only(trained, tmp_path, which):
    ev = str(tmp_path / "trainer_eval")
    assert train_cli.main(["--task", "synthetic", "--data-root", trained["data"], "--out", ev,
                           "--eval-only", "--resume", trained["best"], "--batch-size", "2",
                           "--backend", "torch", "--no-progress", "--threads", "1"]) == 0
    ref = json.load(open(os.path.join(ev, "summary.json")))
    out = str(tmp_path / "pred")
    assert main([trained[which], "--annotations", trained["ann"], "--split",
                 os.path.join(trained["data"], "testSet.txt"), "--out", out,
                 "--batch-size", "2"] + COMMON) == 0
    got = json.load(open(os.path.join(out, "run.json")))["evaluation"]
    assert got["n"] == ref["test_n"] == 30
    assert got["acc"] == ref["test_acc"]                   # identical, not approximately
    assert got["top5"] == ref["test_top5"]


def test_avar_prompt_file_gives_top_k(trained, tmp_path):
    from avstfp_fast import PromptedCLIP
    torch.manual_seed(0)
    m = PromptedCLIP.tiny(backend="torch", task="avar", num_classes=6)
    path = m.save_prompts(str(tmp_path / "avar.safetensors"), backbone="tiny",
                          include_backbone=True, classes=[f"c{i}" for i in range(6)],
                          inputs={"segments": 10, "clip_seconds": 10.0})
    out = str(tmp_path / "out")
    video = os.path.join(trained["data"], "AVE", "syn_test_0000.mp4")
    assert main([path, video, "--out", out, "--top-k", "3", "--plot"] + COMMON) == 0
    r = json.load(open(os.path.join(out, "syn_test_0000.json")))
    assert r["task"] == "avar" and len(r["top_k"]) == 3 and len(r["probabilities"]) == 6
    probs = [t["probability"] for t in r["top_k"]]
    assert probs == sorted(probs, reverse=True)
    rows = _read_csv(os.path.join(out, "predictions.csv"))
    assert [x["rank"] for x in rows] == ["1", "2", "3"] and rows[0]["class"] == \
        r["top_k"][0]["class"]
    assert os.path.isfile(os.path.join(out, "syn_test_0000.png"))


def test_bad_inputs_are_reported_and_skipped(trained, tmp_path, capsys):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    good = os.path.join(trained["data"], "AVE", "syn_val_0001.mp4")
    out = str(tmp_path / "out")
    missing = str(tmp_path / "missing.mp4")
    assert main([trained["prompts"], missing, str(bad), good, "--out", out] + COMMON) == 0
    err = capsys.readouterr().err
    assert "missing.mp4: no such file" in err and "corrupt.mp4" in err
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["processed"] == 1
    reasons = {os.path.basename(s["input"]): s["reason"] for s in run["skipped"]}
    assert set(reasons) == {"missing.mp4", "corrupt.mp4"} and "unreadable" in \
        reasons["corrupt.mp4"]
    # nothing usable at all: exit status 1
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    assert main([trained["prompts"], str(empty), "--out", str(tmp_path / "o2")] + COMMON) == 1
    assert "folder holds no videos" in capsys.readouterr().err
    assert main([trained["prompts"], str(bad), "--out", str(tmp_path / "o3")] + COMMON) == 1
    # an unusable model file: exit status 2 with the reason
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(open(trained["prompts"], "rb").read()[:100])
    assert main([str(cut), good, "--out", str(tmp_path / "o4")] + COMMON) == 2
    assert "truncated or damaged" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.pt"), good] + COMMON) == 2


def test_event_segments_and_notebook_plot(tmp_path):
    classes = ["dog", "car", "background"]
    p = torch.full((6, 3), 0.1)
    for s, c in enumerate([2, 0, 0, 1, 2, 0]):
        p[s, c] = 0.8
    ev = event_segments(p, classes, 1.0, background=2)
    assert ev == [{"start": 1.0, "end": 3.0, "class": "dog", "confidence": 0.8},
                  {"start": 3.0, "end": 4.0, "class": "car", "confidence": 0.8},
                  {"start": 5.0, "end": 6.0, "class": "dog", "confidence": 0.8}]
    res = {"id": "x", "task": "ave", "classes": classes, "segments": 6,
           "seconds_per_segment": 1.0, "probabilities": p.tolist(), "events": ev,
           "ground_truth_events": ev[:1], "segment_accuracy": 0.5}
    import numpy as np
    frames = np.random.default_rng(0).integers(0, 255, (6, 24, 32, 3), dtype=np.uint8)
    fig = plot_timeline(res, str(tmp_path / "t.png"), frames=frames)
    assert len(fig.axes) == 5 and os.path.getsize(tmp_path / "t.png") > 5000
