"""``avstfp-prepare`` / ``python -m avstfp_fast.prepare``: decode a data set once into
WebDataset-format tar shards that the trainer and avstfp-predict read instead of videos.

Examples::

    # AVE (official layout) for a 224-pixel tower, 8 decoding processes
    avstfp-prepare --task ave --data-root /data/AVE_Dataset --out /data/AVE_prepared --workers 8
    # Kinetics-Sounds, JPEG frames (smaller, within JPEG error of decoding)
    avstfp-prepare --task avar --data-root /data/kinetics_sounds --out /data/ks_prepared --frames jpeg
    # MUSIC-AVQA: each video once, for all of its questions
    avstfp-prepare --task avqa --data-root /data/MUSIC-AVQA --out /data/avqa_prepared
    # the synthetic tasks (generated into --data-root first when it is empty)
    avstfp-prepare --task synthetic --data-root data/syn --out data/syn_prepared
    # check a prepared folder (counts, sha256 of each shard, CRC-32 of each sample)
    avstfp-prepare --verify data/syn_prepared

Then train with ``avstfp-train --task ave --prepared /data/AVE_prepared ...`` (or pass the
prepared folder as ``--data-root``).  The format, its tolerances and the measured speed
are in docs/data.md.  Running the same command again resumes: finished shards are kept.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys

__all__ = ["main", "build_parser", "prepare"]

LAYOUTS = {"ave": "ave", "synthetic": "ave", "avar": "ks", "avqa": "avqa",
           "synthetic_avqa": "avqa"}


# Its opening has the shape of avstfp-predict's (predict/cli.py) on purpose: both are
# argparse.ArgumentParser(prog=..., description=...) with each program's own text; a
# shared helper would only rename the constructor.
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="avstfp-prepare",
        description="Decode a data set once (frames at the trainer's size, fbank audio "
                    "features, labels) into WebDataset tar shards for avstfp-train and "
                    "avstfp-predict.  Re-running resumes; bad videos are skipped and listed.")
    a = p.add_argument
    a("--task", choices=tuple(LAYOUTS), help="the trainer task the data is for (ave and "
      "synthetic: AVE layout; avar: Kinetics-Sounds; avqa, synthetic_avqa: MUSIC-AVQA)")
    a("--data-root", help="the data set in its official layout (synthetic tasks: "
                          "generated there first when it is empty)")
    a("--out", help="folder for the shards and manifest.json")
    a("--image-size", type=int, default=None,
      help="the tower's input size the frames are kept for (default 224; 64 for the "
           "synthetic tasks' tiny tower); frames keep short side ceil(1.25 x size)")
    a("--segments", type=int, default=None, help="segments per clip (default: the task's, 10)")
    a("--avqa-hop", type=int, default=None, help="AVQA: seconds between the sampled 1-s "
                                                 "segments (default: the task's)")
    a("--frames", choices=("npy", "jpeg"), default="npy",
      help="npy: raw uint8, bit-exact with decoding (default); jpeg: 5-20x smaller")
    a("--jpeg-quality", type=int, default=95, help="with --frames jpeg (default 95)")
    a("--audio-dtype", choices=("float16", "float32"), default="float16",
      help="fbank storage (default float16; float32 is bit-exact with decoding)")
    a("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
      help="decoding processes (default: CPU cores - 1)")
    a("--shard-size", type=int, default=256, help="clips per shard (default 256)")
    a("--overwrite", action="store_true", help="rebuild everything, even finished shards "
                                                "or a folder prepared with other settings")
    a("--verify", metavar="DIR", help="only check the prepared folder DIR and exit "
                                      "(0: intact, 1: problems listed)")
    a("--seed", type=int, default=0, help="synthetic tasks: generation seed (default 0)")
    a("--progress", action=argparse.BooleanOptionalAction, default=True)
    return p


def _sources_for(task, image_size):
    """split -> the trainer's own decoding dataset (``raw(i)``: decoded clip)."""
    from .train.avqa_data import AVQADataset
    from .train.data import ClipDataset
    cfg = task.cfg
    if LAYOUTS[cfg.task] != "avqa":
        return {split: ClipDataset(items, image_size=image_size, segments=cfg.segments,
                                   clip_seconds=cfg.clip_seconds, sample_rate=cfg.sample_rate)
                for split, items in task.splits.items()}
    seen = {}
    for items in task.splits.values():       # every video once, for all its questions
        for it in items:
            seen.setdefault(it[2], (it[0], 0, it[2], None, 0, ""))
    videos = [seen[v] for v in sorted(seen)]
    return {"videos": AVQADataset(videos, hop=cfg.avqa_hop, image_size=image_size,
                                  segments=cfg.segments, sample_rate=cfg.sample_rate)}


def prepare(args) -> dict:
    """Run one preparation from parsed options; returns the manifest."""
    import avstfp_fast
    from .data.prepare import prepare_splits
    from .data.shards import PreparedSettings
    from .train.config import TrainConfig, task_defaults
    from .train.registry import make_task

    if not args.task or not args.data_root or not args.out:
        raise ValueError("--task, --data-root and --out are required (or --verify DIR)")
    kw = {**task_defaults(args.task), "task": args.task, "data_root": args.data_root,
          "seed": args.seed, "cache": False}
    if args.segments is not None:
        kw["segments"] = args.segments
    if args.avqa_hop is not None:
        kw["avqa_hop"] = args.avqa_hop
    cfg = TrainConfig.from_dict(kw)
    size = args.image_size or (64 if cfg.backbone == "tiny" else 224)
    if size < 16:
        raise ValueError(f"--image-size: expected >= 16, got {size}")
    layout = LAYOUTS[args.task]
    settings = PreparedSettings(
        layout=layout, segments=cfg.segments,
        clip_seconds=float(cfg.segments if layout == "avqa" else cfg.clip_seconds),
        sample_rate=cfg.sample_rate, image_size=size, short_side=math.ceil(1.25 * size),
        frames=args.frames, jpeg_quality=args.jpeg_quality, audio_dtype=args.audio_dtype,
        avqa_hop=cfg.avqa_hop if layout == "avqa" else None)
    task = make_task(cfg)
    os.makedirs(args.out, exist_ok=True)
    data = task.prepare_data(args.out, 0)     # synthetic: generates when empty
    classes, splits = data.classes, data.splits
    extra = {}
    if layout == "avqa":
        from .train.avqa_data import AVQA_SPLIT_FILES, _find_json
        qdir = os.path.join(args.out, "json")
        os.makedirs(qdir, exist_ok=True)
        for split, fname in AVQA_SPLIT_FILES.items():
            src = _find_json(data.data_root, fname)
            if src is not None:
                shutil.copyfile(src, os.path.join(qdir, fname))
        extra["avqa"] = {"questions": {s: len(v) for s, v in splits.items()},
                         "vocabulary": len(task.vocab), "answers": len(task.answers)}
    sources = _sources_for(task, size)
    source_info = {"task": args.task, "layout": layout,
                   "data_root": os.path.abspath(data.data_root)}
    return prepare_splits(args.out, sources, settings, source_info=source_info,
                          classes=list(classes), workers=args.workers,
                          shard_size=args.shard_size, progress=args.progress,
                          overwrite=args.overwrite, extra=extra,
                          version=avstfp_fast.__version__)


def _report(man: dict, out: str) -> str:
    lines = [f"prepared {out} ({man['bytes'] / 2**20:.1f} MiB)"]
    for split, info in man["splits"].items():
        lines.append(f"  {split}: {info['clips']} clips in {len(info['shards'])} shards, "
                     f"{info['bad']} skipped of {info['sources']}")
    if man.get("clips_per_s"):
        lines.append(f"  {man['clips_per_s']:.2f} clips/s over {man['prepare_seconds']:.1f} s")
    if any(i["bad"] for i in man["splits"].values()):
        lines.append(f"  skipped files and reasons: {os.path.join(out, 'bad.jsonl')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    p = build_parser()
    args = p.parse_args(argv)
    from .data.shards import PreparedDataError
    if args.verify:
        from .data.prepare import verify
        try:
            n, problems = verify(args.verify)
        except PreparedDataError as e:
            print(f"avstfp-prepare: error: {e}", file=sys.stderr)
            return 2
        for prob in problems:
            print(f"avstfp-prepare: verify: {prob}", file=sys.stderr)
        print(f"avstfp-prepare: verify {args.verify}: {n} clips read, "
              f"{len(problems)} problem(s)")
        return 1 if problems else 0
    for name in ("workers", "shard_size"):
        if getattr(args, name) < (0 if name == "workers" else 1):
            print(f"avstfp-prepare: error: --{name.replace('_', '-')}: expected >= "
                  f"{0 if name == 'workers' else 1}, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        man = prepare(args)
    except (ValueError, FileNotFoundError, PreparedDataError) as e:
        print(f"avstfp-prepare: error: {e}", file=sys.stderr)
        return 2
    print(_report(man, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
