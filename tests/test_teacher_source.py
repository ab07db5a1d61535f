"""A new kind of teacher is one class: this file adds one (a teacher that knows the labels)
by implementing ``TeacherSource`` here alone, and distils a student from it."""
import json

import torch
import torch.nn.functional as F

from kdistill.config import build_config
from kdistill.engine.distill import DistillConfig, distill
from kdistill.methods.teachers import TeacherSource, TeacherView
from kdistill.models.checkpoint import read_meta


class OracleTeacher(TeacherSource):
    """Toy kind: logits ``sharpness * one_hot(label)``, i.e. label smoothing by temperature.
    Runs no model, so it has no resolution and gives no agreement."""

    kind = "oracle"

    def __init__(self, num_classes: int, sharpness: float = 4.0) -> None:
        super().__init__()
        self.num_classes, self.sharpness = num_classes, sharpness
        self.calls = 0

    def views(self, batch: dict) -> list[TeacherView]:
        self.calls += 1
        y = batch["target"]
        return [TeacherView(self.sharpness * F.one_hot(y, self.num_classes).float())]

    def describe(self) -> list[dict]:
        return [{"teacher": self.kind, "sharpness": self.sharpness}]


def test_a_toy_teacher_kind_distils_a_student(tiny_root, tmp_path):
    out = tmp_path / "oracle"
    cfg = build_config(DistillConfig, overrides=[
        f"data.root={tiny_root}", "model.name=resnet8", "train.epochs=2", "train.batch_size=16",
        f"train.out={out}", "data.workers=0", "train.progress=false", "distill.losses=[kd:1.0]",
        "optim.lr=0.05"])
    teacher = OracleTeacher(3)
    summary = distill(cfg, teacher=teacher)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and teacher.calls >= 2
    assert rows[0]["train.kd"] > 0 and rows[1]["train.kd"] < rows[0]["train.kd"]
    assert "val.agreement" not in rows[0]  # runs no model: nothing to agree with
    assert summary["teachers"] == [{"teacher": "oracle", "sharpness": 4.0}]
    assert read_meta(out / "best.safetensors")["teachers"][0]["teacher"] == "oracle"


def test_the_toy_kind_gives_the_kd_term_its_logits():
    """The method combines loss terms over the source's views, whatever the kind."""
    from kdistill.data.transforms import Preprocess, Preprocessing
    from kdistill.losses import LOSSES, LossInputs, Shapes, build_loss
    from kdistill.methods.distill import Distill, LossBank, TermSpec
    from kdistill.models import create_model

    terms = [TermSpec("kd", 1.0)]
    bank = LossBank({"kd": build_loss("kd", Shapes(3))})
    m = Distill(create_model("resnet8", 3), Preprocess(Preprocessing(32, [0.5] * 3, [0.25] * 3)),
                OracleTeacher(3), terms, bank).eval()
    y = torch.tensor([0, 2, 1, 2])
    out = m({"image": torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), "target": y})
    want = LOSSES.get("kd").cls(None)(LossInputs(out["logits"].detach(), 4.0 * F.one_hot(y, 3).float()))
    torch.testing.assert_close(out["kd"].detach(), want)
