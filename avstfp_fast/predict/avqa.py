"""``avstfp-predict`` for AVQA models: answer the questions of a MUSIC-AVQA JSON file.

``avstfp-predict MODEL --questions avqa-test.json [--video-dir DIR] --out answers``
with MODEL an AVQA prompt file (``best.prompts.safetensors`` of an avqa run) or an AVQA
trainer checkpoint.  The model's own vocabulary and answers are used (words it does not
know read as ``<unk>``; questions whose true answer it does not know are counted as
``unseen_answers`` and scored wrong).  Videos are ``<video-dir>/<video_id>.mp4``
(default: ``videos/`` beside the JSON file, or beside its ``json/`` folder).

Writes ``answers.json`` (one record per question: id, video, question, type, answer,
true answer, correct), ``answers.csv`` (the same rows), ``run.json`` (model, counts,
per-type accuracy, unseen answers, skipped videos) and prints the per-type table.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time

import torch

__all__ = ["load_avqa_model", "answer_questions", "default_video_dir"]

CSV_FIELDS = ["question_id", "video_id", "type", "question", "answer", "true_answer",
              "correct"]


def default_video_dir(questions: str) -> str:
    folder = os.path.dirname(os.path.abspath(questions))
    for cand in (os.path.join(folder, "videos"),
                 os.path.join(os.path.dirname(folder), "videos"),
                 os.path.join(os.path.dirname(os.path.dirname(folder)), "videos")):
        if os.path.isdir(cand):
            return cand
    return os.path.join(folder, "videos")


def load_avqa_model(path: str, *, pretrained=None, backend="auto", device=None):
    """(model, inputs) of an AVQA prompt file or trainer checkpoint; ``inputs``: segments,
    sample_rate, avqa_hop, question_len."""
    from ..models.avqa import PromptedCLIPAVQA
    from .core import _checkpoint_config, _is_checkpoint
    if not _is_checkpoint(path):
        model = PromptedCLIPAVQA.from_prompts(path, pretrained=pretrained, backend=backend,
                                              device=device)
        inputs = json.loads(model.prompt_metadata.get("inputs", "{}"))
    else:
        from ..train import checkpoint as ck
        from ..train.registry import make_task
        ckpt = ck.load_checkpoint(path)
        cfg = _checkpoint_config(ckpt, backend, pretrained=pretrained)
        st = ckpt.get("task_state") or {}
        if "vocabulary" not in st or "answers" not in st:
            raise ValueError(f"model: {path} stores no AVQA vocabulary (written by an older "
                             f"version); use its prompt file best.prompts.safetensors")
        task = make_task(cfg)
        task.restore(st, resuming=False)      # the task takes the model's vocabulary
        torch.manual_seed(cfg.seed)
        model = task.build_model(task.num_classes)
        ck.load_model_state(model, ckpt["model"], ckpt["model_full"])
        if device is not None:
            model = model.to(device)
        inputs = {"segments": cfg.segments, "sample_rate": cfg.sample_rate,
                  "avqa_hop": cfg.avqa_hop, "question_len": cfg.question_len}
    return model.eval(), inputs


def _items(model, questions: str, video_dir: str, max_len: int):
    from ..train.avqa_data import QTYPES, Vocabulary, read_avqa_json
    rows, bad = read_avqa_json(questions)
    vocab = Vocabulary(model.vocabulary[2:])
    index = {a: i for i, a in enumerate(model.answers)}
    items, meta = [], {}
    L = max(max_len, max((len(r.words) for r in rows), default=1))
    for r in rows:
        ids = vocab.encode(r.words, L, f"{questions}: question {r.question_id}: ")
        items.append((os.path.join(video_dir, r.video_id + ".mp4"), index.get(r.answer, -1),
                      r.video_id, ids, r.qtype, r.question_id))
        kind = "/".join(QTYPES[r.qtype]) if r.qtype < len(QTYPES) else "other"
        meta[r.question_id] = (" ".join(r.words), r.answer, kind)
    return items, meta, bad


def answer_questions(args, device: str) -> int:
    """The AVQA branch of avstfp-predict (see the module docstring)."""
    from torch.utils.data import DataLoader

    from ..train.avqa_data import AVQADataset, collate_avqa
    from ..train.avqa_metrics import avqa_report, format_avqa_table, new_counts, update_counts
    from ..train.metrics import dump_json
    try:
        model, inputs = load_avqa_model(args.model, pretrained=args.pretrained,
                                        backend=args.backend, device=device)
        if model.vocabulary is None or model.answers is None:
            raise ValueError(f"model: {args.model} carries no vocabulary/answers")
        if not args.questions:
            raise ValueError("--questions: an AVQA model answers the questions of an AVQA "
                             "JSON file (e.g. --questions avqa-test.json)")
        if args.inputs:
            raise ValueError("inputs: an AVQA model reads the videos its --questions name; "
                             "drop the inputs (use --video-dir for their folder)")
        video_dir = args.video_dir or default_video_dir(args.questions)
        items, meta, bad_rows = _items(model, args.questions, video_dir,
                                       int(inputs.get("question_len", 14)))
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"avstfp-predict: error: {e}", file=sys.stderr)
        return 2
    hop = int(inputs.get("avqa_hop", 6)) if args.avqa_hop is None else args.avqa_hop
    segments = int(inputs.get("segments", 10))
    unseen = sum(1 for it in items if it[1] < 0)
    print(f"avstfp-predict: AVQA model {args.model} ({len(model.answers)} answers, "
          f"backend {model.backend}, {device}); {len(items)} questions from {args.questions}, "
          f"{bad_rows} bad rows skipped, {unseen} with an answer the model does not know; "
          f"videos in {video_dir}, one 1-s segment every {hop} s", file=sys.stderr)
    items = sorted(items, key=lambda it: it[2])          # one decode per video
    ds = AVQADataset(items, hop=hop, image_size=model.image_size, segments=segments,
                     sample_rate=int(inputs.get("sample_rate", 16000)), warn_bad=False)

    def collate(samples):
        b = collate_avqa(samples)
        b["reasons"] = [s["reason"] for s in samples if "bad" in s]
        return b
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False,
                        num_workers=args.num_workers, collate_fn=collate)
    os.makedirs(args.out, exist_ok=True)
    counts = new_counts()
    records, skipped, padded = [], {}, 0
    amp = args.amp and torch.device(device).type == "cuda"
    t0 = time.time()
    with torch.no_grad():
        for batch in loader:
            for path, why in zip(batch["bad"], batch["reasons"]):
                if path not in skipped:                   # once per video
                    skipped[path] = why
                    print(f"avstfp-predict: skipped {path}: {why}", file=sys.stderr)
            if batch["audio"] is None:
                continue
            padded += sum(1 for p in batch["padded"] if p)
            mods = model.config.modalities
            a = batch["audio"].to(device) if "audio" in mods else None
            v = batch["video"].to(device) if "visual" in mods else None
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if amp else \
                torch.autocast("cpu", enabled=False)
            with ctx:
                out = model(a, v, batch["question"].to(device))
            pred = out.logits.float().argmax(-1).cpu()
            update_counts(counts, batch["qtype"], pred == batch["label"])
            for qid, vid, p in zip(batch["qid"], batch["id"], pred.tolist()):
                q, truth, kind = meta[qid]
                answer = model.answers[p]
                records.append({"question_id": qid, "video_id": vid, "type": kind,
                                "question": q, "answer": answer, "true_answer": truth,
                                "correct": answer == truth})
    wall = time.time() - t0
    report = avqa_report(counts)
    dump_json(records, os.path.join(args.out, "answers.json"), indent=1)
    with open(os.path.join(args.out, "answers.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(records)
    missing = [{"input": p, "reason": r} for p, r in skipped.items()]
    summary = {"model": args.model, "kind": "avqa", "questions": args.questions,
               "video_dir": video_dir, "answered": len(records), "bad_rows": bad_rows,
               "unseen_answers": unseen, "clips_with_padding": padded,
               "skipped_videos": missing, "wall_s": round(wall, 3),
               "evaluation": report, "out": args.out}
    dump_json(summary, os.path.join(args.out, "run.json"), indent=2)
    print(format_avqa_table(report, f"{args.questions}: answer accuracy"))
    if unseen:
        print(f"{unseen} questions have an answer the model does not know (scored wrong)")
    print(f"avstfp-predict: {len(records)}/{len(items)} questions answered, "
          f"{len(missing)} videos skipped; results in {args.out}", file=sys.stderr)
    return 0 if records else 1
