"""A new task plugs into the trainer through the Task interface alone: its own batch
format, loss and per-type metrics, with no edit to the loop."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from avstfp_fast.train import TrainConfig, train
from avstfp_fast.train import registry, tasks
from avstfp_fast.train.synthetic import make_synthetic_ave


class _PerTypeMetrics(tasks.Metrics):
    """Accuracy overall and per item type (event vs background seconds), the way a
    question-answering task reports accuracy per question type."""

    def __init__(self, background):
        self.background = background
        self.counts = torch.zeros(4, dtype=torch.float64)   # hits/n event, hits/n background

    def update(self, model, batch, ctx):
        a, v = (x.to(ctx.device) for x in batch["inputs"])
        with ctx.autocast():
            pred = model(a, v).float().argmax(-1).cpu()
        y = batch["target"]
        bg = y == self.background
        hit = pred == y
        self.counts += torch.tensor([float(hit[~bg].sum()), float((~bg).sum()),
                                     float(hit[bg].sum()), float(bg.sum())], dtype=torch.float64)

    def all_reduce(self):
        from avstfp_fast.train import ddp
        ddp.all_reduce(self.counts)

    def summary(self):
        c = self.counts.tolist()
        n = c[1] + c[3]
        return {"acc": (c[0] + c[2]) / n if n else float("nan"), "n": int(n),
                "acc_event": c[0] / c[1] if c[1] else float("nan"),
                "acc_background": c[2] / c[3] if c[3] else float("nan")}


class ToyTask(tasks.SyntheticAVETask):
    name = "toy_per_type"

    def collate(self, samples):
        b = super().collate(samples)          # re-shaped: another batch format
        inputs = None if b["audio"] is None else (b["audio"], b["video"])
        return {"inputs": inputs, "target": b["label"], "bad": b["bad"]}

    def is_empty(self, batch):
        return batch["inputs"] is None

    def train_loss(self, model, batch, ctx):
        a, v = (x.to(ctx.device) for x in batch["inputs"])
        y = batch["target"].to(ctx.device)
        with ctx.autocast():
            logits = model(a, v)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        correct = float((logits.detach().argmax(-1) == y).sum())
        return tasks.StepOutput(loss=loss, clips=a.shape[0], correct=correct, items=y.numel(),
                                log={"toy": 1})

    def new_metrics(self):
        return _PerTypeMetrics(self.classes.index("background"))

    def figures(self, summary, run_dir, split):
        return {}

    def summary_rows(self, result, split):
        return [(f"{split} acc", f"{result[f'{split}_acc']:.4f}"),
                (f"{split} acc on events", f"{result[f'{split}_acc_event']:.4f}")]


@pytest.fixture
def toy_task():
    registry.register_task(ToyTask)
    yield ToyTask
    del registry.TASKS[ToyTask.name]


def test_a_registered_task_trains_and_reports_its_own_metrics(toy_task, tmp_path):
    data = str(tmp_path / "data")
    make_synthetic_ave(data, n_events=2, n_train=4, n_val=2, n_test=0, seed=5)
    out = str(tmp_path / "run")
    res = train(TrainConfig(task="toy_per_type", backbone="tiny", backend="torch",
                            data_root=data, out=out, epochs=1, batch_size=2, num_workers=0,
                            visual_aug="none", progress=False, threads=1))
    assert res["status"] == "finished" and res["steps"] == 2
    assert {"val_acc", "val_acc_event", "val_acc_background", "val_n"} <= set(res)
    assert res["val_n"] == 20
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert all(r["toy"] == 1 for r in recs if r["kind"] == "step")
    ev = [r for r in recs if r["kind"] == "eval"]
    assert ev and {"acc_event", "acc_background"} <= set(ev[0])
    assert "val acc on events" in res["summary"]
    assert not os.path.exists(os.path.join(out, "confusion_val.png"))   # none drawn


def test_classification_metrics_count_top1_and_top5():
    """Confusion matrix and top-5 hits of known logits (clips are counted by the
    confusion matrix only: nothing else is accumulated)."""
    from avstfp_fast.train.tasks import ClassificationMetrics, StepContext
    logits = torch.tensor([[9., 8, 7, 6, 5, 4, 0],      # label 0: top-1
                           [9., 8, 7, 6, 5, 4, 0],      # label 4: top-5 only
                           [9., 8, 7, 6, 5, 4, 0]])     # label 6: neither
    m = ClassificationMetrics(7)
    batch = {"audio": torch.zeros(3, 1), "video": torch.zeros(3, 1),
             "label": torch.tensor([0, 4, 6])}
    m.update(lambda a, v: logits, batch, StepContext(device=torch.device("cpu")))
    m.all_reduce()                                        # no process group: unchanged
    s = m.summary()
    assert (s["n"], s["acc"], s["top5"]) == (3, 1 / 3, 2 / 3)
    assert int(s["confusion"].sum()) == 3


def test_prepare_data_returns_what_it_resolved_and_leaves_the_config_alone(tmp_path):
    """Data flows one way: the task keeps and returns its classes, splits and resolved
    root; the config is not written to (a synthetic task generates under the run folder)."""
    from avstfp_fast.train.registry import make_task
    cfg = TrainConfig(task="synthetic", backbone="tiny", synthetic_events=2, synthetic_train=2,
                      synthetic_val=1, synthetic_test=0)
    before = cfg.to_dict()
    task = make_task(cfg)
    data = task.prepare_data(str(tmp_path), 0)
    assert data.data_root == os.path.join(str(tmp_path), "synthetic_data")
    assert os.path.isfile(os.path.join(data.data_root, "Annotations.txt"))
    assert cfg.to_dict() == before and cfg.data_root is None
    assert task.classes is data.classes and task.splits is data.splits
    assert task.data_root == data.data_root and "background" in data.classes
    assert {"train", "val"} <= set(data.splits)


def test_a_task_for_a_trained_model_is_given_its_classes():
    """avstfp-predict evaluates with the trainer's task made with the model's classes
    (nothing writes them into a built task); an AVQA task takes a checkpoint's vocabulary
    and answers through restore, ready to rebuild the model without reading data."""
    from avstfp_fast.train.registry import make_task
    classes = ["a", "b", "background"]
    task = make_task(TrainConfig(task="ave"), classes)
    assert task.classes == classes and task.classes is not classes and task.num_classes == 3
    assert task.new_metrics().cm.shape == (3, 3)
    assert make_task(TrainConfig(task="avar")).classes == []
    avqa = make_task(TrainConfig(task="avqa"))
    avqa.restore({"vocabulary": ["<pad>", "<unk>", "what", "plays"], "answers": ["yes", "no"]},
                 resuming=False)
    assert avqa.vocab.words == ["<pad>", "<unk>", "what", "plays"]
    assert avqa.answers == avqa.classes == ["yes", "no"] and avqa.num_classes == 2
    with pytest.raises(ValueError, match="task: expected one of .*got 'nope'"):
        make_task(SimpleNamespace(task="nope"), classes)
