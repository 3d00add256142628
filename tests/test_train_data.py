"""Loader tests on generated .mp4 files: annotation header variants, bad files, splits."""
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from avstfp_fast.train.data import (ClipDataset, ave_segment_labels, ave_splits,
                                    collate_skip_bad, decode_clip, ks_splits, read_ave_rows)
from avstfp_fast.train.synthetic import make_synthetic_ave, write_clip

ROWS = ["Church bell&RUhOCu3LNXM&good&0&10", "Male speech, man speaking&MFVhdbybBQg&good&2&7",
        "Bark&xx-yy_zz&bad&5&6"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ave"))
    make_synthetic_ave(root, n_events=3, n_train=4, n_val=2, n_test=0, seed=3)
    return root


@pytest.mark.parametrize("header", [True, False])
def test_annotations_header_detected(tmp_path, header):
    p = tmp_path / "Annotations.txt"
    text = ("Category&VideoID&Quality&StartTime&EndTime\n" if header else "") + "\n".join(ROWS)
    p.write_text(text + "\r\n")
    rows = read_ave_rows(str(p))
    assert len(rows) == 3                               # no row lost, no header kept
    assert rows[0].category == "Church bell" and rows[0].video_id == "RUhOCu3LNXM"
    assert (rows[1].start, rows[1].end) == (2, 7)
    assert rows[2].video_id == "xx-yy_zz"


def test_segment_labels():
    rows = read_ave_rows_from(ROWS)
    classes = sorted({r.category for r in rows}) + ["background"]
    idx = {c: i for i, c in enumerate(classes)}
    lab = ave_segment_labels(rows[1], idx, 10, 10.0)
    c = idx["Male speech, man speaking"]
    bg = len(classes) - 1
    assert lab.tolist() == [bg, bg, c, c, c, c, c, bg, bg, bg]    # [2, 7) is the event
    assert ave_segment_labels(rows[0], idx, 10, 10.0).tolist() == [idx["Church bell"]] * 10


def read_ave_rows_from(lines):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines))
    try:
        return read_ave_rows(f.name)
    finally:
        os.unlink(f.name)


def test_splits_same_with_and_without_header(data, tmp_path):
    classes, splits = ave_splits(data)
    assert classes[-1] == "background" and len(classes) == 4
    # the same data set whose Annotations.txt has no header, and split files WITH one
    alt = tmp_path / "alt"
    shutil.copytree(data, alt)
    ann = (alt / "Annotations.txt").read_text().splitlines()
    assert ann[0].startswith("Category&")
    (alt / "Annotations.txt").write_text("\n".join(ann[1:]) + "\n")
    tr = (alt / "trainSet.txt").read_text()
    (alt / "trainSet.txt").write_text("Category&VideoID&Quality&StartTime&EndTime\n" + tr)
    classes2, splits2 = ave_splits(str(alt))
    assert classes2 == classes
    for s in splits:
        assert [(os.path.basename(p), lab.tolist(), v) for p, lab, v in splits[s]] == \
               [(os.path.basename(p), lab.tolist(), v) for p, lab, v in splits2[s]]


def test_decode_and_labels_match_content(data):
    """The decoded audio/video carry the event exactly where the labels say."""
    classes, splits = ave_splits(data)
    bg = len(classes) - 1
    path, lab, _ = splits["train"][0]
    frames, wave = decode_clip(path)
    assert frames.shape == (10, 64, 64, 3) and frames.dtype == np.uint8
    assert wave.shape == (160000,) and wave.dtype == np.float32
    small, wave2 = decode_clip(path, short_side=32)           # downscaled while converting
    assert small.shape == (10, 32, 32, 3) and np.array_equal(wave, wave2)
    rms = np.sqrt((wave.reshape(10, -1) ** 2).mean(1))
    sat = frames.reshape(10, -1, 3).astype(float).mean(1).std(1)   # grey bg: no colour
    for s in range(10):
        if lab[s] == bg:
            assert rms[s] < 0.06 and sat[s] < 10, (s, rms[s], sat[s])
        else:
            assert rms[s] > 0.12 and sat[s] > 20, (s, rms[s], sat[s])


def test_loader_skips_bad_files(data, tmp_path, caplog):
    classes, splits = ave_splits(data)
    good = splits["train"]
    src = good[0][0]
    trunc = tmp_path / "truncated.mp4"
    raw = open(src, "rb").read()
    trunc.write_bytes(raw[: len(raw) * 2 // 5])
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(5000))
    silent = tmp_path / "silent.mp4"
    frames = np.full((40, 64, 64, 3), 128, np.uint8)
    write_clip(str(silent), frames, 4, np.zeros(160000, np.float32))
    noaudio = tmp_path / "noaudio.mp4"
    write_clip(str(noaudio), frames, 4, None)
    # index first (faststart), then cut: opens fine, the media data ends early
    fs = tmp_path / "faststart.mp4"
    fr, wave = decode_clip(src)
    write_clip(str(fs), np.repeat(fr, 4, axis=0), 4, wave, faststart=True)
    assert decode_clip(str(fs))[0].shape == (10, 64, 64, 3)
    raw = fs.read_bytes()
    fs.write_bytes(raw[: len(raw) * 35 // 100])
    lab = good[0][1]
    bad = [(str(trunc), lab, "trunc"), (str(garbage), lab, "garbage"), (str(fs), lab, "fs"),
           (str(silent), lab, "silent"), (str(noaudio), lab, "noaudio"),
           (str(tmp_path / "missing.mp4"), lab, "missing")]
    items = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], bad[4], bad[5]]
    ds = ClipDataset(items, image_size=64)
    with caplog.at_level("WARNING", logger="avstfp_fast.train"):
        batches = list(DataLoader(ds, batch_size=4, collate_fn=collate_skip_bad))
    assert sum(len(b["bad"]) for b in batches) == 6
    assert sorted(os.path.basename(p) for b in batches for p in b["bad"]) == \
        sorted(os.path.basename(p) for p, _, _ in bad)
    ids = [i for b in batches for i in b["id"]]
    assert ids == [good[0][2], good[1][2], good[2][2]]
    b0 = batches[0]
    assert b0["audio"].shape == (2, 10, 98, 128) and b0["video"].shape == (2, 10, 3, 64, 64)
    assert b0["label"].shape == (2, 10) and b0["label"].dtype == torch.long
    assert torch.isfinite(b0["audio"]).all() and torch.isfinite(b0["video"]).all()
    assert "silent" in caplog.text and "no audio stream" in caplog.text
    # a batch of only bad files does not crash either
    only_bad = list(DataLoader(ClipDataset(bad[:2], image_size=64), batch_size=2,
                               collate_fn=collate_skip_bad))
    assert only_bad[0]["audio"] is None and len(only_bad[0]["bad"]) == 2


def test_loader_with_worker_and_augment(data):
    from avstfp_fast.train.augment import build_visual_augment
    classes, splits = ave_splits(data)
    aug = build_visual_augment("strong", 64)
    ds = ClipDataset(splits["train"], image_size=64, augment=aug)
    keys = [(0, 11), (1, 12)]
    a = ds[keys[0]]["video"]
    assert torch.equal(a, ds[keys[0]]["video"])            # seeded: reproducible
    assert not torch.equal(a, ds[(0, 99)]["video"])         # another seed, another crop
    dl = DataLoader(ds, batch_size=2, sampler=keys, num_workers=1,
                    collate_fn=collate_skip_bad)
    (b,) = list(dl)
    assert torch.equal(b["video"][0], a)                    # same in a worker process


def test_kinetics_sounds_csv(data, tmp_path):
    classes, splits = ave_splits(data)
    vids = [p for p, _, _ in splits["train"]]
    root = tmp_path / "ks"
    (root / "clips").mkdir(parents=True)
    for i, v in enumerate(vids[:3]):
        shutil.copy(v, root / "clips" / f"c{i}.mp4")
    (root / "train.csv").write_text("video,label\nclips/c0.mp4,playing drums\n"
                                    "clips/c1.mp4,dog barking\n")
    (root / "val.csv").write_text("clips/c2.mp4,playing drums\n")
    cls, sp = ks_splits(str(root))
    assert cls == ["dog barking", "playing drums"]
    assert [y for _, y, _ in sp["train"]] == [1, 0] and [y for _, y, _ in sp["val"]] == [1]
    item = ClipDataset(sp["train"], image_size=64)[0]
    assert item["label"].shape == () and item["audio"].shape == (10, 98, 128)


def test_synthetic_deterministic(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    make_synthetic_ave(a, n_events=2, n_train=2, n_val=1, n_test=0, seed=5)
    make_synthetic_ave(b, n_events=2, n_train=2, n_val=1, n_test=0, seed=5)
    make_synthetic_ave(c, n_events=2, n_train=2, n_val=1, n_test=0, seed=6)
    for f in ("Annotations.txt", "trainSet.txt", "valSet.txt"):
        assert open(os.path.join(a, f)).read() == open(os.path.join(b, f)).read()
    fa, wa = decode_clip(os.path.join(a, "AVE", "syn_train_0000.mp4"))
    fb, wb = decode_clip(os.path.join(b, "AVE", "syn_train_0000.mp4"))
    fc, wc = decode_clip(os.path.join(c, "AVE", "syn_train_0000.mp4"))
    assert np.array_equal(fa, fb) and np.array_equal(wa, wb)
    assert not np.array_equal(wa, wc)


def test_training_epoch_counts_bad_files(tmp_path):
    """Bad files inside the training split: the epoch runs and its summary counts them."""
    import json
    from avstfp_fast.train import TrainConfig, train
    root = tmp_path / "d"
    make_synthetic_ave(str(root), n_events=2, n_train=6, n_val=2, n_test=0, seed=1)
    (root / "AVE" / "syn_train_0001.mp4").write_bytes(os.urandom(3000))
    write_clip(str(root / "AVE" / "syn_train_0004.mp4"),
               np.full((40, 64, 64, 3), 90, np.uint8), 4, np.zeros(160000, np.float32))
    out = tmp_path / "run"
    res = train(TrainConfig(task="synthetic", backbone="tiny", backend="torch",
                            data_root=str(root), out=str(out), epochs=2, batch_size=2,
                            num_workers=0, progress=False, final_eval=False, threads=1,
                            cache=True))
    assert res["status"] == "finished" and res["steps"] == 6
    assert res["skipped_train_files"] == 2        # distinct files over the run (2 per epoch)
    epochs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [e["skipped_files"] for e in epochs] == [2, 2]
