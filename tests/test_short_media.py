"""Short media: a 6-second video under a 10-second model is marked (JSON, CSV, hatched
timeline) or skipped with a reason; AVQA sampling beyond the end of a video warns once
per video and is counted."""
import csv
import json
import logging
import os

import numpy as np
import pytest

from avstfp_fast import PromptedCLIP
from avstfp_fast.predict.cli import main as predict_main
from avstfp_fast.train.data import decode_clip
from avstfp_fast.train.synthetic import _clip, write_clip


@pytest.fixture(scope="module")
def six_seconds(tmp_path_factory):
    base = tmp_path_factory.mktemp("short")
    rng = np.random.default_rng(0)
    frames, wave = _clip(rng, 1, 1, 4, segments=6, fps=8, size=64, sample_rate=16000)
    path = str(base / "six.mp4")
    write_clip(path, frames, 8, wave)
    m = PromptedCLIP.tiny(backend="torch", task="ave", num_classes=3)
    model = m.save_prompts(str(base / "p.safetensors"), backbone="tiny", include_backbone=True,
                           classes=["a", "b", "background"])
    return path, model


def test_decode_reports_the_padded_segments(six_seconds):
    info = {}
    frames, wave = decode_clip(six_seconds[0], segments=10, clip_seconds=10.0, info=info)
    assert frames.shape[0] == 10 and wave.shape[0] == 160000
    assert info["padded"] == [6, 7, 8, 9] and 5.9 <= info["media_seconds"] <= 6.1


def test_six_second_video_is_marked_in_json_csv_and_timeline(six_seconds, tmp_path):
    path, model = six_seconds
    out = str(tmp_path / "out")
    assert predict_main([model, path, "--out", out, "--plot", "--no-progress",
                         "--backend", "torch", "--device", "cpu"]) == 0
    res = json.load(open(os.path.join(out, "six.json")))
    assert res["padded_seconds"] == [6.0, 7.0, 8.0, 9.0] and res["media_seconds"] < 6.2
    assert len(res["probabilities"]) == 10
    rows = list(csv.DictReader(open(os.path.join(out, "predictions.csv"))))
    assert "padded" in rows[0] if rows else "padded" in open(
        os.path.join(out, "predictions.csv")).readline()
    for r, ev in zip(rows, res["events"]):
        assert (r["padded"] == "yes") == (ev["end"] > 6.0)
    assert os.path.getsize(os.path.join(out, "six.png")) > 0
    from avstfp_fast.predict import plot_timeline
    fig = plot_timeline(res, frames=False)
    hatched = [p for ax in fig.axes for p in ax.patches if p.get_hatch() == "///"]
    assert len(hatched) >= 4                     # the 4 padded seconds, in each row


def test_short_media_skip_gives_the_reason(six_seconds, tmp_path, capsys):
    path, model = six_seconds
    out = str(tmp_path / "out")
    assert predict_main([model, path, "--out", out, "--no-progress", "--backend", "torch",
                         "--device", "cpu", "--short-media", "skip"]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "six.mp4" in x]
    assert len(lines) == 1 and "short: the media covers" in lines[0], err  # printed once
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["skipped"][0]["reason"].startswith("short:")


def test_avqa_sampling_beyond_the_end_warns_once_per_video_and_is_counted(tmp_path, caplog):
    from avstfp_fast.train.avqa_data import AVQADataset, avqa_splits
    from avstfp_fast.train.avqa_synthetic import make_synthetic_avqa
    root = str(tmp_path / "d")
    make_synthetic_avqa(root, n_train=2, n_val=1, n_test=1, hop=1, seed=1)   # 10-s videos
    s = avqa_splits(root)
    items = [it for it in s.splits["val"]]
    assert len(items) >= 2 and len({it[2] for it in items}) == 1
    ds = AVQADataset(items, hop=2, image_size=64, segments=10)      # reads to 20 s
    caplog.set_level(logging.WARNING)
    samples = [ds[i] for i in range(len(items))]
    assert all(x["padded"] == [5, 6, 7, 8, 9] for x in samples)
    warns = [r for r in caplog.records if "padding" in r.getMessage()]
    assert len(warns) == 1, [r.getMessage() for r in warns]
    from avstfp_fast.train.cli import main
    out = str(tmp_path / "run")
    assert main(["--task", "synthetic_avqa", "--data-root", root, "--out", out, "--epochs",
                 "1", "--avqa-hop", "2", "--no-progress", "--threads", "1", "--backend",
                 "torch", "--n-spatial", "2", "--head-hidden", "16"]) == 0
    summ = json.load(open(os.path.join(out, "summary.json")))
    assert summ["val_padded"] == len(items)


def test_timeline_thumbnails_are_the_centre_crop_the_model_sees(tmp_path):
    from avstfp_fast.predict.timeline import load_frames
    frames = np.zeros((20, 64, 128, 3), np.uint8)
    frames[:, :, :32] = 255            # a white band on the left: outside the centre crop
    frames[:, :, 32:96] = 80
    path = str(tmp_path / "wide.mp4")
    write_clip(path, frames, 2, np.random.default_rng(0).normal(0, 0.1, 160000)
               .astype(np.float32))
    thumbs = load_frames(path, 10, 10.0, size=64)
    assert thumbs.shape[1] == thumbs.shape[2] == 64          # square, not squashed
    assert thumbs[:, :, 4:-4].max() < 160                    # the white band is cropped away
