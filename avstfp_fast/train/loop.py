"""The training loop: optimiser, schedule, checkpoints, the step / end-of-epoch /
evaluation functions, and the run folder.

``train(cfg)`` runs one training (or, with ``cfg.eval_only``, one evaluation) and returns
a dict of metrics.  It is what the CLI, ``run_synthetic`` and the tests call.  What is
specific to a data set, a model head or a metric lives in a :class:`~.tasks.Task`
(``tasks.py``); process groups in ``ddp.py``; the loop's state in ``state.py``.

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

import dataclasses
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import checkpoint as ck
from . import ddp
from .config import TrainConfig, check_compile_mode
from .data import ResumableDistributedSampler, ShardSampler
from .metrics import dump_json, dumps_json, format_table
from .preflight import preflight
from .registry import make_task
from .schedule import build_scheduler
from .state import EpochStats, RunState, Status
from .tasks import StepContext

log = logging.getLogger("avstfp_fast.train")

__all__ = ["train", "evaluate", "Trainer", "NonFiniteLoss"]


PROMPT_FILE = "best.prompts.safetensors"


class NonFiniteLoss(RuntimeError):
    pass


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
            self.f.write(dumps_json(rec) + "\n")     # strict JSON: NaN written as null
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if not isinstance(v, torch.Tensor)}


@torch.no_grad()
def evaluate(model, loader, task, ctx: StepContext, bar=lambda it: it) -> dict:
    """One pass of ``model`` over ``loader`` with ``task``'s metrics, summed over the
    processes.  Returns the metrics' ``summary()`` plus ``skipped`` (unreadable files)."""
    was_training = model.training
    model.eval()
    metrics = task.new_metrics()
    counts = torch.zeros(2, dtype=torch.float64)      # skipped files, padded clips
    bad: set = set()
    for batch in bar(loader):
        new = set(batch["bad"]) - bad                 # files, not the items that share them
        bad |= new
        counts[0] += len(new)
        counts[1] += sum(1 for p in batch.get("padded", []) if p)
        if not task.is_empty(batch):
            metrics.update(model, batch, ctx)
    metrics.all_reduce()
    ddp.all_reduce(counts)
    model.train(was_training)
    return {**metrics.summary(), "skipped": int(counts[0]), "padded": int(counts[1])}


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # device, backend, checkpoint and weights: one-line errors before any data work
        self.device = preflight(cfg)
        self._own_pg = ddp.maybe_init(self.device.type)
        self.rank, self.world = ddp.info()
        self.device = ddp.local_device(self.device, self.rank)
        self.is_main = self.rank == 0
        self.stop_signal = None

        run_dir = cfg.out or os.path.join("runs", f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        self.run_dir = ddp.broadcast_object(run_dir)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        if self.is_main:
            os.makedirs(self.ckpt_dir, exist_ok=True)
        ddp.barrier()
        try:
            self._setup()
        except NonFiniteLoss:
            raise
        except Exception as e:
            self.write_error(e)
            ddp.destroy(self._own_pg)
            raise

    def _setup(self):
        cfg = self.cfg

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)

        self.task = make_task(cfg)
        # a checkpoint to evaluate or resume: what the task stored in it (AVQA: vocabulary
        # and answers) rebuilds the same model, whatever the order of the data files
        self.resume_ckpt = ck.load_checkpoint(cfg.resume) if cfg.resume else None
        if self.resume_ckpt is not None:
            self.task.restore(self.resume_ckpt.get("task_state"), resuming=not cfg.eval_only)
        data = self.task.prepare_data(self.run_dir, self.rank)
        self.classes, self.splits = data.classes, data.splits
        # the run records the data root the task resolved (a synthetic task's generated
        # folder), so that evaluating or resuming its checkpoints reads the same files
        self.cfg = cfg = dataclasses.replace(cfg, data_root=data.data_root)
        self.num_classes = len(self.classes)
        if self.is_main:
            dump_json({**cfg.to_dict(), "classes": self.classes, "world_size": self.world,
                       "device": str(self.device)}, os.path.join(self.run_dir, "config.json"),
                      indent=2)
        self.metrics = _JsonlWriter(os.path.join(self.run_dir, "metrics.jsonl"), self.is_main)

        torch.manual_seed(cfg.seed)          # model init independent of data generation
        self.model = self.task.build_model(self.num_classes).to(self.device)
        self.fwd_model = self.model
        # random towers are not reproducible from a name: save the full state then
        self.full_state = bool(cfg.model.full_finetune or cfg.pretrained is None)
        self.image_size = self.model.image_size

        self.optimizer = None
        self.scheduler = None
        self.steps_per_epoch = 1
        self._eval_loaders = {}
        self._bad_train: set = set()          # unreadable training files seen so far

    # ---------------------------------------------------------------- data
    def _loader(self, ds, sampler) -> DataLoader:
        cfg = self.cfg
        nw = cfg.num_workers
        return DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=nw,
                          collate_fn=self.task.collate, pin_memory=self.device.type == "cuda",
                          persistent_workers=nw > 0, drop_last=False,
                          generator=torch.Generator().manual_seed(cfg.seed),
                          worker_init_fn=_worker_init if nw > 0 else None,
                          prefetch_factor=2 if nw > 0 else None)

    def _eval_loader(self, split: str):
        if split not in self._eval_loaders:     # kept: workers (and caches) persist
            ds = self.task.dataset(split, train=False, image_size=self.image_size)
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
                "config": self.cfg.to_dict(), "classes": list(self.classes),
                "task_state": self.task.checkpoint_state()}

    def save(self, name: str, step: int, best: float) -> str:
        path = os.path.join(self.ckpt_dir, name)
        if self.is_main:
            ck.atomic_save(self._ckpt_payload(step, best), path)
            if name == "best.pt":
                self.save_prompt_file()
        ddp.barrier()
        return path

    def save_prompt_file(self) -> str | None:
        """The shareable part of the model beside best.pt (``best.prompts.safetensors``):
        prompts, gates and head (with its buffers, and whatever the model class records
        to be rebuilt, e.g. an AVQA model's head settings, vocabulary and answers) --
        everything when the tower is fine-tuned or random."""
        if not hasattr(self.model, "save_prompts"):
            return None
        cfg = self.cfg
        path = os.path.join(self.ckpt_dir, PROMPT_FILE)
        self.model.save_prompts(path, include_backbone=self.full_state, backbone=cfg.backbone,
                                pretrained=cfg.pretrained, classes=self.classes,
                                trainer_task=cfg.task,
                                inputs={"segments": cfg.segments,
                                        "clip_seconds": cfg.clip_seconds,
                                        "sample_rate": cfg.sample_rate,
                                        "image_size": self.image_size,
                                        **self.task.prompt_file_inputs()})
        return path

    def _load_model_from(self, ckpt: dict):
        saved, have = list(ckpt["classes"]), list(self.classes)
        if saved != have:
            new, gone = [c for c in have if c not in saved], [c for c in saved if c not in have]
            what = (f"the data has {new[:5]} not in the checkpoint" if new else "") + \
                ("; " if new and gone else "") + \
                (f"the checkpoint has {gone[:5]} not in the data" if gone else "")
            raise ValueError(f"resume: checkpoint classes ({len(saved)}) differ from the "
                             f"data's ({len(have)}): {what or 'same classes, other order'}")
        ck.load_model_state(self.model, ckpt["model"], ckpt["model_full"])

    # ---------------------------------------------------------------- misc
    def _autocast(self):
        if self.cfg.amp and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _ctx(self, rng=None) -> StepContext:
        return StepContext(device=self.device, autocast=self._autocast, rng=rng)

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

    @contextmanager
    def _sigterm_handler(self):
        try:
            old = signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:      # not the main thread
            old = None
        try:
            yield
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, split: str, model=None) -> dict:
        loader = self._eval_loader(split)
        res = evaluate(model if model is not None else self.model, loader, self.task,
                       self._ctx(), bar=lambda it: self._bar(it, f"eval {split}", len(loader)))
        return {"split": split, **res}

    def _evaluate_splits(self, selected: str) -> dict:
        """Final evaluation of val and test: result keys ``<split>_<metric>``, a
        ``final_eval`` record each, and the task's figures."""
        out = {"selected": selected}
        for split in ("val", "test"):
            if split not in self.splits:
                continue
            ev = self.evaluate(split)
            metrics = {k: v for k, v in ev.items() if k not in ("split", "skipped")}
            out.update({f"{split}_{k}": v for k, v in _scalars(metrics).items()})
            if ev["padded"]:
                log.warning("%s: %d clips read beyond the end of their media (padding: "
                            "repeated last frame, silence)", split, ev["padded"])
            out[f"{split}_skipped"] = ev["skipped"]
            info = self.task.split_info(split)
            out.update({f"{split}_{k}": v for k, v in info.items()})
            metrics.update(info)
            self.metrics.write(kind="final_eval", split=split, **_scalars(metrics),
                               skipped_files=ev["skipped"],
                               **{k: v.tolist() for k, v in metrics.items()
                                  if isinstance(v, torch.Tensor)})
            if self.is_main:
                for name, path in self.task.figures(metrics, self.run_dir, split).items():
                    out[f"{split}_{name}"] = path
        return out

    # ---------------------------------------------------------------- training
    def train_step(self, batch: dict, state: RunState):
        """One optimiser step on ``batch``.  Returns ``(loss, lrs, grad_norm, output)``,
        or None after a non-finite loss (the update is not applied; ``state`` says why)."""
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, state.step, self.rank])
        out = self.task.train_loss(self.fwd_model, batch, self._ctx(rng))
        red = ddp.all_reduce(torch.stack([out.loss.detach().double().cpu(),
                                          torch.tensor(1.0, dtype=torch.float64)]))
        loss_val = float(red[0] / red[1])
        if not math.isfinite(loss_val):
            where = (f"the last good checkpoint is kept at {state.last_good_ckpt}"
                     if state.last_good_ckpt else "no checkpoint had been written yet")
            state.stop(Status.NONFINITE,
                       f"non-finite loss ({loss_val}) at step {state.step + 1} (epoch "
                       f"{state.epoch + 1}); stopped without applying that update "
                       f"({state.step} steps done); {where}")
            self.metrics.write(kind="error", step=state.step + 1, epoch=state.epoch,
                               message=state.message)
            return None
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.clip_grad and cfg.clip_grad > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip_grad))
        else:
            gnorm = float("nan")
        self.optimizer.step()
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}
        self.scheduler.step()
        state.step += 1
        return loss_val, lrs, gnorm, out

    def train_epoch(self, state: RunState, loader, sampler, max_steps: int) -> EpochStats:
        """The steps of epoch ``state.epoch`` from ``state.step`` on (a resumed epoch skips
        the batches already done), until the epoch ends, ``max_steps``, a signal or a
        non-finite loss.  Returns this process's statistics."""
        cfg = self.cfg
        skip_batches = state.step - state.epoch * self.steps_per_epoch
        sampler.set_epoch(state.epoch)
        sampler.set_skip(skip_batches * cfg.batch_size)
        self.model.train()
        stats = EpochStats()
        bar = self._bar(loader, f"epoch {state.epoch + 1}/{cfg.epochs}",
                        self.steps_per_epoch - skip_batches, skip_batches)
        t_last = time.time()
        epoch_bad: set = set()
        for batch in bar:
            new = set(batch["bad"]) - epoch_bad       # files (AVQA questions share videos)
            epoch_bad |= new
            self._bad_train |= new
            stats.bad_files += len(new)
            flags = ddp.all_reduce(torch.tensor([float(self.task.is_empty(batch)),
                                                 float(self.stop_signal is not None)]))
            if flags[0] > 0:          # some rank has no usable sample: skip the step
                state.step += 1
                self.scheduler.step()
                if state.step >= max_steps:
                    break
                continue
            done = self.train_step(batch, state)
            if done is None:
                break
            loss_val, lrs, gnorm, out = done
            now = time.time()
            cps = out.clips * self.world / max(now - t_last, 1e-9)
            t_last = now
            stats.add_step(loss_val, out.clips, out.correct, out.items)
            self.metrics.write(kind="step", step=state.step, epoch=state.epoch, loss=loss_val,
                               lr=lrs, grad_norm=gnorm, **out.log, clips_per_s=round(cps, 2))
            state.losses.append(loss_val)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{next(iter(lrs.values())):.2e}",
                                clips_s=f"{cps:.1f}")
            # under DDP only the all-reduced flag counts (every rank must stop at the same
            # step); alone, a signal that arrived during the step counts
            if (flags[1] > 0) if self.world > 1 else (self.stop_signal is not None):
                state.last_good_ckpt = self.save("last.pt", state.step, state.best)
                state.stop(Status.INTERRUPTED,
                           f"stopped by signal after step {state.step}; checkpoint saved to "
                           f"{state.last_good_ckpt}; continue with --resume "
                           f"{state.last_good_ckpt}")
                self.metrics.write(kind="stopped", step=state.step, reason="signal",
                                   checkpoint=state.last_good_ckpt)
                break
            if cfg.ckpt_every and state.step % cfg.ckpt_every == 0:
                state.last_good_ckpt = self.save("last.pt", state.step, state.best)
                state.last_saved = state.step
            if state.step >= max_steps:
                break
        if hasattr(bar, "close"):
            bar.close()
        return stats

    def end_epoch(self, state: RunState, stats: EpochStats, t_epoch: float) -> None:
        """Sum the epoch's statistics over processes, validate (at the end of a complete
        epoch, every ``eval_every``), keep ``best.pt``, log, and save ``last.pt``."""
        cfg = self.cfg
        epoch_done = state.step >= (state.epoch + 1) * self.steps_per_epoch
        stats = stats.all_reduce()
        state.skipped_files = int(ddp.all_reduce(torch.tensor([float(len(self._bad_train))],
                                                               dtype=torch.float64))[0])
        ep = {"kind": "epoch", "epoch": state.epoch + 1, "step": state.step,
              "train_loss": stats.train_loss, "train_acc": stats.train_acc,
              "skipped_files": int(stats.bad_files), "time_s": round(time.time() - t_epoch, 2),
              "complete": bool(epoch_done)}
        if epoch_done and cfg.eval_every and (state.epoch + 1) % cfg.eval_every == 0 \
                and "val" in self.splits:
            ev = self.evaluate("val")
            scalars = {k: v for k, v in _scalars(ev).items()
                       if k not in ("split", "skipped", "padded")}
            ep.update({f"val_{k}": v for k, v in scalars.items() if k != "n"},
                      val_skipped=ev["skipped"])
            self.metrics.write(kind="eval", split="val", epoch=state.epoch + 1,
                               step=state.step, **scalars, skipped_files=ev["skipped"])
            if ev["acc"] > state.best:
                state.best = ev["acc"]
                self.save("best.pt", state.step, state.best)
        self.metrics.write(**ep)
        if self.is_main:
            print(f"epoch {state.epoch + 1}/{cfg.epochs}: loss {ep['train_loss']:.4f} "
                  f"train acc {ep['train_acc']:.3f}"
                  + (f" val acc {ep['val_acc']:.3f}" if "val_acc" in ep else "")
                  + f" skipped {ep['skipped_files']} ({ep['time_s']:.1f}s)",
                  file=sys.stderr, flush=True)
        if epoch_done:
            state.epoch += 1
        if state.last_saved != state.step:
            state.last_good_ckpt = self.save("last.pt", state.step, state.best)
            state.last_saved = state.step

    def _resume(self, state: RunState) -> None:
        cfg = self.cfg
        ckpt = self.resume_ckpt
        self._load_model_from(ckpt)
        if ckpt.get("optimizer") is None:
            raise ValueError(f"resume: {cfg.resume} holds no optimizer state")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._stretch_schedule(int(ckpt["step"]))
        ck.restore_rng(ckpt["rng"])
        state.step, state.best = int(ckpt["step"]), float(ckpt["best"])
        state.last_good_ckpt, state.last_saved = cfg.resume, state.step
        if self.is_main:
            log.info("resumed from %s at step %d", cfg.resume, state.step)
        self.metrics.write(kind="resume", step=state.step, path=cfg.resume)

    def _stretch_schedule(self, step: int) -> None:
        """Resuming with another length (``--epochs``, ``--warmup-epochs``, batch size):
        the checkpoint's scheduler spans its own run; continue instead on the warm-up +
        cosine schedule of THIS run's length (documented choice: the schedule is
        stretched, so added epochs train at the learning rates the longer run has there,
        not at the old run's floor)."""
        lams = self.scheduler.lr_lambdas
        old = {(lam.warmup_steps, lam.total_steps) for lam in lams if hasattr(lam, "total_steps")}
        new = (self.warmup_steps, self.total_steps)
        if not old or old == {new}:
            return
        for lam in lams:
            lam.warmup_steps, lam.total_steps = new
        last = self.scheduler.last_epoch
        for g, base, lam in zip(self.optimizer.param_groups, self.scheduler.base_lrs, lams):
            g["lr"] = base * lam(last)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        (ow, ot), = sorted(old)[:1]
        msg = (f"resume: the checkpoint's schedule spans {ot} steps (warm-up {ow}), this run "
               f"{self.total_steps} (warm-up {self.warmup_steps}, {self.cfg.epochs} epochs): "
               f"continuing on the schedule stretched to {self.total_steps} steps; learning "
               f"rate at step {step}: "
               + ", ".join(f"{g.get('name', i)} {g['lr']:.3g}"
                           for i, g in enumerate(self.optimizer.param_groups)))
        if self.is_main:
            print(msg, file=sys.stderr, flush=True)
        self.metrics.write(kind="schedule_stretched", step=step, old_total_steps=ot,
                           old_warmup_steps=ow, total_steps=self.total_steps,
                           warmup_steps=self.warmup_steps)

    def write_error(self, e: BaseException) -> None:
        """A failed run leaves an ``error`` record (metrics.jsonl and summary.json)."""
        if not self.is_main:
            return
        msg = str(e).strip().splitlines()
        rec = {"status": "error", "error_type": type(e).__name__,
               "message": msg[0] if msg else type(e).__name__}
        try:
            with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(dumps_json({"kind": "error", **rec, "time": round(time.time(), 3)}) + "\n")
            dump_json({**rec, "run_dir": self.run_dir, "task": self.cfg.task},
                      os.path.join(self.run_dir, "summary.json"), indent=2)
        except OSError:
            pass

    def run(self) -> dict:
        return self._run_eval_only() if self.cfg.eval_only else self.fit()

    def fit(self) -> dict:
        cfg = self.cfg
        t_start = time.time()
        train_ds = self.task.dataset("train", train=True, image_size=self.image_size)
        sampler = ResumableDistributedSampler(train_ds, num_replicas=self.world,
                                              rank=self.rank, seed=cfg.seed, shuffle=True)
        self.steps_per_epoch = math.ceil(len(sampler) / cfg.batch_size)
        self._build_optimizer(self.steps_per_epoch)
        state = RunState()
        if cfg.resume:
            self._resume(state)
        if self.is_main:
            print(self.model.parameter_summary(print_it=False), file=sys.stderr, flush=True)
        self.fwd_model = ddp.wrap(self.model, self.device, cfg.find_unused_parameters)
        if cfg.compile:
            check_compile_mode(cfg.compile_mode, self.device)
            self.fwd_model = torch.compile(self.fwd_model, mode=cfg.compile_mode)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        loader = self._loader(train_ds, sampler)
        state.epoch = state.step // self.steps_per_epoch
        max_steps = cfg.max_steps if cfg.max_steps is not None else self.total_steps
        with self._sigterm_handler():
            while state.epoch < cfg.epochs and state.step < max_steps and state.running:
                t_epoch = time.time()
                stats = self.train_epoch(state, loader, sampler, max_steps)
                if state.running:
                    self.end_epoch(state, stats, t_epoch)

        result = {"status": state.status.value, "message": state.message,
                  "run_dir": self.run_dir, "steps": state.step, "epochs_done": state.epoch,
                  "losses": state.losses, "skipped_train_files": state.skipped_files,
                  "best_val_acc": state.best if state.best > -math.inf else None,
                  "train_wall_s": round(time.time() - t_start, 2)}
        if state.status is Status.NONFINITE:
            self.metrics.close()
            raise NonFiniteLoss(state.message)
        if state.status is Status.FINISHED and cfg.final_eval:
            result.update(self._final_eval())
        prompts = os.path.join(self.ckpt_dir, PROMPT_FILE)
        if os.path.isfile(prompts):
            what = ("everything (the tower is " + ("fine-tuned" if cfg.model.full_finetune
                                                   else "random") + ")"
                    if self.full_state else "prompts, gates and head")
            result.update(prompt_file=prompts, prompt_file_contents=what)
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

    def _run_eval_only(self) -> dict:
        cfg = self.cfg
        if not cfg.resume:
            raise ValueError("eval_only: pass the checkpoint to evaluate with --resume PATH")
        t0 = time.time()
        self.steps_per_epoch = 1
        ckpt = self.resume_ckpt
        self._load_model_from(ckpt)
        res = {"status": Status.EVALUATED.value, "run_dir": self.run_dir,
               "checkpoint": cfg.resume, "backend": self.model.backend,
               "steps": int(ckpt["step"])}
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
                rows += self.task.summary_rows(r, split)
                rows.append((f"{split} skipped files", str(r[f"{split}_skipped"])))
                if r.get(f"{split}_padded"):
                    rows.append((f"{split} clips with padding", str(r[f"{split}_padded"])))
        if "skipped_train_files" in r:
            rows.append(("skipped train files", str(r["skipped_train_files"])))
        if r.get("prompt_file"):
            rows += [("prompt file", r["prompt_file"]),
                     ("prompt file holds", r["prompt_file_contents"])]
        rows.append(("wall time (s)", f"{r.get('wall_s', 0):.1f}"))
        rows.append(("run folder", self.run_dir))
        table = format_table(rows, "summary")
        r["summary"] = table
        if self.is_main:
            dump_json({k: v for k, v in r.items() if k not in ("losses", "summary")},
                      os.path.join(self.run_dir, "summary.json"), indent=2)
            print(table, flush=True)

    def close(self):
        ddp.destroy(self._own_pg)


def train(cfg: TrainConfig) -> dict:
    """Run one training (or evaluation with ``cfg.eval_only``) and return its metrics."""
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        t = Trainer(cfg)
        try:
            return t.run()
        except NonFiniteLoss:
            raise                      # its error record is written at the failing step
        except Exception as e:
            t.write_error(e)
            raise
        finally:
            t.close()
    finally:
        if cfg.threads:
            torch.set_num_threads(old_threads)
