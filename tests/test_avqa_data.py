"""MUSIC-AVQA loading: official JSON, templates, vocabulary, sampling, negatives, metrics."""
import json
import os

import numpy as np
import pytest
import torch

from avstfp_fast.train.avqa_data import (QTYPES, AVQADataset, Vocabulary, avqa_splits,
                                         build_vocabulary, collate_avqa, question_words,
                                         read_avqa_json, sample_negatives)
from avstfp_fast.train.avqa_metrics import (REPORT_ROWS, avqa_report, format_avqa_table,
                                            new_counts, plot_avqa_bars, update_counts)
from avstfp_fast.train.synthetic import write_clip


def row(qid, vid, content, values, answer, qtype=("Audio", "Counting")):
    """One question in the official format (type and templ_values as strings)."""
    return {"video_id": vid, "question_id": qid, "type": json.dumps(list(qtype)),
            "question_content": content, "templ_values": json.dumps(values),
            "question_deleted": 0, "anser": answer}


def test_template_filling_and_question_mark():
    assert question_words("Is the <Object> louder than the <Object>?", '["cello", "flute"]') \
        == ["Is", "the", "cello", "louder", "than", "the", "flute"]
    # a python-literal list (as in the official files) and a real list both work
    assert question_words("Where is the <LR> <Object> ?", "['left', 'piano']")[-2:] == \
        ["left", "piano"]
    assert question_words("How many sounds?", []) == ["How", "many", "sounds"]
    with pytest.raises(ValueError, match="slot"):
        question_words("Is the <Object> here?", '["a", "b"]')
    with pytest.raises(ValueError, match="empty"):
        question_words(" ? ", "[]")


def test_read_json_counts_bad_rows(tmp_path):
    rows = [row(1, "v1", "Is the <Object> playing?", ["cello"], "yes"),
            row(2, "v1", "How many <Object> are there?", ["a", "b"], "two"),   # mismatch
            {"video_id": "v2", "question_id": 3, "anser": "no"},                # keys missing
            {**row(4, "v2", "Where?", [], "left"), "type": "not a list"},       # bad type
            row(5, "v2", "Which is first?", [], "left", qtype=("Audio-Visual", "Temporal")),
            row(6, "v3", "What else?", [], "three", qtype=("Visual", "Colour"))]  # other type
    p = tmp_path / "avqa-train.json"
    p.write_text(json.dumps(rows))
    got, bad = read_avqa_json(str(p))
    assert bad == 3
    assert [r.question_id for r in got] == ["1", "5", "6"]
    assert got[0].words == ("Is", "the", "cello", "playing")
    assert got[1].qtype == QTYPES.index(("Audio-Visual", "Temporal"))
    assert got[2].qtype == len(QTYPES)
    p.write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        read_avqa_json(str(p))
    with pytest.raises(FileNotFoundError):
        read_avqa_json(str(tmp_path / "nope.json"))


def test_vocabulary_padding_unknown_words_and_length_rule():
    v = Vocabulary(["How", "many", "How", "cello"])
    assert v.words == ["<pad>", "<unk>", "How", "many", "cello"] and len(v) == 5
    ids = v.encode(["How", "many", "violins"], max_len=5)
    assert ids.tolist() == [2, 3, 1, 0, 0] and ids.dtype == np.int64
    with pytest.raises(ValueError, match="max_len=2"):
        v.encode(["How", "many", "cello"], max_len=2)


def _layout(root, train, val, json_dir=""):
    d = os.path.join(root, json_dir)
    os.makedirs(d, exist_ok=True)
    for name, rows in (("avqa-train.json", train), ("avqa-val.json", val)):
        with open(os.path.join(d, name), "w") as f:
            json.dump(rows, f)


def test_splits_answers_vocab_and_missing_videos(tmp_path):
    train = [row(1, "a", "Is the <Object> playing?", ["cello"], "yes"),
             row(2, "b", "Is the <Object> playing?", ["flute"], "no"),
             row(3, "a", "How many instruments?", [], "two")]
    val = [row(4, "c", "Is the <Object> playing?", ["drum"], "yes"),
           row(5, "c", "How many instruments?", [], "seven")]
    _layout(str(tmp_path), train, val, json_dir="json")     # json/ subfolder is found
    os.makedirs(tmp_path / "videos")
    (tmp_path / "videos" / "a.mp4").write_bytes(b"")
    s = avqa_splits(str(tmp_path), max_len=6)
    assert s.answers == ["no", "two", "yes"]
    assert s.vocab.words[:2] == ["<pad>", "<unk>"] and "drum" not in s.vocab.index
    path, ans, vid, ids, qtype, qid = s.splits["val"][0]
    assert path.endswith(os.path.join("videos", "c.mp4")) and vid == "c" and qid == "4"
    assert ans == 2 and ids.tolist() == [s.vocab.index["Is"], s.vocab.index["the"], 1,
                                          s.vocab.index["playing"], 0, 0]
    assert s.splits["val"][1][1] == -1                   # answer unseen in training
    assert s.missing_videos == {"train": 1, "val": 2}
    assert "test" not in s.splits
    with pytest.raises(ValueError, match="max_len=3"):
        avqa_splits(str(tmp_path), max_len=3)
    with pytest.raises(FileNotFoundError, match="avqa-train.json"):
        avqa_splits(str(tmp_path / "videos"))


def test_vocabulary_is_built_from_training_questions_only():
    from avstfp_fast.train.avqa_data import QuestionRow
    rows = [QuestionRow("1", "v", ("Is", "it"), "yes", 0), QuestionRow("2", "v", ("It", "is"), "no", 0)]
    vocab, answers = build_vocabulary(rows)
    assert vocab.words == ["<pad>", "<unk>", "Is", "it", "It", "is"] and answers == ["no", "yes"]
    with pytest.raises(ValueError, match="no usable"):
        build_vocabulary([])


def test_dataset_samples_one_second_every_hop_and_skips_missing(tmp_path):
    """Second k of the clip has grey level 12k and audio amplitude ~ k: the dataset must
    keep seconds 0, hop, 2*hop, ... (frames and audio), and count a missing video."""
    hop, segs, fps, sr = 3, 4, 2, 16000
    n_sec = hop * segs
    frames = np.stack([np.full((64, 64, 3), 12 * (i // fps), np.uint8) for i in range(n_sec * fps)])
    t = np.arange(n_sec * sr) / sr
    wave = (0.02 + 0.02 * np.floor(t)) * np.sin(2 * np.pi * 440 * t)
    write_clip(str(tmp_path / "videos" / "v1.mp4"), frames, fps, wave.astype(np.float32), sr)
    train = [row(1, "v1", "How loud?", [], "x"), row(2, "gone", "How loud?", [], "y")]
    _layout(str(tmp_path), train, [])
    s = avqa_splits(str(tmp_path))
    ds = AVQADataset(s.splits["train"], image_size=32, segments=segs, hop=hop, cache=True)
    frames_sel, wave_sel = ds._decode(s.splits["train"][0][0])
    grey = frames_sel.reshape(segs, -1).mean(1)
    assert np.allclose(grey, 12 * hop * np.arange(segs), atol=3), grey
    rms = wave_sel.reshape(segs, sr).std(1)
    assert np.all(np.diff(rms) > 0.02 * hop * 0.5), rms        # amplitude grows by hop steps
    batch = collate_avqa([ds[0], ds[1]])
    assert batch["bad"] == [s.splits["train"][1][0]]
    assert batch["audio"].shape == (1, segs, 98, 128) and batch["video"].shape == (1, segs, 3, 32, 32)
    assert batch["question"].shape == (1, 14) and batch["qtype"].tolist() == [0]
    assert batch["id"] == ["v1"] and batch["qid"] == ["1"] and batch["label"].tolist() == [0]
    assert collate_avqa([ds[1]])["question"] is None
    with pytest.raises(ValueError, match="hop"):
        AVQADataset(s.splits["train"], image_size=32, hop=0)


def test_negatives_come_from_other_videos():
    rng = np.random.default_rng(0)
    vids = ["a", "a", "b", "c"]
    neg = sample_negatives(vids, 10, rng)
    assert neg.shape == (4, 10, 2) and neg.dtype == torch.long
    for i, v in enumerate(vids):
        assert all(vids[j] != v for j in neg[i, :, 0].tolist())
    assert int(neg[..., 1].min()) >= 0 and int(neg[..., 1].max()) < 10
    assert sample_negatives(["a", "a"], 10, rng) is None


def test_per_type_metric_arithmetic(tmp_path):
    c = new_counts()
    A_CNT, A_CMP, V_LOC, AV_TMP = (QTYPES.index(t) for t in (
        ("Audio", "Counting"), ("Audio", "Comparative"), ("Visual", "Location"),
        ("Audio-Visual", "Temporal")))
    OTHER = len(QTYPES)
    # audio counting 3/4, audio comparative 0/1, visual location 2/2, AV temporal 1/3, other 1/1
    qt = [A_CNT] * 4 + [A_CMP] + [V_LOC] * 2 + [AV_TMP] * 3 + [OTHER]
    ok = [1, 1, 1, 0] + [0] + [1, 1] + [1, 0, 0] + [1]
    update_counts(c, torch.tensor(qt[:5]), torch.tensor(ok[:5], dtype=torch.bool))
    update_counts(c, torch.tensor(qt[5:]), torch.tensor(ok[5:], dtype=torch.bool))
    r = avqa_report(c)
    assert r["audio_counting"] == 0.75 and r["audio_comparative"] == 0.0
    assert r["audio_avg"] == 3 / 5 and r["n_audio_avg"] == 5      # pooled, not mean of means
    assert r["visual_location"] == 1.0 and r["visual_counting"] is None
    assert r["visual_avg"] == 1.0 and r["n_visual_counting"] == 0
    assert r["av_temporal"] == 1 / 3 and r["av_avg"] == 1 / 3
    assert r["overall"] == 7 / 11 and r["n_overall"] == 11          # other types count too
    assert [k for k, _, _ in REPORT_ROWS][-2:] == ["other", "overall"] and len(REPORT_ROWS) == 14
    assert r["other"] == 1.0 and r["n_other"] == 1                  # other types: own row
    text = format_avqa_table(r, "test")
    assert "75.00% (4)" in text and "n/a (0)" in text and "Overall avg" in text
    assert "Other types" in text
    png = plot_avqa_bars(r, str(tmp_path / "bars.png"), "t")
    assert open(png, "rb").read(4) == b"\x89PNG"
    with pytest.raises(ValueError, match="qtype"):
        update_counts(c, torch.tensor([OTHER + 1]), torch.tensor([True]))
