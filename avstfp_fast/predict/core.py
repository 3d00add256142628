"""Apply a trained model to video files: loading, finding videos, batched inference,
per-second probabilities, event segments, top-k, and evaluation on an annotated split."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import torch

log = logging.getLogger("avstfp_fast.predict")

__all__ = ["LoadedModel", "load_model", "find_videos", "event_segments", "Predictor",
           "VIDEO_EXTENSIONS", "BACKGROUND"]

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
BACKGROUND = "background"


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference and what its inputs and outputs mean."""
    model: torch.nn.Module
    classes: list
    head: str                  # "ave" (per-second logits) or "avar" (per clip)
    trainer_task: str          # the trainer's task (ave, synthetic, avar, ...)
    segments: int = 10
    clip_seconds: float = 10.0
    sample_rate: int = 16000
    source: str = ""
    kind: str = ""             # "prompt file" or "checkpoint"

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def background(self) -> Optional[int]:
        return self.classes.index(BACKGROUND) if BACKGROUND in self.classes else None

    def task(self):
        """The trainer's Task for this model (its metrics are the trainer's)."""
        from ..train.config import TrainConfig
        from ..train.registry import TASKS, make_task
        name = self.trainer_task if self.trainer_task in TASKS else self.head
        return make_task(TrainConfig(task=name, segments=self.segments,
                                     clip_seconds=self.clip_seconds,
                                     sample_rate=self.sample_rate), classes=self.classes)


def _is_checkpoint(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:2] == b"PK"        # torch.save writes a zip archive


def load_model(path: str, *, backbone=None, pretrained: Optional[str] = None,
               backend: str = "auto", device=None) -> LoadedModel:
    """A prompt file (``.safetensors``) or a trainer checkpoint (``.pt``) as a model.

    ``backbone`` / ``pretrained`` override where the frozen tower comes from (a
    checkpoint records the training run's values; a prompt file its backbone name)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model: no such file: {path}")
    if _is_checkpoint(path):
        return _from_checkpoint(path, backbone, pretrained, backend, device)
    from ..models.prompt_file import read_prompt_file
    from ..models.prompted_clip import PromptedCLIP
    kind = read_prompt_file(path).model_class
    if kind != PromptedCLIP.prompt_file_kind:
        raise ValueError(f"model: {path} holds a {kind} model; load_model runs the "
                         f"AVE/AVAR classification models only (AVQA: avstfp-predict "
                         f"MODEL --questions avqa-test.json, or {kind}.from_prompts; see "
                         f"docs/avqa.md)")
    model = PromptedCLIP.from_prompts(path, backbone=backbone, pretrained=pretrained,
                                      backend=backend, device=device)
    meta = model.prompt_metadata
    import json
    cfg = model.config
    classes = json.loads(meta["classes"]) if "classes" in meta else \
        [f"class_{i}" for i in range(cfg.num_classes or 0)]
    inputs = json.loads(meta.get("inputs", "{}"))
    if cfg.task is None:
        raise ValueError(f"model: {path} has no classification head (task=None)")
    return LoadedModel(model.eval(), classes, cfg.task, meta.get("trainer_task", cfg.task),
                       segments=inputs.get("segments", 10),
                       clip_seconds=inputs.get("clip_seconds", 10.0),
                       sample_rate=inputs.get("sample_rate", 16000), source=path,
                       kind="prompt file")


def _is_open_clip_tag(name: str, tag: str) -> bool:
    try:
        import open_clip
        return tag.lower().replace("-", "_") in open_clip.list_pretrained_tags_by_model(name)
    except Exception:
        return False


def _checkpoint_config(ckpt: dict, backend: str, backbone=None, pretrained=None):
    """The TrainConfig a trainer checkpoint's model is rebuilt from: the run's, with the
    inference ``backend`` and the tower overrides; no tower weights to read when the
    checkpoint holds every weight."""
    from ..train.config import TrainConfig
    cfg = TrainConfig.from_dict(ckpt["config"])
    cfg.backend = backend
    if backbone is not None:
        cfg.backbone = backbone
    if pretrained is not None:
        cfg.pretrained = pretrained
    if ckpt["model_full"]:
        cfg.pretrained = None
    return cfg


def _from_checkpoint(path, backbone, pretrained, backend, device) -> LoadedModel:
    from ..train import checkpoint as ck
    from ..train.registry import make_task
    from ..train.tasks import build_model
    ckpt = ck.load_checkpoint(path)
    cfg = _checkpoint_config(ckpt, backend, backbone, pretrained)
    if cfg.pretrained is not None and not os.path.isfile(cfg.pretrained) \
            and not _is_open_clip_tag(cfg.backbone, cfg.pretrained):
        raise FileNotFoundError(f"pretrained: the checkpoint's tower weights "
                                f"{cfg.pretrained!r} are not here; pass --pretrained FILE")
    classes = list(ckpt["classes"])
    task = make_task(cfg)
    if task.head is None:
        raise ValueError(f"model: {path} is a checkpoint of task {cfg.task!r}; load_model "
                         f"runs the AVE/AVAR classification models only (AVQA: avstfp-predict "
                         f"MODEL --questions avqa-test.json; docs/avqa.md)")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task.head, len(classes))
    ck.load_model_state(model, ckpt["model"], ckpt["model_full"])
    if device is not None:
        model = model.to(device)
    return LoadedModel(model.eval(), classes, task.head, cfg.task, segments=cfg.segments,
                       clip_seconds=cfg.clip_seconds, sample_rate=cfg.sample_rate,
                       source=path, kind="checkpoint")


def find_videos(inputs: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders (recursively, sorted) into video paths.

    Returns ``(videos, problems)``; ``problems`` lists ``(input, reason)`` for missing
    paths and folders without videos."""
    videos, problems, seen = [], [], set()
    for inp in inputs:
        inp = os.fspath(inp)
        if os.path.isdir(inp):
            found = []
            for dirpath, dirnames, filenames in os.walk(inp):
                dirnames.sort()
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.lower().endswith(VIDEO_EXTENSIONS) and not f.startswith(".")]
            if not found:
                problems.append((inp, f"folder holds no videos ({', '.join(VIDEO_EXTENSIONS)})"))
            new = [f for f in found if f not in seen]
        elif os.path.isfile(inp):
            new = [inp] if inp not in seen else []
        else:
            problems.append((inp, "no such file or folder"))
            new = []
        seen.update(new)
        videos += new
    return videos, problems


def event_segments(probs: torch.Tensor, classes: list, seconds_per_segment: float = 1.0,
                   background: Optional[int] = None) -> list[dict]:
    """Runs of equal per-second predictions, background excluded: ``start``/``end`` in
    seconds, ``class``, ``confidence`` (mean probability of that class over the run)."""
    pred = probs.argmax(-1).tolist()
    out, s = [], 0
    while s < len(pred):
        e = s
        while e + 1 < len(pred) and pred[e + 1] == pred[s]:
            e += 1
        c = pred[s]
        if c != background:
            out.append({"start": round(s * seconds_per_segment, 6),
                        "end": round((e + 1) * seconds_per_segment, 6),
                        "class": classes[c],
                        "confidence": round(float(probs[s:e + 1, c].mean()), 6)})
        s = e + 1
    return out


class _Recorder(torch.nn.Module):
    """Calls the model and keeps its last output (so the trainer's metrics and the
    predictions come from one forward pass)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.last = None

    def forward(self, *args):
        self.last = self.model(*args)
        return self.last


class Predictor:
    """Batched inference over files with the trainer's data pipeline (PyAV decode, the
    front end, no augmentation)."""

    def __init__(self, lm: LoadedModel, *, batch_size: int = 8, device=None,
                 amp: bool = True, compile: bool = False, num_workers: int = 0,
                 top_k: int = 5, progress: bool = True, short_media: str = "mark"):
        if short_media not in ("mark", "skip"):
            raise ValueError(f"short_media: expected 'mark' or 'skip', got {short_media!r}")
        self.short_media = short_media
        self.lm = lm
        self.device = torch.device(device) if device else next(lm.model.parameters()).device
        lm.model.to(self.device).eval()
        self.batch_size, self.num_workers = batch_size, num_workers
        self.top_k, self.progress = top_k, progress
        self.amp = amp and self.device.type == "cuda"
        fwd = (torch.compile(lm.model, mode=compile if isinstance(compile, str) else None)
               if compile else lm.model)          # compile: True, or a torch.compile mode
        self.forward = _Recorder(fwd)

    def _autocast(self):
        if self.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _loader(self, items):
        from torch.utils.data import DataLoader

        from ..train.data import ClipDataset, PreparedClipDataset, collate_skip_bad
        lm = self.lm
        # ids are positions in ``items``; unlabelled items get a dummy label
        indexed = [(path, 0 if label is None else label, i)
                   for i, (path, label, _) in enumerate(items)]
        # prepared clips (avstfp-prepare: a ClipRef in place of the path) are read;
        # skipped files are reported by the caller (once each), not warned about here
        prepared = any(hasattr(it[0], "members") for it in items)
        ds = (PreparedClipDataset.from_items if prepared else ClipDataset)(
            indexed, image_size=lm.image_size, segments=lm.segments,
            clip_seconds=lm.clip_seconds, sample_rate=lm.sample_rate,
            short=self.short_media, warn_bad=False)

        def collate(samples):
            batch = collate_skip_bad(samples)
            batch["reasons"] = [s["reason"] for s in samples if "bad" in s]
            return batch
        return DataLoader(ds, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate)

    @torch.no_grad()
    def run(self, items: list, on_result: Callable[[dict], None], metrics=None) -> dict:
        """Predict every item ``(path, label or None, id)``; ``on_result`` receives one
        dict per readable video.  With ``metrics`` (a trainer Metrics object), items
        carry labels and the metrics are updated from the same forward pass.
        Returns ``{"done", "skipped": [(path, reason)], "clips_per_s", "wall_s"}``."""
        from ..train.tasks import StepContext
        loader = self._loader(items)
        ctx = StepContext(device=self.device, autocast=self._autocast)
        skipped, done = [], 0
        bar = loader
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True,
                       file=sys.stderr)
        t0 = time.time()
        t_first, n_first = None, 0    # speed is measured after the first batch (warm-up,
        for batch in bar:             # torch.compile's compilation)
            skipped += [(str(p), r) for p, r in zip(batch["bad"], batch["reasons"])]
            if batch["audio"] is None:
                continue
            if metrics is not None:
                metrics.update(self.forward, batch, ctx)
            else:
                a = batch["audio"].to(self.device, non_blocking=True)
                v = batch["video"].to(self.device, non_blocking=True)
                with ctx.autocast():
                    self.forward(a, v)
            probs = self.forward.last.float().softmax(-1).cpu()
            for row, i in enumerate(batch["id"]):
                path, label, vid = items[i]
                video = getattr(path, "source", path)      # prepared: its source file
                on_result({"video": video, **self._result(
                    vid, probs[row], label, batch["padded"][row],
                    batch["media_seconds"][row])})
            done += len(batch["id"])
            if t_first is None:
                t_first, n_first = time.time(), done
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(clips_s=f"{self._speed(done, t0, t_first, n_first):.3g}",
                                skipped=len(skipped))
        if hasattr(bar, "close"):
            bar.close()
        wall = time.time() - t0
        return {"done": done, "skipped": skipped, "wall_s": round(wall, 3),
                "clips_per_s": self._speed(done, t0, t_first, n_first) if done else None}

    @staticmethod
    def _speed(done, t0, t_first, n_first) -> float:
        """Clips per second after the first batch (which pays for warm-up and
        torch.compile); over the whole run when there was only one batch."""
        now = time.time()
        if t_first is not None and done > n_first and now > t_first:
            return round((done - n_first) / (now - t_first), 4)
        return round(done / max(now - t0, 1e-9), 4)

    def _result(self, vid, probs: torch.Tensor, label, padded=(), media=None) -> dict:
        lm = self.lm
        sps = lm.clip_seconds / lm.segments
        out = {"id": vid, "task": lm.head, "classes": list(lm.classes),
               "segments": lm.segments, "seconds_per_segment": sps,
               # seconds the file does not cover (repeated last frame, silence): their
               # predictions are not about the media
               "padded_seconds": [round(s * sps, 6) for s in padded],
               "media_seconds": media if padded else lm.clip_seconds}
        if label is not None and lm.head == "avar":
            out["label"] = lm.classes[int(label)]
        if lm.head == "avar":
            k = min(self.top_k, len(lm.classes))
            p, idx = probs.topk(k)
            out["top_k"] = [{"class": lm.classes[int(i)], "probability": round(float(q), 6)}
                            for q, i in zip(p, idx)]
            out["probabilities"] = [round(float(q), 6) for q in probs]
            return out
        out["probabilities"] = [[round(float(q), 6) for q in row] for row in probs]
        out["predicted"] = [lm.classes[int(i)] for i in probs.argmax(-1)]
        out["events"] = event_segments(probs, lm.classes, sps, lm.background)
        pad = set(out["padded_seconds"])
        for ev in out["events"]:
            ev["padded"] = any(ev["start"] <= t < ev["end"] for t in pad)
        if label is not None:
            truth = [int(x) for x in label]
            out["ground_truth"] = [lm.classes[c] for c in truth]
            out["ground_truth_events"] = event_segments(
                torch.nn.functional.one_hot(torch.tensor(truth), len(lm.classes)).float(),
                lm.classes, sps, lm.background)
            hits = sum(int(p == t) for p, t in zip(probs.argmax(-1).tolist(), truth))
            out["segment_accuracy"] = hits / len(truth)
        return out
