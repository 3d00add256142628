"""DDP on CPU: 2 processes with the gloo backend, a few steps on tiny synthetic data.

With mix-up off, a DDP step over 2 x 2 clips equals a single-process step over the same
4 clips (DistributedSampler shards one permutation; gradients are averaged), so the
losses and weights must match a batch-4 single-process run.
"""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from avstfp_fast.train import TrainConfig, train
from avstfp_fast.train import checkpoint as ck
from avstfp_fast.train.synthetic import make_synthetic_ave


def _cfg(data, out, batch_size):
    return TrainConfig(task="synthetic", backbone="tiny", backend="torch", data_root=data,
                       out=out, epochs=2, warmup_epochs=0.5, lr_prompts=3e-3, lr_head=3e-3,
                       batch_size=batch_size, num_workers=0, visual_aug="light",
                       mixup_prob=0.0, eval_every=1, final_eval=True, progress=False,
                       seed=4, max_steps=3, threads=1)


def _worker(rank, world, port, data, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    res = train(_cfg(data, out, 2))
    params = ck.load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))["model"] \
        if rank == 0 else None
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": res["losses"], "steps": res["steps"], "val_acc": res["val_acc"],
                   "val_n": res["val_n"], "world": int(os.environ["WORLD_SIZE"]),
                   "has_params": params is not None}, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_matches_single(tmp_path):
    data = str(tmp_path / "data")
    make_synthetic_ave(data, n_events=3, n_train=8, n_val=3, n_test=0, seed=4)
    out = str(tmp_path / "ddp")
    os.makedirs(out)
    mp.spawn(_worker, args=(2, _free_port(), data, out), nprocs=2, join=True)
    r0, r1 = (json.load(open(os.path.join(out, f"rank{r}.json"))) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3
    assert r0["losses"] == r1["losses"]                    # all-reduced, identical
    assert r0["val_acc"] == r1["val_acc"] and r0["val_n"] == 30    # 3 clips, no duplicates

    single = train(_cfg(data, str(tmp_path / "single"), 4))
    assert single["losses"] == pytest.approx(r0["losses"], rel=1e-4, abs=1e-6)
    a = ck.load_checkpoint(os.path.join(out, "checkpoints", "last.pt"))["model"]
    b = ck.load_checkpoint(str(tmp_path / "single" / "checkpoints" / "last.pt"))["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert sum(r["kind"] == "step" for r in recs) == 3     # written once (rank 0)
