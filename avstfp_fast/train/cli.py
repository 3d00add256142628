"""Command line: ``python -m avstfp_fast.train`` / ``avstfp-train``.

Examples::

    # the paper's recipe on AVE (ViT-B/16 tower with OpenAI's weights: a local file, or
    # --pretrained openai through open_clip's cache; see docs/weights.md)
    avstfp-train --task ave --backbone ViT-B-16 --pretrained /ckpt/ViT-B-16.pt \\
                 --data-root /data/AVE_Dataset --out runs/ave-b16
    # Kinetics-Sounds
    avstfp-train --task avar --backbone ViT-L-14 --pretrained /ckpt/ViT-L-14.pt \\
                 --data-root /data/kinetics_sounds
    # synthetic AVE-layout data, tiny CPU model (generated into the run folder)
    avstfp-train --task synthetic --backend torch
    # multi-GPU / multi-process
    torchrun --nproc_per_node 8 -m avstfp_fast.train --task ave ...
    # resume, or evaluate a checkpoint with another backend
    avstfp-train ... --resume runs/x/checkpoints/last.pt
    avstfp-train ... --eval-only --resume runs/x/checkpoints/best.pt --backend reference
    # (a different --epochs when resuming continues on the schedule stretched to it)
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from ..models.prompted_clip import model_backend_choices
from .config import COMPILE_MODES, MODEL_OPTIONS, TrainConfig, task_defaults, task_names

__all__ = ["main", "build_parser", "config_from_args"]


S = argparse.SUPPRESS   # unset options stay unset, so per-task defaults can apply
B = argparse.BooleanOptionalAction

#: The option groups after the general options: (title, ((option, kind, help), ...)).
#: ``kind``: int or float (the value's type), None (a string), a tuple (the choices),
#: B (``--x`` / ``--no-x``), "store_true", or "*" / "+" (a list of words).  Every option
#: defaults to S; a ``{field}`` in a help is TrainConfig's default of that field, and
#: build_parser adds "(default ...)" to a help that states none.  (A table: its rows are
#: alike by design -- one row an option -- where a duplicate-finder sees repeated lines.)
OPTION_GROUPS = (
    ("recipe", (
        ("--epochs", int, "default {epochs}"),
        ("--warmup-epochs", float, "default {warmup_epochs}"),
        ("--lr-prompts", float, "peak lr of prompts and gates (default {lr_prompts})"),
        ("--lr-head", float, "peak lr of the head (default {lr_head})"),
        ("--min-lr", float, "cosine floor (default {min_lr})"),
        ("--weight-decay", float, "default {weight_decay}"),
        ("--optimizer", ("adam", "adamw"), "adam (the paper's) or adamw (decoupled weight "
                                           "decay)"),
        ("--batch-size", int, "per process (default {batch_size})"),
        ("--clip-grad", float, "max gradient norm, 0 = off (default {clip_grad})"),
        ("--mixup-alpha", float, "Beta(alpha, alpha) of the audio mix-up weight"),
        ("--mixup-prob", float, "probability that a batch is mixed up"),
        ("--visual-aug", ("none", "light", "strong"), "visual augmentation of training "
                                                      "frames"),
        ("--amp", B, "bf16 autocast on GPU (default on)"),
        ("--seed", int, "seed of initialisation, sampling and augmentation"),
    )),
    ("model", (
        ("--full-finetune", B, "also train the CLIP tower (else it is frozen)"),
        ("--n-temporal", int, "temporal prompts per layer and modality"),
        ("--n-spatial", int, "spatial prompts per layer and modality"),
        ("--n-fusion", int, "fusion prompts per layer"),
        ("--stages", "*", "subset of temporal spatial fusion"),
        ("--modalities", "+", "audio and/or visual"),
        ("--beta-init", float, "initial value of the learnable gates"),
        ("--compile", B, "wrap the model in torch.compile"),
        ("--compile-mode", COMPILE_MODES, "torch.compile mode, implies --compile; "
                                          "reduce-overhead captures CUDA graphs (GPU only)"),
    )),
    ("data", (
        ("--num-workers", int, "decoding processes per training process (default: 4, at "
                               "most the CPU cores available)"),
        ("--cache", B, "keep decoded clips in memory"),
        ("--segments", int, "1-s segments per clip"),
        ("--synthetic-events", int, "synthetic tasks: event classes (AVQA: instrument "
                                    "kinds)"),
        ("--synthetic-train", int, "synthetic tasks: training videos to generate"),
        ("--synthetic-val", int, "synthetic tasks: validation videos to generate"),
        ("--synthetic-test", int, "synthetic tasks: test videos to generate"),
    )),
    ("question answering (avqa, synthetic_avqa)", (
        ("--avqa-hop", int, "seconds between the sampled 1-s segments"),
        ("--question-len", int, "maximum question length in words (longer questions: an "
                                "error)"),
        ("--match-weight", float, "weight of the audio-visual matching loss"),
        ("--head-hidden", int, "width of the task head"),
    )),
    ("run control", (
        ("--resume", None, "checkpoint to continue from (or evaluate)"),
        ("--eval-only", "store_true", "evaluate the --resume checkpoint on val and test, no "
                                      "training"),
        ("--max-steps", int, "stop after this many optimiser steps (the schedule still "
                             "spans --epochs)"),
        ("--ckpt-every", int, "also checkpoint every N steps (default: once per epoch)"),
        ("--eval-every", int, "validate every N epochs (0: never during training)"),
        ("--final-eval", B, "evaluate best.pt on val and test at the end"),
        ("--progress", B, "progress bars on stderr"),
        ("--device", None, "cpu, cuda[:N] or mps (default: cuda if available, else cpu)"),
        ("--threads", int, "torch CPU threads (default: torch's)"),
        ("--find-unused-parameters", B, "DDP option for models with unused parameters"),
    )),
)


def _kind(kind) -> dict:
    """The add_argument keywords of an OPTION_GROUPS ``kind``."""
    if kind in (int, float):
        return {"type": kind}
    if kind in ("*", "+"):
        return {"nargs": kind}
    if kind is B or kind == "store_true":
        return {"action": kind}
    return {"choices": kind} if isinstance(kind, tuple) else {}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig().flat()
    p = argparse.ArgumentParser(
        prog="avstfp-train",
        description="Train AV-STFP (prompt-tuned CLIP tower) on AVE, Kinetics-Sounds or "
                    "synthetic data.  Defaults are the paper's recipe; the synthetic task has "
                    "its own faster defaults (see tasks.SyntheticAVETask.defaults).",
    )
    a = p.add_argument
    a("--task", choices=task_names(), default="ave",
      help="what to train: ave (AVE events per second), avar (Kinetics-Sounds), avqa "
           "(MUSIC-AVQA), or their synthetic stand-ins")
    a("--backbone", default=S, help=f"open_clip model name or 'tiny' (default {d['backbone']})")
    a("--pretrained", default=S,
      help="tower weights: an open_clip tag of --backbone (e.g. openai; open_clip's cache "
           "and download) or a local file (docs/weights.md)")
    a("--backend", choices=model_backend_choices(), default=S,
      help=f"attention backend, or 'literal' for the literal layers (default {d['backend']})")
    a("--data-root", default=S,
      help="data set folder in the official layout (synthetic tasks: generated there), "
           "or a folder made by avstfp-prepare")
    a("--prepared", default=S,
      help="read clips from this avstfp-prepare folder instead of decoding videos "
           "(also detected in --data-root)")
    a("--out", default=S, help="run folder (default runs/<task>-<time>)")
    for title, options in OPTION_GROUPS:
        g = p.add_argument_group(title)
        for option, kind, text in options:
            g.add_argument(option, default=S, help=text.format(**d), **_kind(kind))
    for act in p._actions:       # show the config default of every option not yet saying it
        if act.dest in d and "default" not in (act.help or ""):
            act.help = ((act.help + " ") if act.help else "") + f"(default {d[act.dest]})"
    return p


def config_from_args(argv=None) -> TrainConfig:
    ns = vars(build_parser().parse_args(argv))
    fields = {f.name for f in dataclasses.fields(TrainConfig)} | set(MODEL_OPTIONS)
    unknown = set(ns) - fields
    if unknown:
        raise SystemExit(f"internal error: options without config fields {sorted(unknown)}")
    merged = {**task_defaults(ns["task"]), **_model_fields_from_checkpoint(ns), **ns}
    return TrainConfig.from_dict(merged)


# Fields that shape the model and its input: when resuming or evaluating a checkpoint,
# these default to the checkpoint's values (an explicit option still wins), so that e.g.
# ``--eval-only --resume best.pt --backend reference`` needs no other model options.
MODEL_FIELDS = ("backbone", "pretrained", "segments", "clip_seconds", "avqa_hop",
                "question_len") + MODEL_OPTIONS


def _model_fields_from_checkpoint(ns: dict) -> dict:
    path = ns.get("resume")
    if not path:
        return {}
    from .checkpoint import load_checkpoint
    saved = load_checkpoint(path).get("config") or {}
    if saved.get("task") not in (None, ns["task"]):
        raise ValueError(f"resume: checkpoint {path} was trained for task "
                         f"{saved.get('task')!r}, not {ns['task']!r}")
    flat = TrainConfig.from_dict(saved).flat() if saved else {}
    return {k: flat[k] for k in MODEL_FIELDS if k in flat}


def main(argv=None) -> int:
    from .preflight import setup_cli_logging
    setup_cli_logging(logging.INFO)       # open_clip's INFO lines stay out of the output
    try:
        cfg = config_from_args(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"avstfp-train: error: {e}", file=sys.stderr)
        return 2
    from .loop import NonFiniteLoss, train
    try:
        res = train(cfg)
    except NonFiniteLoss as e:
        print(f"avstfp-train: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:     # bad options or data layout
        print(f"avstfp-train: error: {e}", file=sys.stderr)
        return 2
    if res.get("status") == "interrupted":
        print(f"avstfp-train: {res['message']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
