"""AVQA evaluation and resuming as users hit them: the vocabulary and answers belong to the
model (reordered / extended training files), unseen answers are counted, other question
types get their own row, and every file a run writes is strict JSON."""
import json
import os
import shutil

import pytest

from avstfp_fast.train.avqa_synthetic import make_synthetic_avqa
from avstfp_fast.train.cli import main

SMALL = ["--synthetic-train", "4", "--synthetic-val", "2", "--synthetic-test", "2",
         "--batch-size", "8", "--no-progress", "--threads", "1", "--backend", "torch",
         "--n-spatial", "4", "--head-hidden", "32"]


def strict_json(path):
    """json.load that refuses NaN / Infinity (not JSON)."""
    def bad(x):
        raise ValueError(f"{path}: non-JSON constant {x}")
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line, parse_constant=bad) for line in f]
        return json.load(f, parse_constant=bad)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # same shape as test_predict's fixture on purpose: another task, data and trainer entry
    base = tmp_path_factory.mktemp("avqa_eval")
    root = str(base / "data")
    make_synthetic_avqa(root, n_train=4, n_val=2, n_test=2, hop=1, seed=3)
    out = str(base / "run")
    assert main(["--task", "synthetic_avqa", "--data-root", root, "--out", out,
                 "--epochs", "1"] + SMALL) == 0
    return root, out


def _copy_data(root, dst, edit_train=None, edit_val=None):
    shutil.copytree(root, dst)
    for name, edit in (("avqa-train.json", edit_train), ("avqa-val.json", edit_val)):
        if edit is not None:
            p = os.path.join(dst, name)
            rows = json.load(open(p))
            json.dump(edit(rows), open(p, "w"))
    return str(dst)


def _final(run):
    return {r["split"]: r for r in strict_json(os.path.join(run, "metrics.jsonl"))
            if r["kind"] == "final_eval"}


def _eval(root, ckpt, out, extra=()):
    return main(["--task", "synthetic_avqa", "--data-root", root, "--out", out,
                 "--eval-only", "--resume", ckpt, "--no-progress", "--threads", "1",
                 "--backend", "torch", *extra])


def _eval_edited_val(trained, tmp_path, capsys, edit):
    """Evaluate the trained best.pt on a copy of the data whose val rows ``edit`` changed:
    (output folder, what it printed)."""
    root, run = trained
    data = _copy_data(root, tmp_path / "data", edit_val=edit)
    out = str(tmp_path / "eval")
    assert _eval(data, os.path.join(run, "checkpoints", "best.pt"), out) == 0
    return out, capsys.readouterr().out


def _add_word(rows):
    rows = [dict(r) for r in rows]
    rows[0]["question_content"] = "Honestly " + rows[0]["question_content"]
    return rows


def test_eval_uses_the_checkpoints_vocabulary_not_the_training_file_order(trained, tmp_path,
                                                                         capsys):
    root, run = trained
    best = os.path.join(run, "checkpoints", "best.pt")
    want = _final(run)
    # the same questions in reversed order, and one extra training word in front: the
    # checkpoint's vocabulary is used, so every number is the training run's
    for name, edit in (("reversed", lambda rows: rows[::-1]),
                       ("extended", lambda rows: _add_word(rows)[::-1])):
        data = _copy_data(root, tmp_path / f"data_{name}", edit_train=edit)
        out = str(tmp_path / f"eval_{name}")
        assert _eval(data, best, out) == 0, name
        got = _final(out)
        for split in ("val", "test"):
            keys = [k for k in want[split] if k not in ("time",)]
            assert {k: got[split][k] for k in keys} == {k: want[split][k] for k in keys}, name
    printed = capsys.readouterr().out
    assert "1 word(s) not in the checkpoint's vocabulary ('Honestly')" in printed


def test_resume_refuses_a_training_file_with_new_words_or_answers(trained, tmp_path, capsys):
    root, run = trained
    last = os.path.join(run, "checkpoints", "last.pt")

    def new_answer(rows):
        rows = [dict(r) for r in rows]
        rows[0]["anser"] = "seventeen"
        return rows
    for name, edit, want in (("word", _add_word, "('Honestly')"),
                             ("answer", new_answer, "('seventeen')")):
        data = _copy_data(root, tmp_path / f"data_{name}", edit_train=edit)
        out = str(tmp_path / f"resume_{name}")
        rc = main(["--task", "synthetic_avqa", "--data-root", data, "--out", out,
                   "--resume", last, "--epochs", "2"] + SMALL)
        err = capsys.readouterr().err
        assert rc == 2, name
        line = [x for x in err.splitlines() if x.startswith("avstfp-train: error:")]
        assert len(line) == 1 and want in line[0] and "Traceback" not in err, err
    # the same file in another order resumes fine
    data = _copy_data(root, tmp_path / "data_rev", edit_train=lambda rows: rows[::-1])
    assert main(["--task", "synthetic_avqa", "--data-root", data, "--out",
                 str(tmp_path / "resume_rev"), "--resume", last, "--epochs", "2"] + SMALL) == 0


def test_unseen_answers_are_counted_at_load_in_the_table_and_summary(trained, tmp_path,
                                                                     capsys):
    def unseen(rows):
        rows = [dict(r) for r in rows]
        rows[0]["anser"] = "banjo"
        rows[1]["anser"] = "banjo"
        return rows
    out, printed = _eval_edited_val(trained, tmp_path, capsys, unseen)
    assert "avqa val: " in printed and "2 with an answer never seen in training" in printed
    assert "'banjo'" in printed
    assert "val unseen answers" in printed and "2 questions (scored wrong)" in printed
    s = strict_json(os.path.join(out, "summary.json"))
    assert s["val_unseen_answers"] == 2 and s["test_unseen_answers"] == 0
    assert _final(out)["val"]["unseen_answers"] == 2


def test_other_question_types_get_their_own_row_and_files_are_strict_json(trained, tmp_path,
                                                                          capsys):
    def retype(rows):
        rows = [dict(r) for r in rows]
        rows[0]["type"] = '["Audio", "Rhythm"]'
        return rows
    out, printed = _eval_edited_val(trained, tmp_path, capsys, retype)
    assert "val Other types" in printed
    final = _final(out)
    assert final["val"]["n_other"] == 1
    n_rows = sum(final["val"][k] for k in final["val"]
                 if k.startswith("n_") and not k.endswith(("avg", "overall")))
    assert n_rows == final["val"]["n_overall"]        # every question is in some row
    # every JSON file the runs wrote parses strictly (no NaN: empty groups are null)
    for folder in (trained[1], out):          # the training run and this evaluation
        for f in os.listdir(folder):
            if f.endswith((".json", ".jsonl")):
                strict_json(os.path.join(folder, f))
    assert final["val"]["visual_counting"] is None or isinstance(
        final["val"]["visual_counting"], float)


@pytest.mark.parametrize("which", ["best.prompts.safetensors", "best.pt"])
def test_avstfp_predict_answers_an_avqa_json_like_the_trainer_scores_it(trained, tmp_path,
                                                                       which, capsys):
    from avstfp_fast.predict.cli import main as predict_main
    root, run = trained
    out = str(tmp_path / "answers")
    model = os.path.join(run, "checkpoints", which)
    assert predict_main([model, "--questions", os.path.join(root, "avqa-val.json"), "--out",
                         out, "--no-progress", "--backend", "torch", "--device", "cpu"]) == 0
    answers = strict_json(os.path.join(out, "answers.json"))
    rows = json.load(open(os.path.join(root, "avqa-val.json")))
    assert sorted(a["question_id"] for a in answers) == sorted(str(r["question_id"])
                                                               for r in rows)
    assert all(set(a) >= {"answer", "true_answer", "correct", "type"} for a in answers)
    assert open(os.path.join(out, "answers.csv")).readline().startswith("question_id,")
    ev = strict_json(os.path.join(out, "run.json"))["evaluation"]
    want = _final(run)["val"]
    assert ev["overall"] == want["overall"] and ev["n_overall"] == want["n_overall"]
    assert sum(a["correct"] for a in answers) == round(want["overall"] * want["n_overall"])
    assert "Overall avg" in capsys.readouterr().out


def test_a_bad_video_shared_by_questions_counts_once_and_warns_once(trained, tmp_path,
                                                                     caplog):
    import logging
    root, _ = trained
    data = _copy_data(root, tmp_path / "data")
    rows = json.load(open(os.path.join(data, "avqa-train.json")))
    vid = rows[0]["video_id"]
    n_q = sum(r["video_id"] == vid for r in rows)
    assert n_q > 1
    with open(os.path.join(data, "videos", vid + ".mp4"), "wb") as f:
        f.write(os.urandom(2000))
    caplog.set_level(logging.WARNING)
    out = str(tmp_path / "run")
    assert main(["--task", "synthetic_avqa", "--data-root", data, "--out", out,
                 "--epochs", "1", "--no-final-eval"] + SMALL) == 0
    s = strict_json(os.path.join(out, "summary.json"))
    assert s["skipped_train_files"] == 1
    warns = [r for r in caplog.records if vid in r.getMessage() and "skipping" in r.getMessage()]
    assert len(warns) == 1
