"""The preparation engine behind ``avstfp-prepare``: decode each clip once, in parallel,
into the shards of :mod:`.shards`, resumably.

:func:`prepare_splits` takes, per split, a *source*: any picklable object with ``items``
(``(path, label, id)`` rows) and ``raw(i)`` -> ``(audio features, uint8 frames[, padded
segments, media seconds])`` -- the
trainer's own datasets, so a prepared clip is by construction what the decode path
computes.  Shard ``k`` of a split holds the items ``k*shard_size ... (k+1)*shard_size-1``
(minus the bad ones): a shard whose file and record exist with the same settings is kept
when the command is run again, so an interrupted preparation resumes where it stopped.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from typing import Optional

from .media import BadSample
from .shards import (FORMAT, MANIFEST, PreparedDataError, PreparedSettings, ShardWriter,
                     encode_sample, load_manifest, read_clip, scan_shard, sha256_file,
                     shard_name)

__all__ = ["prepare_splits", "verify"]

_SRC = None     # the worker process's source (set by the pool initialiser)


def _init(source, threads=None):
    global _SRC
    _SRC = source
    if threads:
        import torch
        torch.set_num_threads(threads)


def _work(job):
    split, i, settings = job
    src = _SRC[split]
    path, label, vid = src.items[i][:3]
    try:
        out = src.raw(i)        # (audio, frames[, padded segments, media seconds])
    except BadSample as e:
        return i, None, str(e)
    audio, frames = out[0], out[1]
    meta = {"id": str(vid), "label": _jsonable(label), "source": str(path)}
    if len(out) >= 4:
        meta.update(padded=[int(s) for s in out[2]], media_seconds=out[3])
    return i, encode_sample(audio.numpy(), frames.numpy(), meta, settings), None


def _jsonable(label):
    import numpy as np
    if isinstance(label, np.ndarray):
        return label.tolist()
    if isinstance(label, np.generic):
        return label.item()
    return label


def _atomic_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _record_ok(rec_path, tar_path, stamp) -> Optional[dict]:
    """The record of a finished shard made with ``stamp``, else None."""
    if not (os.path.isfile(rec_path) and os.path.isfile(tar_path)):
        return None
    try:
        with open(rec_path, encoding="utf-8") as f:
            rec = json.load(f)
    except ValueError:
        return None
    if rec.get("stamp") != stamp or rec.get("bytes") != os.path.getsize(tar_path):
        return None
    return rec


def prepare_splits(out: str, sources: dict, settings: PreparedSettings, *, source_info: dict,
                   classes: list, workers: int = 1, shard_size: int = 256,
                   progress: bool = True, overwrite: bool = False,
                   extra: Optional[dict] = None, version: str = "") -> dict:
    """Prepare every split of ``sources`` (split -> source) into ``out``; write and
    return the manifest."""
    if shard_size < 1:
        raise ValueError(f"shard_size: expected >= 1, got {shard_size}")
    if workers < 0:
        raise ValueError(f"workers: expected >= 0, got {workers}")
    os.makedirs(out, exist_ok=True)
    stamp_base = {"settings": settings.to_dict(), "source": source_info,
                  "shard_size": shard_size, "classes": list(classes)}
    man_path = os.path.join(out, MANIFEST)
    if os.path.isfile(man_path) and not overwrite:
        old = load_manifest(out)
        if {k: old.get(k) for k in stamp_base} != stamp_base:
            raise PreparedDataError(f"--out {out} holds data prepared with other settings or "
                                    f"another source; use a new --out or --overwrite")
    t0 = time.time()
    plan, kept = [], {}
    for split, src in sources.items():
        n = len(src.items)
        for k in range(max(1, -(-n // shard_size)) if n else 0):
            name = f"{split}/{shard_name(k)}"
            stamp = {**stamp_base, "split": split, "first": k * shard_size,
                     "items": [str(it[0]) for it in src.items[k * shard_size:(k + 1) * shard_size]]}
            tar_path, rec_path = (os.path.join(out, name + ext) for ext in (".tar", ".json"))
            rec = None if overwrite else _record_ok(rec_path, tar_path, stamp)
            if rec is not None:
                kept[name] = rec
            else:
                plan.append((split, k, name, stamp))
    jobs = [(split, i, settings) for split, k, _, _ in plan
            for i in range(k * shard_size, min((k + 1) * shard_size, len(sources[split].items)))]
    print(f"avstfp-prepare: {len(jobs)} clips to prepare in {len(plan)} shards "
          f"({len(kept)} finished shards kept), {max(workers, 1)} worker(s)",
          file=sys.stderr, flush=True)
    bar = None
    if progress and jobs:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), unit="clip", desc="prepare", dynamic_ncols=True,
                   file=sys.stderr)
    records = dict(kept)
    if jobs:
        results = _run(jobs, sources, workers)
        for split, k, name, stamp in plan:
            tar_path = os.path.join(out, name + ".tar")
            w = ShardWriter(tar_path)
            bad = []
            try:
                hi = min((k + 1) * shard_size, len(sources[split].items))
                for _ in range(k * shard_size, hi):
                    i, members, reason = next(results)
                    if members is None:
                        bad.append({"split": split, "source": str(sources[split].items[i][0]),
                                    "reason": reason})
                        print(f"avstfp-prepare: skipping {sources[split].items[i][0]}: "
                              f"{reason}", file=sys.stderr, flush=True)
                    else:
                        w.write(f"{i:06d}", members)
                    if bar is not None:
                        bar.update(1)
                count = w.count
                w.close()
            except BaseException:
                w.abort()
                raise
            rec = {"name": name + ".tar", "clips": count, "bytes": os.path.getsize(tar_path),
                   "sha256": sha256_file(tar_path), "bad": bad, "stamp": stamp}
            _atomic_json(os.path.join(out, name + ".json"), rec)
            records[name] = rec
    if bar is not None:
        bar.close()
    for split in sources:        # shards of an earlier, larger preparation: not ours now
        folder = os.path.join(out, split)
        for f in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            stem, ext = os.path.splitext(f)
            if ext in (".tar", ".json", ".tmp") and f"{split}/{stem}" not in records:
                os.remove(os.path.join(folder, f))
    wall = time.time() - t0
    splits, all_bad = {}, []
    for split, src in sources.items():
        recs = [records[n] for n in sorted(records) if n.startswith(split + "/")]
        bad = [b for r in recs for b in r["bad"]]
        all_bad += bad
        splits[split] = {"clips": sum(r["clips"] for r in recs), "bad": len(bad),
                         "sources": len(src.items),
                         "shards": [{k: r[k] for k in ("name", "clips", "bytes", "sha256")}
                                    for r in recs]}
    with open(os.path.join(out, "bad.jsonl"), "w", encoding="utf-8") as f:
        for b in all_bad:
            f.write(json.dumps(b) + "\n")
    man = {"format": FORMAT, "library_version": version, **stamp_base,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "splits": splits, "bytes": sum(s["bytes"] for sp in splits.values()
                                          for s in sp["shards"]),
           "prepare_seconds": round(wall, 2),
           "clips_per_s": round(len(jobs) / wall, 2) if jobs and wall > 0 else None,
           **(extra or {})}
    _atomic_json(man_path, man)
    return man


def _run(jobs, sources, workers):
    """Results ``(i, members or None, reason)`` in job order."""
    if workers <= 1:
        _init(sources)
        return (_work(j) for j in jobs)
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = ctx.Pool(workers, initializer=_init, initargs=(sources, 1))

    def gen():
        try:
            yield from pool.imap(_work, jobs, chunksize=1)
        finally:
            pool.terminate()
            pool.join()
    return gen()


def verify(root: str) -> tuple[int, list]:
    """Check a prepared folder: every listed shard exists, has its recorded size and
    sha256, holds its recorded clip count, and every sample's members match their CRC-32;
    no unlisted shard lies beside them.  Returns ``(clips checked, problems)``."""
    man = load_manifest(root)
    frames = man["settings"].get("frames", "npy")
    problems, n = [], 0
    for split, info in man["splits"].items():
        listed = {s["name"] for s in info["shards"]}
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            for f in sorted(os.listdir(folder)):
                if f.endswith(".tar") and f"{split}/{f}" not in listed:
                    problems.append(f"{split}/{f}: shard not listed in the manifest")
        for s in info["shards"]:
            path = os.path.join(root, s["name"])
            if not os.path.isfile(path):
                problems.append(f"{s['name']}: missing")
                continue
            if os.path.getsize(path) != s["bytes"]:
                problems.append(f"{s['name']}: {os.path.getsize(path)} bytes, manifest says "
                                f"{s['bytes']}")
            elif sha256_file(path) != s["sha256"]:
                problems.append(f"{s['name']}: sha256 differs from the manifest")
            try:
                refs = scan_shard(path, frames)
            except PreparedDataError as e:
                problems.append(str(e))
                continue
            if len(refs) != s["clips"]:
                problems.append(f"{s['name']}: {len(refs)} clips, manifest says {s['clips']}")
            for ref, meta in refs:
                try:
                    read_clip(ref)
                    n += 1
                except (BadSample, ValueError, OSError) as e:
                    problems.append(f"{ref}: {e}")
        total = sum(s["clips"] for s in info["shards"])
        if total != info["clips"]:
            problems.append(f"{split}: shards hold {total} clips, manifest says {info['clips']}")
    return n, problems
