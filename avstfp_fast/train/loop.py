"""The training loop: model, data, optimiser, schedule, DDP, checkpoints, evaluation.

``train(cfg)`` runs one training (or, with ``cfg.eval_only``, one evaluation) and returns
a dict of metrics.  It is what the CLI, ``run_synthetic`` and the tests call.

Reproducibility (what makes ``--resume`` give the same per-step losses as an
uninterrupted run on CPU):
* the sampler's permutation depends on (seed, epoch) only, and a resumed epoch skips the
  samples already consumed;
* visual augmentation is seeded per (seed, epoch, sample index), mix-up per (seed, step,
  rank) -- neither uses the global RNG;
* the DataLoader gets its own generator (it would otherwise draw from the global torch
  RNG whenever an epoch starts);
* checkpoints hold the model (the full state when the tower is random), optimiser,
  scheduler and the python/numpy/torch RNG states.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from . import checkpoint as ck
from .augment import build_visual_augment
from .config import TrainConfig
from .data import (ClipDataset, ResumableDistributedSampler, ShardSampler, ave_splits,
                   collate_skip_bad, ks_splits)
from .metrics import accuracy_from_confusion, confusion_update, format_table, plot_confusion
from .mixup import audio_mixup, one_hot
from .schedule import build_scheduler

log = logging.getLogger("avstfp_fast.train")

__all__ = ["train", "NonFiniteLoss"]


class NonFiniteLoss(RuntimeError):
    pass


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def _dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _maybe_init_dist(device_type: str) -> bool:
    """Initialise torch.distributed from torchrun's environment (WORLD_SIZE > 1)."""
    if dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return True


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum a small CPU tensor over ranks in place (NCCL needs a CUDA copy)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            d = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(d)
            t.copy_(d.cpu())
        else:
            dist.all_reduce(t)
    return t


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _worker_init(worker_id: int) -> None:
    # A SIGTERM sent to the whole process group must reach only the main process, which
    # saves a checkpoint and stops; workers dying first would crash the loader instead.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _JsonlWriter:
    def __init__(self, path, enabled):
        self.enabled = enabled
        self.f = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, **rec):
        if self.f is not None:
            rec.setdefault("time", round(time.time(), 3))
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


def build_model(cfg: TrainConfig, num_classes: int):
    from avstfp_fast import PromptedCLIP
    kw = dict(task="avar" if cfg.task == "avar" else "ave", num_classes=num_classes,
              n_temporal=cfg.n_temporal, n_spatial=cfg.n_spatial, n_fusion=cfg.n_fusion,
              stages=tuple(cfg.stages), modalities=tuple(cfg.modalities),
              full_finetune=cfg.full_finetune, beta_init=cfg.beta_init)
    if cfg.backbone == "tiny":
        if cfg.pretrained:
            raise ValueError("pretrained: the 'tiny' backbone is random; drop --pretrained")
        return PromptedCLIP.tiny(backend=cfg.backend, **kw)
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained):
        raise FileNotFoundError(f"pretrained: expected a local open_clip checkpoint file, got "
                                f"{cfg.pretrained!r} (downloads are never attempted)")
    if cfg.pretrained is None:
        log.warning("no --pretrained checkpoint: the %s tower is randomly initialised",
                    cfg.backbone)
    return PromptedCLIP(cfg.backbone, pretrained=cfg.pretrained, backend=cfg.backend, **kw)


def _prepare_data(cfg: TrainConfig, run_dir: str, rank: int):
    """Return (classes, splits) and, for the synthetic task, generate the files first."""
    root = cfg.data_root
    if cfg.task == "synthetic":
        from .synthetic import make_synthetic_ave
        if root is None:
            root = os.path.join(run_dir, "synthetic_data")
            cfg.data_root = root
        if rank == 0 and not os.path.isfile(os.path.join(root, "Annotations.txt")):
            make_synthetic_ave(root, n_events=cfg.synthetic_events, n_train=cfg.synthetic_train,
                               n_val=cfg.synthetic_val, n_test=cfg.synthetic_test,
                               segments=cfg.segments, seed=cfg.seed,
                               header=cfg.synthetic_header)
        _barrier()
    if root is None:
        raise ValueError(f"data_root: required for task {cfg.task!r}")
    if cfg.task == "avar":
        return ks_splits(root)
    return ave_splits(root, segments=cfg.segments, clip_seconds=cfg.clip_seconds)


def _loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    c = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, c).float(), targets.reshape(-1, c))


# --------------------------------------------------------------------------------------
# the trainer
# --------------------------------------------------------------------------------------
class Trainer:
    loss_fn = staticmethod(_loss_fn)     # tests may replace it (e.g. to inject a NaN)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        if cfg.device:
            self.device = torch.device(cfg.device)
        else:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self._own_pg = _maybe_init_dist(self.device.type)
        self.rank, self.world = _dist_info()
        if self.device.type == "cuda" and self.world > 1:
            local = int(os.environ.get("LOCAL_RANK", self.rank))
            self.device = torch.device("cuda", local)
            torch.cuda.set_device(self.device)
        self.is_main = self.rank == 0
        self.stop_signal = None

        run_dir = cfg.out or os.path.join("runs", f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        if self.world > 1:          # one folder for all ranks (their clocks may disagree)
            box = [run_dir]
            dist.broadcast_object_list(box, src=0)
            run_dir = box[0]
        self.run_dir = run_dir
        self.ckpt_dir = os.path.join(run_dir, "checkpoints")
        if self.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        _barrier()

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.classes, self.splits = _prepare_data(cfg, run_dir, self.rank)
        self.num_classes = len(self.classes)
        if self.is_main:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump({**cfg.to_dict(), "classes": self.classes, "world_size": self.world,
                           "device": str(self.device)}, f, indent=2)
        self.metrics = _JsonlWriter(os.path.join(run_dir, "metrics.jsonl"), self.is_main)

        torch.manual_seed(cfg.seed)          # model init independent of data generation
        self.model = build_model(cfg, self.num_classes).to(self.device)
        # random towers are not reproducible from a name: save the full state then
        self.full_state = bool(cfg.full_finetune or cfg.pretrained is None)
        self.image_size = self.model.image_size

        self.optimizer = None
        self.scheduler = None
        self.steps_per_epoch = 1
        self._eval_loaders = {}

    # ---------------------------------------------------------------- data
    def _dataset(self, split: str, train: bool) -> ClipDataset:
        cfg = self.cfg
        aug = build_visual_augment(cfg.visual_aug, self.image_size) if train else None
        return ClipDataset(self.splits[split], image_size=self.image_size,
                           segments=cfg.segments, clip_seconds=cfg.clip_seconds,
                           sample_rate=cfg.sample_rate, augment=aug, cache=cfg.cache)

    def _loader(self, ds, sampler) -> DataLoader:
        cfg = self.cfg
        nw = cfg.num_workers
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=nw,
                          collate_fn=collate_skip_bad, pin_memory=self.device.type == "cuda",
                          persistent_workers=nw > 0, drop_last=False,
                          generator=torch.Generator().manual_seed(cfg.seed),
                          worker_init_fn=_worker_init if nw > 0 else None,
                          prefetch_factor=2 if nw > 0 else None)

    def _eval_loader(self, split: str):
        if split not in self._eval_loaders:     # kept: workers (and caches) persist
            ds = self._dataset(split, train=False)
            self._eval_loaders[split] = self._loader(ds, ShardSampler(len(ds), self.rank,
                                                                       self.world))
        return self._eval_loaders[split]

    # ---------------------------------------------------------------- optimiser
    def _build_optimizer(self, steps_per_epoch: int):
        cfg = self.cfg
        groups = self.model.param_groups(cfg.lr_prompts, cfg.lr_head, cfg.weight_decay)
        grouped = {id(p) for g in groups for p in g["params"]}
        missing = [n for n, p in self.model.named_parameters()
                   if p.requires_grad and id(p) not in grouped]
        if missing:
            raise ValueError(f"model.param_groups misses trainable parameters: {missing[:8]}")
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
        groups = [g for g in groups if g["params"]]
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        self.optimizer = opt_cls(groups, lr=cfg.lr_prompts, weight_decay=cfg.weight_decay)
        self.total_steps = cfg.epochs * steps_per_epoch
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, floor=cfg.min_lr,
                                         warmup_steps=self.warmup_steps,
                                         total_steps=self.total_steps)

    # ---------------------------------------------------------------- checkpoints
    def _ckpt_payload(self, step: int, best: float) -> dict:
        return {"format": ck.FORMAT, "model": ck.model_state(self.model, self.full_state),
                "model_full": self.full_state,
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "rng": ck.capture_rng(), "step": int(step),
                "epoch": int(step // max(1, self.steps_per_epoch)), "best": float(best),
                "config": self.cfg.to_dict(), "classes": list(self.classes)}

    def save(self, name: str, step: int, best: float) -> str:
        path = os.path.join(self.ckpt_dir, name)
        if self.is_main:
            ck.atomic_save(self._ckpt_payload(step, best), path)
        _barrier()
        return path

    def _load_model_from(self, ckpt: dict):
        if list(ckpt["classes"]) != list(self.classes):
            raise ValueError(f"resume: checkpoint classes {ckpt['classes'][:5]}... "
                             f"({len(ckpt['classes'])}) differ from the data's "
                             f"{self.classes[:5]}... ({len(self.classes)})")
        ck.load_model_state(self.model, ckpt["model"], ckpt["model_full"])

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str, model=None) -> dict:
        model = model if model is not None else self.model
        was_training = model.training
        model.eval()
        loader = self._eval_loader(split)
        cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        extra = torch.zeros(3, dtype=torch.float64)   # top5 hits, clips, skipped files
        amp = self._autocast()
        bar = self._bar(loader, f"eval {split}", len(loader))
        for batch in bar:
            extra[2] += len(batch["bad"])
            if batch["audio"] is None:
                continue
            a = batch["audio"].to(self.device, non_blocking=True)
            v = batch["video"].to(self.device, non_blocking=True)
            y = batch["label"].to(self.device)
            with amp:
                logits = model(a, v)
            logits = logits.float()
            confusion_update(cm, logits.argmax(-1), y)
            k = min(5, self.num_classes)
            topk = logits.topk(k, dim=-1).indices
            extra[0] += float((topk == y.unsqueeze(-1)).any(-1).sum())
            extra[1] += a.shape[0]
        cm = _all_reduce(cm)
        extra = _all_reduce(extra)
        model.train(was_training)
        n_items = int(cm.sum())
        return {"split": split, "acc": accuracy_from_confusion(cm),
                "top5": float(extra[0]) / n_items if n_items else float("nan"),
                "n": n_items, "clips": int(extra[1]), "skipped": int(extra[2]), "confusion": cm}

    # ---------------------------------------------------------------- misc
    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _bar(self, it, desc, total, initial=0):
        if not (self.cfg.progress and self.is_main):
            return it
        from tqdm.auto import tqdm
        return tqdm(it, desc=desc, total=total + initial, initial=initial, dynamic_ncols=True,
                    leave=False, file=sys.stderr)

    def _on_sigterm(self, signum, frame):
        self.stop_signal = signum
        log.warning("received signal %d: will save a checkpoint and stop after this step",
                    signum)

    # ---------------------------------------------------------------- train
    def run(self) -> dict:
        cfg = self.cfg
        if cfg.eval_only:
            return self._run_eval_only()
        t_start = time.time()
        train_ds = self._dataset("train", train=True)
        sampler = ResumableDistributedSampler(train_ds, num_replicas=self.world,
                                              rank=self.rank, seed=cfg.seed, shuffle=True)
        self.steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
        self._build_optimizer(self.steps_per_epoch)

        step, best = 0, -math.inf
        if cfg.resume:
            ckpt = ck.load_checkpoint(cfg.resume)
            self._load_model_from(ckpt)
            if ckpt.get("optimizer") is None:
                raise ValueError(f"resume: {cfg.resume} holds no optimizer state")
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            ck.restore_rng(ckpt["rng"])
            step, best = int(ckpt["step"]), float(ckpt["best"])
            if self.is_main:
                log.info("resumed from %s at step %d", cfg.resume, step)
            self.metrics.write(kind="resume", step=step, path=cfg.resume)
        if self.is_main:
            print(self.model.parameter_summary(print_it=False), file=sys.stderr, flush=True)

        fwd_model = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd_model = DDP(self.model, device_ids=[self.device.index]
                            if self.device.type == "cuda" else None,
                            find_unused_parameters=cfg.find_unused_parameters)
        if cfg.compile:
            fwd_model = torch.compile(fwd_model)
        self.fwd_model = fwd_model

        loader = self._loader(train_ds, sampler)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        old_handler = None
        try:
            old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:      # not the main thread
            pass
        last_good_ckpt = cfg.resume if cfg.resume else None
        status, message = "finished", ""
        epoch = step // self.steps_per_epoch
        max_steps = cfg.max_steps if cfg.max_steps is not None else self.total_steps
        skipped_total = 0
        history = []
        last_saved = step if cfg.resume else -1
        try:
            while epoch < cfg.epochs and step < max_steps and status == "finished":
                skip_batches = step - epoch * self.steps_per_epoch
                sampler.set_epoch(epoch)
                sampler.set_skip(skip_batches * cfg.batch_size)
                self.model.train()
                # loss*clips, correct, items, bad files, clips
                sums = torch.zeros(5, dtype=torch.float64)
                t_epoch = time.time()
                bar = self._bar(loader, f"epoch {epoch + 1}/{cfg.epochs}",
                                self.steps_per_epoch - skip_batches, skip_batches)
                t_last = time.time()
                for batch in bar:
                    sums[3] += len(batch["bad"])
                    empty = batch["audio"] is None
                    flags = _all_reduce(torch.tensor([float(empty),
                                                      float(self.stop_signal is not None)]))
                    if flags[0] > 0:          # some rank has no usable sample: skip step
                        step += 1
                        self.scheduler.step()
                        if step >= max_steps:
                            break
                        continue
                    a = batch["audio"].to(self.device, non_blocking=True)
                    v = batch["video"].to(self.device, non_blocking=True)
                    y = batch["label"].to(self.device, non_blocking=True)
                    targets = one_hot(y, self.num_classes)
                    rng = np.random.default_rng([cfg.seed, step, self.rank])
                    a, targets, lam = audio_mixup(a, targets, alpha=cfg.mixup_alpha,
                                                  prob=cfg.mixup_prob, rng=rng)
                    with self._autocast():
                        logits = fwd_model(a, v)
                    loss = self.loss_fn(logits, targets)
                    red = _all_reduce(torch.stack([loss.detach().double().cpu(),
                                                   torch.tensor(1.0, dtype=torch.float64)]))
                    loss_val = float(red[0] / red[1])
                    if not math.isfinite(loss_val):
                        status = "nonfinite"
                        where = (f"the last good checkpoint is kept at {last_good_ckpt}"
                                 if last_good_ckpt else "no checkpoint had been written yet")
                        message = (f"non-finite loss ({loss_val}) at step {step + 1} (epoch "
                                   f"{epoch + 1}); stopped without applying that update "
                                   f"({step} steps done); {where}")
                        self.metrics.write(kind="error", step=step + 1, epoch=epoch,
                                           message=message)
                        break
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg.clip_grad and cfg.clip_grad > 0:
                        gnorm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.clip_grad))
                    else:
                        gnorm = float("nan")
                    self.optimizer.step()
                    lrs = {g.get("name", str(i)): g["lr"]
                           for i, g in enumerate(self.optimizer.param_groups)}
                    self.scheduler.step()
                    step += 1
                    now = time.time()
                    clips = a.shape[0] * self.world
                    cps = clips / max(now - t_last, 1e-9)
                    t_last = now
                    with torch.no_grad():
                        pred = logits.detach().float().argmax(-1)
                        sums[0] += loss_val * a.shape[0]
                        sums[1] += float((pred == y).sum())
                        sums[2] += y.numel()
                        sums[4] += a.shape[0]
                    self.metrics.write(kind="step", step=step, epoch=epoch, loss=loss_val,
                                       lr=lrs, grad_norm=gnorm, mixup_lam=lam,
                                       clips_per_s=round(cps, 2))
                    history.append(loss_val)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{loss_val:.4f}",
                                        lr=f"{next(iter(lrs.values())):.2e}",
                                        clips_s=f"{cps:.1f}")
                    # under DDP only the all-reduced flag counts (every rank must stop at
                    # the same step); alone, a signal that arrived during the step counts
                    stop_now = flags[1] > 0 if self.world > 1 else self.stop_signal is not None
                    if stop_now:
                        status = "interrupted"
                        last_good_ckpt = self.save("last.pt", step, best)
                        message = (f"stopped by signal after step {step}; checkpoint saved "
                                   f"to {last_good_ckpt}; continue with --resume "
                                   f"{last_good_ckpt}")
                        self.metrics.write(kind="stopped", step=step, reason="signal",
                                           checkpoint=last_good_ckpt)
                        break
                    if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                        last_good_ckpt = self.save("last.pt", step, best)
                        last_saved = step
                    if step >= max_steps:
                        break
                if hasattr(bar, "close"):
                    bar.close()
                if status != "finished":
                    break
                epoch_done = step >= (epoch + 1) * self.steps_per_epoch
                sums = _all_reduce(sums)
                skipped_total += int(sums[3])
                ep = {"kind": "epoch", "epoch": epoch + 1, "step": step,
                      "train_loss": float(sums[0] / sums[4]) if sums[4] else float("nan"),
                      "train_acc": float(sums[1] / sums[2]) if sums[2] else float("nan"),
                      "skipped_files": int(sums[3]), "time_s": round(time.time() - t_epoch, 2),
                      "complete": bool(epoch_done)}
                if epoch_done and cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 \
                        and "val" in self.splits:
                    ev = self.evaluate("val")
                    ep.update(val_acc=ev["acc"], val_top5=ev["top5"],
                              val_skipped=ev["skipped"])
                    self.metrics.write(kind="eval", split="val", epoch=epoch + 1, step=step,
                                       acc=ev["acc"], top5=ev["top5"], n=ev["n"],
                                       skipped_files=ev["skipped"])
                    if ev["acc"] > best:
                        best = ev["acc"]
                        self.save("best.pt", step, best)
                self.metrics.write(**ep)
                history_line = (f"epoch {epoch + 1}/{cfg.epochs}: loss {ep['train_loss']:.4f} "
                                f"train acc {ep['train_acc']:.3f}"
                                + (f" val acc {ep['val_acc']:.3f}" if "val_acc" in ep else "")
                                + f" skipped {ep['skipped_files']} ({ep['time_s']:.1f}s)")
                if self.is_main:
                    print(history_line, file=sys.stderr, flush=True)
                if epoch_done:
                    epoch += 1
                if last_saved != step:
                    last_good_ckpt = self.save("last.pt", step, best)
                    last_saved = step
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGTERM, old_handler)

        result = {"status": status, "message": message, "run_dir": self.run_dir,
                  "steps": step, "epochs_done": epoch, "losses": history,
                  "skipped_train_files": skipped_total,
                  "best_val_acc": best if best > -math.inf else None,
                  "train_wall_s": round(time.time() - t_start, 2)}
        if status == "nonfinite":
            self.metrics.close()
            raise NonFiniteLoss(message)
        if status == "finished" and cfg.final_eval:
            result.update(self._final_eval())
        result["wall_s"] = round(time.time() - t_start, 2)
        self._summary(result)
        self.metrics.close()
        return result

    def _final_eval(self) -> dict:
        best_path = os.path.join(self.ckpt_dir, "best.pt")
        if os.path.isfile(best_path):
            self._load_model_from(ck.load_checkpoint(best_path))
            selected = "best.pt (by validation accuracy)"
        else:
            selected = "last weights (no validation checkpoint)"
        return self._evaluate_splits(selected)

    def _evaluate_splits(self, selected: str) -> dict:
        out = {"selected": selected}
        for split in ("val", "test"):
            if split not in self.splits:
                continue
            ev = self.evaluate(split)
            out[f"{split}_acc"] = ev["acc"]
            out[f"{split}_top5"] = ev["top5"]
            out[f"{split}_n"] = ev["n"]
            out[f"{split}_skipped"] = ev["skipped"]
            self.metrics.write(kind="final_eval", split=split, acc=ev["acc"], top5=ev["top5"],
                               n=ev["n"], skipped_files=ev["skipped"],
                               confusion=ev["confusion"].tolist())
            if self.is_main:
                png = os.path.join(self.run_dir, f"confusion_{split}.png")
                plot_confusion(ev["confusion"], self.classes, png,
                               f"{self.cfg.task} {split}: accuracy {ev['acc']:.3f} "
                               f"({ev['n']} {'segments' if self.cfg.task != 'avar' else 'clips'})")
                out[f"{split}_confusion_png"] = png
        return out

    def _run_eval_only(self) -> dict:
        cfg = self.cfg
        if not cfg.resume:
            raise ValueError("eval_only: pass the checkpoint to evaluate with --resume PATH")
        t0 = time.time()
        self.steps_per_epoch = 1
        ckpt = ck.load_checkpoint(cfg.resume)
        self._load_model_from(ckpt)
        res = {"status": "evaluated", "run_dir": self.run_dir, "checkpoint": cfg.resume,
               "backend": self.model.backend, "steps": int(ckpt["step"])}
        res.update(self._evaluate_splits(f"{cfg.resume} (step {ckpt['step']})"))
        res["wall_s"] = round(time.time() - t0, 2)
        self._summary(res)
        self.metrics.close()
        return res

    def _summary(self, r: dict):
        rows = [("task", self.cfg.task), ("backbone", self.cfg.backbone),
                ("backend", self.model.backend), ("processes", str(self.world)),
                ("status", r.get("status", ""))]
        if "steps" in r:
            rows.append(("optimiser steps", str(r["steps"])))
        if r.get("best_val_acc") is not None:
            rows.append(("best val acc", f"{r['best_val_acc']:.4f}"))
        for split in ("val", "test"):
            if f"{split}_acc" in r:
                rows.append((f"{split} acc (top-1)", f"{r[f'{split}_acc']:.4f}"))
                if self.cfg.task == "avar":
                    rows.append((f"{split} top-5", f"{r[f'{split}_top5']:.4f}"))
                rows.append((f"{split} skipped files", str(r[f"{split}_skipped"])))
        if "skipped_train_files" in r:
            rows.append(("skipped train files", str(r["skipped_train_files"])))
        rows.append(("wall time (s)", f"{r.get('wall_s', 0):.1f}"))
        rows.append(("run folder", self.run_dir))
        table = format_table(rows, "summary")
        r["summary"] = table
        if self.is_main:
            with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
                json.dump({k: v for k, v in r.items() if k not in ("losses", "summary")}, f,
                          indent=2, default=str)
            print(table, flush=True)

    def close(self):
        if self._own_pg and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig) -> dict:
    """Run one training (or evaluation with ``cfg.eval_only``) and return its metrics."""
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t = Trainer(cfg)
        try:
            return t.run()
        finally:
            t.close()
    finally:
        if cfg.threads:
            torch.set_num_threads(old_threads)
