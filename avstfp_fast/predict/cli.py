"""Command line: ``avstfp-predict`` / ``python -m avstfp_fast.predict``.

Examples::

    # per-second events of every video under a folder, with timeline pictures
    avstfp-predict runs/x/checkpoints/best.prompts.safetensors videos/ --plot --out preds
    # a trainer checkpoint works too; ground truth from an AVE annotation file
    avstfp-predict runs/x/checkpoints/best.pt a.mp4 b.mp4 --annotations AVE/Annotations.txt
    # evaluation without training: AVE segment accuracy on a split
    avstfp-predict best.pt --annotations AVE/Annotations.txt --split AVE/testSet.txt
    # Kinetics-Sounds top-1 / top-5 on a split file (paths relative to its folder)
    avstfp-predict best.pt --split kinetics_sounds/test.csv
    # AVQA: answer (and score) the questions of a MUSIC-AVQA JSON file
    avstfp-predict runs/avqa/checkpoints/best.prompts.safetensors \
        --questions MUSIC-AVQA/json/avqa-test.json --out answers

Outputs (``--out``, default ``predictions``): ``<video id>.json`` per video,
``predictions.csv`` for the run (AVE: one row per predicted event segment; AVAR: one row
per top-k class), ``<video id>.png`` with ``--plot``, and ``run.json`` (model, counts,
speed, skipped files with reasons, evaluation metrics).  Unreadable files are reported
and skipped; the exit status is 1 only when no video at all could be processed (2 for
bad options or an unusable model file).
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import sys

from ..models.prompted_clip import model_backend_choices
from ..train.config import COMPILE_MODES, check_compile_mode

__all__ = ["main", "build_parser"]


# Its opening has the shape of avstfp-prepare's (prepare.py) on purpose: both are
# argparse.ArgumentParser(prog=..., description=...) with each program's own text; a
# shared helper would only rename the constructor.
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avstfp-predict",
        description="Run a trained AV-STFP model (prompt file or trainer checkpoint) on "
                    "videos: per-second event probabilities and segments (AVE) or top-k "
                    "classes (Kinetics-Sounds); optionally evaluate on an annotated split.")
    a = p.add_argument
    a("model", help="prompt file (.safetensors) or trainer checkpoint (.pt)")
    a("inputs", nargs="*", help="video files and/or folders (searched recursively)")
    a("--out", default="predictions", help="output folder (default: predictions)")
    a("--plot", action="store_true", help="write a timeline PNG per video")
    a("--annotations", help="AVE Annotations.txt: ground truth for the videos (and the "
                            "classes of --split)")
    a("--split", help="evaluate on a split file (AVE testSet.txt with --annotations, or a "
                      "Kinetics-Sounds video,label CSV) instead of listing inputs")
    a("--prepared", metavar="DIR", help="predict and evaluate the clips of an "
      "avstfp-prepare folder (read, not decoded) instead of listing inputs")
    a("--prepared-split", default="test", help="with --prepared: the split (default test)")
    a("--video-dir", default=None, help="AVE: videos folder under the annotation file's "
                                        "folder (default: AVE); AVQA: the videos folder "
                                        "(default: videos/ beside the --questions file)")
    a("--questions", help="AVQA models: a MUSIC-AVQA JSON file whose questions to answer "
                          "(answers.json/csv, per-type accuracy)")
    a("--avqa-hop", dest="avqa_hop", type=int, default=None,
      help="AVQA: seconds between the sampled segments (default: the model's)")
    a("--backbone", help="override the tower: open_clip name (default: the model file's)")
    a("--pretrained", help="tower weights: a local file or an open_clip tag (default: "
                           "the model file's tag, or the checkpoint's path)")
    a("--backend", choices=model_backend_choices(), default="auto",
      help="attention backend, or 'literal' for the literal layers (default auto: the "
           "fastest that runs here)")
    a("--device", default=None, help="default: cuda if available else cpu")
    a("--batch-size", type=int, default=8, help="clips per forward pass (default 8)")
    a("--num-workers", type=int, default=0, help="decoding processes (default 0)")
    a("--amp", action=argparse.BooleanOptionalAction, default=True,
      help="bf16 autocast on GPU (default on)")
    a("--compile", action="store_true", help="wrap the model in torch.compile")
    a("--compile-mode", choices=COMPILE_MODES, default=None,
      help="torch.compile mode, implies --compile; reduce-overhead captures CUDA graphs "
           "(GPU only)")
    a("--top-k", type=int, default=5, help="AVAR: classes to report (default 5)")
    a("--top-classes", type=int, default=5, help="classes in the timeline heat map")
    a("--threads", type=int, default=None, help="torch CPU threads")
    a("--short-media", dest="short_media", choices=("mark", "skip"), default="mark",
      help="files shorter than the model's clip: 'mark' (default) predicts on the padded "
           "clip and marks the padding seconds (JSON padded_seconds, CSV padded, hatched "
           "in the timeline); 'skip' skips them with the reason")
    a("--progress", action=argparse.BooleanOptionalAction, default=True,
      help="progress bar on stderr (default on)")
    return p


def _unique_name(vid: str, used: set) -> str:
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in vid) or "video"
    name, n = base, 1
    while name in used:
        n += 1
        name = f"{base}_{n}"
    used.add(name)
    return name


def _items_for_split(args, lm) -> list:
    from ..train.data import ave_categories, ave_items, ks_items
    if lm.head == "ave":
        if not args.annotations:
            raise ValueError("--split: an AVE split needs --annotations Annotations.txt")
        classes = ave_categories(args.annotations)
        if classes != list(lm.classes):
            raise ValueError(f"--annotations: its classes {classes[:4]}... ({len(classes)}) "
                             f"differ from the model's {list(lm.classes)[:4]}... "
                             f"({len(lm.classes)})")
        return ave_items(args.split, os.path.dirname(os.path.abspath(args.annotations)),
                         classes, segments=lm.segments, clip_seconds=lm.clip_seconds,
                         video_dir=args.video_dir or "AVE")
    return ks_items(args.split, os.path.dirname(os.path.abspath(args.split)), list(lm.classes))


def _items_for_prepared(args, lm) -> list:
    """``(ClipRef, label, id)`` of a prepared split, after checking that it was prepared
    for this model (layout, classes, segments, input size)."""
    import math

    from ..data.shards import check_settings
    from ..train.data import _label, prepared_splits
    layout = {"ave": "ave", "avar": "ks"}.get(lm.head)
    if layout is None:
        raise ValueError(f"--prepared: supported for AVE and Kinetics-Sounds models, not "
                         f"{lm.head!r}")
    man, classes, splits = prepared_splits(
        args.prepared, layout, segments=lm.segments, clip_seconds=float(lm.clip_seconds),
        sample_rate=lm.sample_rate)
    check_settings(man, args.prepared, image_size=lm.image_size,
                   short_side=math.ceil(1.25 * lm.image_size))
    if list(classes) != list(lm.classes):
        raise ValueError(f"--prepared: its classes {classes[:4]}... ({len(classes)}) differ "
                         f"from the model's {list(lm.classes)[:4]}... ({len(lm.classes)})")
    if args.prepared_split not in splits:
        raise ValueError(f"--prepared-split: expected one of {sorted(splits)}, got "
                         f"{args.prepared_split!r}")
    refs, _ = splits[args.prepared_split]
    return [(ref, _label(m["label"]), m["id"]) for ref, m in refs]


def _items_for_inputs(args, lm) -> tuple[list, list]:
    from ..predict.core import find_videos
    videos, problems = find_videos(args.inputs)
    truth = {}
    if args.annotations and lm.head == "ave":
        from ..train.data import ave_segment_labels, read_ave_rows
        index = {c: i for i, c in enumerate(lm.classes)}
        for r in read_ave_rows(args.annotations):
            if r.category in index:
                truth[r.video_id] = ave_segment_labels(r, index, lm.segments, lm.clip_seconds)
    items = []
    for v in videos:
        vid = os.path.splitext(os.path.basename(v))[0]
        items.append((v, truth.get(vid), vid))
    return items, problems


def _csv_rows(res: dict) -> list[dict]:
    if res["task"] == "avar":
        pad = "yes" if res.get("padded_seconds") else ""
        return [{"video": res["video"], "id": res["id"], "rank": i + 1, "class": t["class"],
                 "probability": t["probability"], "padded": pad}
                for i, t in enumerate(res["top_k"])]
    return [{"video": res["video"], "id": res["id"], "start": e["start"], "end": e["end"],
             "class": e["class"], "confidence": e["confidence"],
             "padded": "yes" if e.get("padded") else ""} for e in res["events"]]


# ``padded``: "yes" when the row covers seconds beyond the end of the media file
CSV_FIELDS = {"ave": ["video", "id", "start", "end", "class", "confidence", "padded"],
              "avar": ["video", "id", "rank", "class", "probability", "padded"]}


def _is_avqa_model(path: str) -> bool:
    """An AVQA prompt file or trainer checkpoint (errors are left to the loaders)."""
    from .core import _is_checkpoint
    if not os.path.isfile(path):
        return False
    try:
        if _is_checkpoint(path):
            from ..train.checkpoint import load_checkpoint
            return (load_checkpoint(path).get("config") or {}).get("task") in (
                "avqa", "synthetic_avqa")
        from ..models.prompt_file import read_prompt_file
        return read_prompt_file(path).model_class == "PromptedCLIPAVQA"
    except (ValueError, OSError):
        return False


def run(args) -> int:
    import torch

    from ..train.metrics import dump_json
    from .core import Predictor, load_model
    from .timeline import plot_timeline

    from ..train.preflight import check_backend_on_device, resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        # device and backend: one-line errors before the model file is even read
        device = str(resolve_device(args.device))
        check_backend_on_device(args.backend, torch.device(device))
        check_compile_mode(args.compile_mode, device)
        if _is_avqa_model(args.model):
            from .avqa import answer_questions
            return answer_questions(args, device)
        if args.questions:
            raise ValueError("--questions: only for AVQA models; this model classifies "
                             "events (give videos, or --split)")
        lm = load_model(args.model, backbone=args.backbone, pretrained=args.pretrained,
                        backend=args.backend, device=device)
        if args.prepared:
            if args.inputs or args.split:
                raise ValueError("--prepared: evaluates the prepared split's clips; drop "
                                 "the inputs and --split")
            items, problems = _items_for_prepared(args, lm), []
        elif args.split:
            if args.inputs:
                raise ValueError("--split: evaluates the split's videos; drop the inputs")
            items, problems = _items_for_split(args, lm), []
        else:
            if not args.inputs:
                raise ValueError("inputs: give video files or folders (or --split)")
            items, problems = _items_for_inputs(args, lm)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"avstfp-predict: error: {e}", file=sys.stderr)
        return 2
    for inp, why in problems:
        print(f"avstfp-predict: skipping {inp}: {why}", file=sys.stderr)
    print(f"avstfp-predict: {lm.kind} {lm.source} ({lm.trainer_task}, {len(lm.classes)} "
          f"classes, backend {lm.model.backend}, {device}); {len(items)} videos",
          file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    evaluating = args.split or args.prepared
    metrics = lm.task().new_metrics() if evaluating else None
    used: set = set()
    csv_path = os.path.join(args.out, "predictions.csv")
    with open(csv_path, "w", newline="") as fcsv:
        writer = csv.DictWriter(fcsv, fieldnames=CSV_FIELDS[lm.head])
        writer.writeheader()

        def on_result(res):
            name = _unique_name(res["id"], used)
            dump_json(res, os.path.join(args.out, name + ".json"))
            writer.writerows(_csv_rows(res))
            if args.plot:
                plot_timeline(res, os.path.join(args.out, name + ".png"),
                              top=args.top_classes)

        pred = Predictor(lm, batch_size=args.batch_size, device=device, amp=args.amp,
                         compile=args.compile_mode or args.compile, num_workers=args.num_workers,
                         top_k=args.top_k, progress=args.progress,
                         short_media=args.short_media)
        stats = pred.run(items, on_result, metrics=metrics)

    skipped = [(p, r) for p, r in problems] + stats["skipped"]
    for path, why in stats["skipped"]:
        print(f"avstfp-predict: skipped {path}: {why}", file=sys.stderr)
    summary = {"model": lm.source, "kind": lm.kind, "task": lm.trainer_task,
               "backend": lm.model.backend, "device": device, "videos": len(items),
               "processed": stats["done"], "clips_per_s": stats["clips_per_s"],
               "wall_s": stats["wall_s"],
               "skipped": [{"input": p, "reason": r} for p, r in skipped],
               "out": args.out}
    if metrics is not None:
        metrics.all_reduce()
        m = {k: v for k, v in metrics.summary().items() if not isinstance(v, torch.Tensor)}
        where = args.split or f"{args.prepared} {args.prepared_split}"
        summary["evaluation"] = {"split": where, **m}
        if lm.head == "ave":
            print(f"segment accuracy {m['acc']:.4f} ({m['n']} segments, {where})")
        else:
            print(f"top-1 {m['acc']:.4f}  top-5 {m['top5']:.4f} ({m['n']} clips, "
                  f"{where})")
    dump_json(summary, os.path.join(args.out, "run.json"), indent=2)
    print(f"avstfp-predict: {stats['done']}/{len(items)} videos processed"
          f" ({stats['clips_per_s'] or 0:.3g} clips/s), {len(skipped)} skipped; "
          f"results in {args.out}", file=sys.stderr)
    return 0 if stats["done"] > 0 else 1


def main(argv=None) -> int:
    from ..train.preflight import setup_cli_logging
    setup_cli_logging(logging.INFO)       # open_clip's INFO lines stay out of the output
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
