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


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig().flat()
    p = argparse.ArgumentParser(
        prog="avstfp-train",
        description="Train AV-STFP (prompt-tuned CLIP tower) on AVE, Kinetics-Sounds or "
                    "synthetic data.  Defaults are the paper's recipe; the synthetic task has "
                    "its own faster defaults (see tasks.SyntheticAVETask.defaults).",
    )
    S = argparse.SUPPRESS   # unset options stay unset, so per-task defaults can apply
    B = argparse.BooleanOptionalAction
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
    a("--data-root", dest="data_root", default=S,
      help="data set folder in the official layout (synthetic tasks: generated there), "
           "or a folder made by avstfp-prepare")
    a("--prepared", default=S,
      help="read clips from this avstfp-prepare folder instead of decoding videos "
           "(also detected in --data-root)")
    a("--out", default=S, help="run folder (default runs/<task>-<time>)")
    g = p.add_argument_group("recipe")
    g.add_argument("--epochs", type=int, default=S, help=f"default {d['epochs']}")
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=float, default=S,
                   help=f"default {d['warmup_epochs']}")
    g.add_argument("--lr-prompts", dest="lr_prompts", type=float, default=S,
                   help=f"peak lr of prompts and gates (default {d['lr_prompts']})")
    g.add_argument("--lr-head", dest="lr_head", type=float, default=S,
                   help=f"peak lr of the head (default {d['lr_head']})")
    g.add_argument("--min-lr", dest="min_lr", type=float, default=S,
                   help=f"cosine floor (default {d['min_lr']})")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, default=S,
                   help=f"default {d['weight_decay']}")
    g.add_argument("--optimizer", choices=("adam", "adamw"), default=S,
                   help="adam (the paper's) or adamw (decoupled weight decay)")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=S,
                   help=f"per process (default {d['batch_size']})")
    g.add_argument("--clip-grad", dest="clip_grad", type=float, default=S,
                   help=f"max gradient norm, 0 = off (default {d['clip_grad']})")
    g.add_argument("--mixup-alpha", dest="mixup_alpha", type=float, default=S,
                   help="Beta(alpha, alpha) of the audio mix-up weight")
    g.add_argument("--mixup-prob", dest="mixup_prob", type=float, default=S,
                   help="probability that a batch is mixed up")
    g.add_argument("--visual-aug", dest="visual_aug", choices=("none", "light", "strong"),
                   default=S, help="visual augmentation of training frames")
    g.add_argument("--amp", action=B, default=S, help="bf16 autocast on GPU (default on)")
    g.add_argument("--seed", type=int, default=S,
                   help="seed of initialisation, sampling and augmentation")
    m = p.add_argument_group("model")
    m.add_argument("--full-finetune", dest="full_finetune", action=B, default=S,
                   help="also train the CLIP tower (else it is frozen)")
    m.add_argument("--n-temporal", dest="n_temporal", type=int, default=S,
                   help="temporal prompts per layer and modality")
    m.add_argument("--n-spatial", dest="n_spatial", type=int, default=S,
                   help="spatial prompts per layer and modality")
    m.add_argument("--n-fusion", dest="n_fusion", type=int, default=S,
                   help="fusion prompts per layer")
    m.add_argument("--stages", nargs="*", default=S,
                   help="subset of temporal spatial fusion")
    m.add_argument("--modalities", nargs="+", default=S, help="audio and/or visual")
    m.add_argument("--beta-init", dest="beta_init", type=float, default=S,
                   help="initial value of the learnable gates")
    m.add_argument("--compile", action=B, default=S, help="wrap the model in torch.compile")
    m.add_argument("--compile-mode", dest="compile_mode", choices=COMPILE_MODES, default=S,
                   help="torch.compile mode, implies --compile; reduce-overhead captures "
                        "CUDA graphs (GPU only)")
    dd = p.add_argument_group("data")
    dd.add_argument("--num-workers", dest="num_workers", type=int, default=S,
                    help="decoding processes per training process (default: 4, at most "
                         "the CPU cores available)")
    dd.add_argument("--cache", action=B, default=S, help="keep decoded clips in memory")
    dd.add_argument("--segments", type=int, default=S,
                    help="1-s segments per clip")
    dd.add_argument("--synthetic-events", dest="synthetic_events", type=int, default=S,
                    help="synthetic tasks: event classes (AVQA: instrument kinds)")
    dd.add_argument("--synthetic-train", dest="synthetic_train", type=int, default=S,
                    help="synthetic tasks: training videos to generate")
    dd.add_argument("--synthetic-val", dest="synthetic_val", type=int, default=S,
                    help="synthetic tasks: validation videos to generate")
    dd.add_argument("--synthetic-test", dest="synthetic_test", type=int, default=S,
                    help="synthetic tasks: test videos to generate")
    q = p.add_argument_group("question answering (avqa, synthetic_avqa)")
    q.add_argument("--avqa-hop", dest="avqa_hop", type=int, default=S,
                   help="seconds between the sampled 1-s segments")
    q.add_argument("--question-len", dest="question_len", type=int, default=S,
                   help="maximum question length in words (longer questions: an error)")
    q.add_argument("--match-weight", dest="match_weight", type=float, default=S,
                   help="weight of the audio-visual matching loss")
    q.add_argument("--head-hidden", dest="head_hidden", type=int, default=S,
                   help="width of the task head")
    r = p.add_argument_group("run control")
    r.add_argument("--resume", default=S, help="checkpoint to continue from (or evaluate)")
    r.add_argument("--eval-only", dest="eval_only", action="store_true", default=S,
                   help="evaluate the --resume checkpoint on val and test, no training")
    r.add_argument("--max-steps", dest="max_steps", type=int, default=S,
                   help="stop after this many optimiser steps (the schedule still spans "
                        "--epochs)")
    r.add_argument("--ckpt-every", dest="ckpt_every", type=int, default=S,
                   help="also checkpoint every N steps (default: once per epoch)")
    r.add_argument("--eval-every", dest="eval_every", type=int, default=S,
                   help="validate every N epochs (0: never during training)")
    r.add_argument("--final-eval", dest="final_eval", action=B, default=S,
                   help="evaluate best.pt on val and test at the end")
    r.add_argument("--progress", action=B, default=S, help="progress bars on stderr")
    r.add_argument("--device", default=S,
                   help="cpu, cuda[:N] or mps (default: cuda if available, else cpu)")
    r.add_argument("--threads", type=int, default=S, help="torch CPU threads (default: torch's)")
    r.add_argument("--find-unused-parameters", dest="find_unused_parameters", action=B,
                   default=S, help="DDP option for models with unused parameters")
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
