"""Prepared shards (avstfp-prepare): equality with the decode path, the DDP x worker
split, replayable shard-buffer shuffling, resuming, --verify, and every bad input."""
import json
import os
import shutil
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from avstfp_fast.data.shards import PreparedDataError, read_clip, scan_shard
from avstfp_fast.prepare import main as prepare_main
from avstfp_fast.train import TrainConfig, train
from avstfp_fast.train.augment import build_visual_augment
from avstfp_fast.train.data import (ClipDataset, PreparedClipDataset, ShardSampler,
                                    ResumableDistributedSampler, ave_splits, prepared_splits)
from avstfp_fast.train.synthetic import make_synthetic_ave

N_TRAIN, N_VAL = 10, 6


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    src = str(root / "src")
    make_synthetic_ave(src, n_events=3, n_train=N_TRAIN, n_val=N_VAL, n_test=0, seed=3)
    out = {}
    for name, extra in (("f16", []), ("f32", ["--audio-dtype", "float32"]),
                        ("jpeg", ["--frames", "jpeg"])):
        out[name] = str(root / name)
        assert prepare_main(["--task", "synthetic", "--data-root", src, "--out", out[name],
                             "--workers", "0", "--shard-size", "3", "--no-progress",
                             *extra]) == 0
    out["src"] = src
    return out


def _decoded(src, split="train"):
    _, splits = ave_splits(src)
    return ClipDataset(splits[split], image_size=64)


def _prepared(root, split="train", **kw):
    _, _, splits = prepared_splits(root, "ave")
    refs, sizes = splits[split]
    return PreparedClipDataset(refs, sizes, image_size=64, **kw)


def test_manifest_counts_and_layout(syn):
    man = json.load(open(os.path.join(syn["f16"], "manifest.json")))
    assert man["format"] == "avstfp-prepared/1" and man["library_version"]
    assert man["splits"]["train"]["clips"] == N_TRAIN and man["splits"]["val"]["clips"] == N_VAL
    assert [s["clips"] for s in man["splits"]["train"]["shards"]] == [3, 3, 3, 1]
    assert man["settings"]["short_side"] == 80 and man["source"]["task"] == "synthetic"
    assert man["classes"][-1] == "background"


def test_same_clip_same_tensors(syn):
    """npy frames and float32 fbank: bit-exact; float16 fbank: within fp16 rounding;
    after augmentation and the front end too (same seed)."""
    dec = _decoded(syn["src"])
    p32, p16 = _prepared(syn["f32"]), _prepared(syn["f16"])
    aug = build_visual_augment("strong", 64)
    for i in (0, 4, N_TRAIN - 1):
        a, f = dec.raw(i)[:2]
        a32, f32 = p32.raw(i)[:2]
        a16, f16 = p16.raw(i)[:2]
        assert torch.equal(f, f32) and torch.equal(f, f16) and torch.equal(a, a32)
        torch.testing.assert_close(a16, a, rtol=2 ** -11, atol=2 ** -24)
        assert not torch.equal(a16, a)           # it is fp16 storage, really
        assert p32.items[i][2] == dec.items[i][2]
        assert np.array_equal(p32.items[i][1], dec.items[i][1])
        dec.augment = p32.augment = aug
        x, y = dec[(i, 1234 + i)], p32[(i, 1234 + i)]
        assert torch.equal(x["video"], y["video"]) and torch.equal(x["audio"], y["audio"])
        assert torch.equal(x["label"], y["label"]) and x["id"] == y["id"]


def test_jpeg_tolerance(syn):
    """--frames jpeg: the stated tolerance (docs/data.md): mean |error| <= 2/255, max
    <= 48/255 per pixel (quality 95, no chroma subsampling)."""
    dec, pj = _decoded(syn["src"]), _prepared(syn["jpeg"])
    for i in range(3):
        f, fj = dec.raw(i)[1].int(), pj.raw(i)[1].int()
        err = (f - fj).abs()
        assert err.float().mean() <= 2 and err.max() <= 48, (err.float().mean(), err.max())
    man = json.load(open(os.path.join(syn["jpeg"], "manifest.json")))
    man16 = json.load(open(os.path.join(syn["f16"], "manifest.json")))
    assert man["bytes"] < man16["bytes"]


def test_shard_buffer_order_replays_and_covers(syn):
    ds = _prepared(syn["f16"])
    orders = {}
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            s = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=7)
            s.set_epoch(epoch)
            per_rank.append([i for i, _ in s])
            s2 = ResumableDistributedSampler(ds, num_replicas=2, rank=rank, seed=7)
            s2.set_epoch(epoch)
            assert list(s2) == list(s)                          # replays
        assert sorted(per_rank[0] + per_rank[1]) == list(range(N_TRAIN))   # no loss/overlap
        orders[epoch] = per_rank
    assert orders[0] != orders[1]
    # the first shard-buffer window reads only `shard_buffer` shards
    s = ResumableDistributedSampler(ds, num_replicas=1, rank=0, seed=7)
    first = [i for i, _ in s][:6]
    assert len({i // 3 for i in first}) <= 4


def _split_worker(rank, world, port, root, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.utils.data import DataLoader

    from avstfp_fast.train.data import collate_skip_bad
    torch.set_num_threads(1)
    res = {}
    for split in ("val",):
        ds = _prepared(root, split)
        dl = DataLoader(ds, batch_size=2, sampler=ShardSampler(len(ds), rank, world),
                        num_workers=2, collate_fn=collate_skip_bad)
        res[split] = [v for b in dl for v in b["id"]]
    ds = _prepared(root, "train")
    s = ResumableDistributedSampler(ds, num_replicas=world, rank=rank, seed=1)
    dl = DataLoader(ds, batch_size=2, sampler=s, num_workers=2, collate_fn=collate_skip_bad)
    res["train_shuffled"] = [v for b in dl for v in b["id"]]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, res)
    if rank == 0:
        json.dump(gathered, open(os.path.join(outdir, "ids.json"), "w"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_processes_two_workers_see_every_clip_once(syn, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_split_worker, args=(2, port, syn["f16"], str(tmp_path)), nprocs=2, join=True)
    got = json.load(open(tmp_path / "ids.json"))
    for split, n in (("val", N_VAL), ("train_shuffled", N_TRAIN)):
        ids = got[0][split] + got[1][split]
        assert len(ids) == n and len(set(ids)) == n, (split, ids)
    _, splits = ave_splits(syn["src"])
    assert set(got[0]["val"] + got[1]["val"]) == {it[2] for it in splits["val"]}


def _cfg(**kw):
    return TrainConfig(**{"task": "synthetic", "backbone": "tiny", "backend": "torch",
                          "epochs": 2, "max_steps": 4, "batch_size": 4, "progress": False,
                          "seed": 2, "final_eval": True, "num_workers": 0, "threads": 1,
                          "visual_aug": "light", "mixup_prob": 0.0, "lr_prompts": 3e-3,
                          "lr_head": 3e-3, **kw})


def test_training_from_shards_matches_decoding(syn, tmp_path):
    """A short run from the shards reaches the decode path's accuracy within noise (the
    training order differs: shard-buffer shuffling); evaluating one checkpoint on the
    float32 shards gives exactly the decode path's metrics (the same tensors)."""
    dec = train(_cfg(data_root=syn["src"], out=str(tmp_path / "dec")))
    p16 = train(_cfg(data_root=syn["f16"], out=str(tmp_path / "p16")))     # detected
    assert abs(p16["val_acc"] - dec["val_acc"]) <= 0.1
    assert p16["val_n"] == dec["val_n"] == N_VAL * 10
    best = os.path.join(dec["run_dir"], "checkpoints", "best.pt")
    ev = train(_cfg(prepared=syn["f32"], out=str(tmp_path / "ev"), eval_only=True,
                    resume=best))
    assert ev["val_acc"] == dec["val_acc"] and ev["val_n"] == dec["val_n"]
    assert ev["val_top5"] == dec["val_top5"]
    # avstfp-predict reads the same shards (and refuses an unknown split in one line)
    from avstfp_fast.predict.cli import main as predict_main
    out = str(tmp_path / "pred")
    assert predict_main([best, "--prepared", syn["f32"], "--prepared-split", "val",
                         "--out", out, "--no-progress"]) == 0
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["processed"] == N_VAL and run["evaluation"]["acc"] == dec["val_acc"]
    assert predict_main([best, "--prepared", syn["f32"], "--prepared-split", "nope",
                         "--out", out, "--no-progress"]) == 2


# ------------------------------------------------------------------ bad input
def _copy(syn, tmp_path, name="f16"):
    dst = str(tmp_path / "copy")
    shutil.copytree(syn[name], dst)
    return dst


def test_settings_mismatch_is_one_line(syn, tmp_path, capsys):
    with pytest.raises(PreparedDataError, match="segments: prepared 10, run needs 8"):
        prepared_splits(syn["f16"], "ave", segments=8)
    with pytest.raises(PreparedDataError, match="layout: prepared 'ave', run needs 'ks'"):
        prepared_splits(syn["f16"], "ks")
    from avstfp_fast.train.cli import main
    rc = main(["--task", "synthetic", "--prepared", syn["f16"], "--segments", "8",
               "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "segments: prepared 10, run needs 8" in err[-1]
    # a tower of another input size than the frames were kept for
    rc = main(["--task", "synthetic", "--prepared", syn["f16"], "--backbone", "ViT-B-16",
               "--out", str(tmp_path / "r2"), "--no-progress", "--epochs", "1"])
    assert rc == 2 and "image_size: prepared 64, run needs 224" in capsys.readouterr().err


def test_corrupt_missing_and_unlisted_shards(syn, tmp_path):
    root = _copy(syn, tmp_path)
    shard = os.path.join(root, "train", "shard-000001.tar")
    with open(shard, "r+b") as f:            # garble a tar header: structure damage
        f.seek(0)
        f.write(b"\xff" * 100)
    with pytest.raises(PreparedDataError, match="corrupt prepared shard .*shard-000001"):
        prepared_splits(root, "ave")
    rc = prepare_main(["--verify", root])
    assert rc == 1
    os.remove(shard)
    with pytest.raises(PreparedDataError, match="prepared shard missing: .*shard-000001"):
        prepared_splits(root, "ave")
    root2 = _copy(syn, tmp_path / "b")
    shutil.copy(os.path.join(root2, "train", "shard-000000.tar"),
                os.path.join(root2, "train", "shard-000009.tar"))
    with pytest.raises(PreparedDataError, match="shards the manifest does not list: "
                                                r"\['shard-000009.tar'\]"):
        prepared_splits(root2, "ave")
    os.remove(os.path.join(root2, "train", "shard-000009.tar"))
    with open(os.path.join(root2, "train", "shard-000000.tar"), "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(PreparedDataError, match="bytes, the manifest says"):
        prepared_splits(root2, "ave")


def test_flipped_bit_in_a_sample_is_skipped_and_counted(syn, tmp_path):
    root = _copy(syn, tmp_path)
    shard = os.path.join(root, "train", "shard-000000.tar")
    ref, meta = scan_shard(shard)[1]
    off = dict((s, o) for s, o, _ in ref.members)["frames.npy"] + 200
    with open(shard, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 1]))
    ds = _prepared(root)
    out = ds[1]
    assert str(out["bad"]).endswith("shard-000000.tar#000001") and "CRC-32" in out["reason"]
    assert "id" in ds[0]
    n, problems = __import__("avstfp_fast.data.prepare", fromlist=["verify"]).verify(root)
    assert n == N_TRAIN + N_VAL - 1 and any("sha256" in p for p in problems)
    assert any("CRC-32" in p for p in problems)


def test_bad_videos_listed_resume_and_verify(syn, tmp_path, capsys):
    src = str(tmp_path / "src")
    shutil.copytree(syn["src"], src)
    vid = sorted(os.listdir(os.path.join(src, "AVE")))[0]
    with open(os.path.join(src, "AVE", vid), "wb") as f:
        f.write(b"not a video")
    out = str(tmp_path / "out")
    args = ["--task", "synthetic", "--data-root", src, "--out", out, "--workers", "2",
            "--shard-size", "4", "--no-progress"]
    assert prepare_main(args) == 0
    man = json.load(open(os.path.join(out, "manifest.json")))
    total = sum(v["clips"] + v["bad"] for v in man["splits"].values())
    assert total == N_TRAIN + N_VAL and sum(v["bad"] for v in man["splits"].values()) == 1
    bad = [json.loads(line) for line in open(os.path.join(out, "bad.jsonl"))]
    assert len(bad) == 1 and bad[0]["source"].endswith(vid) and "unreadable" in bad[0]["reason"]
    assert vid in capsys.readouterr().err
    # resume: finished shards are kept (not rewritten), a lost one is rebuilt
    keep = os.path.join(out, "train", "shard-000000.tar")
    lost = os.path.join(out, "train", "shard-000001.tar")
    mtime = os.stat(keep).st_mtime_ns
    os.remove(lost)
    assert prepare_main(args) == 0
    assert os.stat(keep).st_mtime_ns == mtime and os.path.isfile(lost)
    assert "clips to prepare in 1 shards" in capsys.readouterr().err
    assert prepare_main(["--verify", out]) == 0
    # a smaller source: the shards it no longer has are removed, not left unlisted
    rows = open(os.path.join(src, "trainSet.txt")).read().splitlines()
    open(os.path.join(src, "trainSet.txt"), "w").write("\n".join(rows[:-3]) + "\n")
    assert prepare_main(args) == 0
    assert not os.path.exists(os.path.join(out, "train", "shard-000002.tar"))
    assert prepare_main(["--verify", out]) == 0
    bad_kept = any(os.path.splitext(vid)[0] in r for r in rows[:-3])
    assert len(prepared_splits(out, "ave")[2]["train"][0]) == N_TRAIN - 3 - bad_kept
    # other settings into the same folder: refused in one line
    assert prepare_main(args + ["--frames", "jpeg"]) == 2
    assert "prepared with other settings" in capsys.readouterr().err


def test_cli_bad_options(tmp_path, capsys):
    assert prepare_main(["--task", "ave", "--out", str(tmp_path)]) == 2
    assert "--data-root" in capsys.readouterr().err
    assert prepare_main(["--verify", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert prepare_main(["--task", "synthetic", "--data-root", str(tmp_path / "s"),
                         "--out", str(tmp_path / "o"), "--workers", "-1"]) == 2


def test_webdataset_reads_the_shards(syn):
    wds = pytest.importorskip("webdataset")
    shard = os.path.join(syn["f16"], "train", "shard-000000.tar")
    samples = list(wds.WebDataset(shard, shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000", "000001", "000002"]
    ref, meta = scan_shard(shard)[0]
    audio, frames = read_clip(ref)
    import io
    assert np.array_equal(np.load(io.BytesIO(samples[0]["frames.npy"])),
                          frames.permute(0, 2, 3, 1).numpy())
    assert json.loads(samples[0]["json"])["id"] == meta["id"]
    with tarfile.open(shard) as t:
        assert all(m.isfile() for m in t.getmembers())


def test_color_jitter_fused():
    """The strong augmentation's colour jitter: one affine map per frame.  Zero ranges
    are the identity; each factor alone matches torchvision's op where nothing clips;
    greys stay grey under saturation and hue; the result stays in [0, 1]."""
    from torchvision.transforms.v2 import functional as TF

    from avstfp_fast.train.augment import ColorJitterFused
    torch.manual_seed(0)
    x = 0.25 + 0.5 * torch.rand(4, 3, 8, 8)            # mid-range: no clipping
    torch.testing.assert_close(ColorJitterFused()(x), x, atol=1e-6, rtol=0)
    for idx, (kw, fn) in enumerate((({"brightness": 0.2}, TF.adjust_brightness),
                                    ({"contrast": 0.2}, TF.adjust_contrast),
                                    ({"saturation": 0.2}, TF.adjust_saturation))):
        torch.manual_seed(5)
        got = ColorJitterFused(**kw)(x)
        torch.manual_seed(5)
        torch.randperm(4)
        f = [float(torch.empty(()).uniform_(0.8, 1.2)) for _ in range(3)][idx]
        torch.testing.assert_close(got, fn(x, f), atol=2e-6, rtol=0, msg=str(kw))
    grey = torch.full((2, 3, 4, 4), 0.4)
    torch.testing.assert_close(ColorJitterFused(saturation=1.0, hue=0.5)(grey), grey,
                               atol=1e-5, rtol=0)
    y = ColorJitterFused(0.4, 0.4, 0.4, 0.1)(torch.rand(10, 3, 16, 16))
    assert 0 <= y.min() and y.max() <= 1
    with pytest.raises(ValueError, match="hue"):
        ColorJitterFused(hue=0.7)
    with pytest.raises(ValueError, match="expected a float"):
        ColorJitterFused(0.1)(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


def test_frontend_same_size_resize_is_skipped_exactly():
    """The front end skips the resize of frames already at the model's size (augmented
    crops): bicubic at scale 1 is the identity, so nothing changes."""
    import torch.nn.functional as F

    from avstfp_fast import frontend
    torch.manual_seed(1)
    x = torch.rand(10, 3, 32, 32)
    y = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(x, y)
    u8 = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    ref = F.interpolate(u8.float() / 255, size=(32, 32), mode="bicubic",
                        align_corners=False, antialias=True).clamp(0, 1)
    mean = torch.tensor(frontend.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(frontend.CLIP_STD).view(1, 3, 1, 1)
    assert torch.equal(frontend.video_frames(u8, 10, 32), (ref - mean) / std)


def test_kinetics_sounds_layout(syn, tmp_path):
    from avstfp_fast.train.data import ks_splits
    vids = [p for p, _, _ in ave_splits(syn["src"])[1]["train"]][:3]
    root = tmp_path / "ks"
    (root / "clips").mkdir(parents=True)
    for i, v in enumerate(vids):
        shutil.copy(v, root / "clips" / f"c{i}.mp4")
    (root / "train.csv").write_text("video,label\nclips/c0.mp4,drums\nclips/c1.mp4,dog\n")
    (root / "val.csv").write_text("clips/c2.mp4,drums\nclips/missing.mp4,dog\n")
    out = str(tmp_path / "ksp")
    assert prepare_main(["--task", "avar", "--data-root", str(root), "--out", out,
                         "--workers", "0", "--no-progress", "--image-size", "64"]) == 0
    classes, splits = ks_splits(str(root))
    man, pclasses, psplits = prepared_splits(out, "ks")
    assert pclasses == classes
    assert man["splits"]["val"]["clips"] == 1 and man["splits"]["val"]["bad"] == 1
    assert [m["label"] for _, m in psplits["train"][0]] == [it[1] for it in splits["train"]]
    with pytest.raises(PreparedDataError, match="layout: prepared 'ks', run needs 'ave'"):
        prepared_splits(out, "ave")


def test_avqa_video_prepared_once_questions_reference_it(tmp_path):
    from avstfp_fast.train.avqa_data import AVQADataset, avqa_splits
    from avstfp_fast.train.avqa_synthetic import make_synthetic_avqa
    from avstfp_fast.train.registry import make_task
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    make_synthetic_avqa(src, n_train=3, n_val=2, n_test=0, hop=1, seed=1)
    assert prepare_main(["--task", "synthetic_avqa", "--data-root", src, "--out", out,
                         "--workers", "0", "--no-progress", "--audio-dtype", "float32"]) == 0
    man = json.load(open(os.path.join(out, "manifest.json")))
    assert list(man["splits"]) == ["videos"] and man["splits"]["videos"]["clips"] == 5
    s = avqa_splits(src)
    assert man["avqa"]["questions"] == {k: len(v) for k, v in s.splits.items()}
    assert sum(len(v) for v in s.splits.values()) > 5          # several questions a video
    cfg = TrainConfig(task="synthetic_avqa", backbone="tiny", prepared=out, avqa_hop=1)
    task = make_task(cfg)
    data = task.prepare_data(str(tmp_path / "run"), 0)
    answers, items = data.classes, data.splits
    assert task.classes is answers and task.splits is items and data.data_root is None
    assert answers == s.answers and list(task.vocab.words) == list(s.vocab.words)
    ds = task.dataset("val", train=False, image_size=64)
    dec = AVQADataset(s.splits["val"], hop=1, image_size=64, segments=10)
    for i in range(len(ds)):
        a, b = ds[i], dec[i]
        assert a["qid"] == b["qid"] and torch.equal(a["question"], b["question"])
        assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
        assert int(a["label"]) == int(b["label"])
    refs = {str(it[0]) for it in items["val"]}
    assert len(refs) == 2                                      # 2 videos, many questions
    cfg2 = TrainConfig(task="synthetic_avqa", backbone="tiny", prepared=out, avqa_hop=2)
    with pytest.raises(PreparedDataError, match="avqa_hop: prepared 1, run needs 2"):
        make_task(cfg2).prepare_data(str(tmp_path / "run2"), 0)


def test_decoder_extras_round_trip(tmp_path):
    """What the decoder reports beside the tensors (padded segments of a short file and
    the media length) is stored with the clip and returned when it is read."""
    from avstfp_fast.data.prepare import prepare_splits
    from avstfp_fast.data.shards import PreparedSettings

    class Source:
        items = [("a.mp4", 1, "a"), ("b.mp4", 0, "b")]

        def raw(self, i):
            g = torch.Generator().manual_seed(i)
            audio = torch.randn(10, 98, 128, generator=g)
            frames = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8, generator=g)
            return (audio, frames, [8, 9], 8.0) if i else (audio, frames)

    out = str(tmp_path / "p")
    prepare_splits(out, {"train": Source()}, PreparedSettings(layout="ave", image_size=8,
                                                               short_side=10),
                   source_info={}, classes=["x", "background"], workers=0, progress=False)
    _, _, splits = prepared_splits(out, "ave")
    ds = PreparedClipDataset(*splits["train"], image_size=8)
    assert ds._load(0)[2:] == ((), None)          # nothing recorded: no padding known
    audio, frames, padded, media = ds._load(1)
    assert padded == (8, 9) and media == 8.0
    assert torch.equal(frames, Source().raw(1)[1])
