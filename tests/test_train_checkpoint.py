"""Checkpoints: atomic writes, RNG round trip, exact resume, NaN stop, SIGTERM."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from avstfp_fast.train import TrainConfig, train
from avstfp_fast.train import checkpoint as ck
from avstfp_fast.train.synthetic import make_synthetic_ave


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    make_synthetic_ave(root, n_events=3, n_train=8, n_val=2, n_test=0, seed=2)
    return root


def small_cfg(data, out, **kw):
    base = dict(task="synthetic", backbone="tiny", backend="torch", data_root=data, out=out,
                epochs=2, warmup_epochs=0.5, lr_prompts=3e-3, lr_head=3e-3, batch_size=2,
                num_workers=0, visual_aug="strong", mixup_prob=1.0, eval_every=1,
                final_eval=False, progress=False, seed=1, cache=False,
                threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    ck.atomic_save({"x": torch.arange(3)}, path)

    def boom(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        ck.atomic_save({"x": torch.arange(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    assert os.listdir(tmp_path) == ["c.pt"]                  # no temp file left behind


def test_rng_round_trip():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ck.capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(3))
    path = "/tmp/_rng_test_ckpt.pt"
    ck.atomic_save({"rng": state}, path)
    loaded = torch.load(path, weights_only=True)["rng"]
    os.unlink(path)
    random.random(), np.random.rand(), torch.rand(3)
    ck.restore_rng(loaded)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_resume_gives_identical_losses(data, tmp_path):
    """N=6 steps straight vs 3 steps + resume (mid-epoch, with mix-up, augmentation and a
    validation pass in between): the per-step losses must be bit-identical."""
    full = train(small_cfg(data, str(tmp_path / "full"), max_steps=6))
    assert full["steps"] == 6 and len(full["losses"]) == 6
    part = train(small_cfg(data, str(tmp_path / "part"), max_steps=3))
    ckpt_path = str(tmp_path / "part" / "checkpoints" / "last.pt")
    ckpt = ck.load_checkpoint(ckpt_path)
    assert ckpt["step"] == 3 and ckpt["model_full"]
    assert {"python", "numpy", "torch"} <= set(ckpt["rng"])
    assert ckpt["optimizer"]["state"] and ckpt["scheduler"]["last_epoch"] == 3
    rest = train(small_cfg(data, str(tmp_path / "rest"), max_steps=6, resume=ckpt_path))
    assert part["losses"] == full["losses"][:3]
    assert rest["losses"] == full["losses"][3:], (full["losses"], rest["losses"])
    # and the final weights agree exactly
    a = ck.load_checkpoint(str(tmp_path / "full" / "checkpoints" / "last.pt"))["model"]
    b = ck.load_checkpoint(str(tmp_path / "rest" / "checkpoints" / "last.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # run folder contents
    recs = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert [r["loss"] for r in recs if r["kind"] == "step"] == full["losses"]
    assert any(r["kind"] == "eval" and r["split"] == "val" for r in recs)
    assert json.load(open(tmp_path / "full" / "config.json"))["task"] == "synthetic"


def test_nonfinite_loss_stops_with_last_good_checkpoint(data, tmp_path, monkeypatch):
    from avstfp_fast.train import loop, tasks
    calls = {"n": 0}
    real = tasks.ClassificationTask.loss

    def flaky(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 3 else loss
    monkeypatch.setattr(tasks.ClassificationTask, "loss", staticmethod(flaky))
    out = tmp_path / "nan"
    with pytest.raises(loop.NonFiniteLoss, match=r"non-finite loss \(nan\) at step 3") as ei:
        train(small_cfg(data, str(out), ckpt_every=1, eval_every=0))
    assert "last.pt" in str(ei.value)
    ckpt = ck.load_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert recs[-1]["kind"] == "error" and "non-finite" in recs[-1]["message"]


def test_sigterm_saves_and_exits_cleanly(data, tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "avstfp_fast.train", "--task", "synthetic", "--data-root",
           data, "--out", str(out), "--epochs", "100", "--batch-size", "2",
           "--num-workers", "0", "--no-progress", "--eval-every", "0", "--backend", "torch",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and '"kind": "step"' in metrics.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by signal" in stderr and "Traceback" not in stderr
    ckpt = ck.load_checkpoint(str(out / "checkpoints" / "last.pt"))
    assert ckpt["step"] >= 1
    recs = [json.loads(line) for line in open(metrics)]
    assert recs[-1]["kind"] == "stopped" and recs[-1]["step"] == ckpt["step"]


def test_config_holds_the_model_config_and_reads_flat_dicts():
    from avstfp_fast.models.config import AVSTFPConfig
    cfg = TrainConfig.from_dict({"task": "synthetic", "n_spatial": 3, "stages": ["spatial"],
                                 "epochs": 2, "unknown": 1})
    assert isinstance(cfg.model, AVSTFPConfig) and cfg.model.task is None
    assert (cfg.model.n_spatial, cfg.model.stages, cfg.epochs) == (3, ("spatial",), 2)
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))   # nested, JSON
    assert again == cfg
    assert cfg.flat()["n_spatial"] == 3 and "model" not in cfg.flat()
    # run folders and checkpoints written while the model config had an ``extra`` field
    old = cfg.to_dict()
    old["model"]["extra"] = {}
    assert "extra" not in cfg.to_dict()["model"]
    assert TrainConfig.from_dict(old) == cfg
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="nope")
