"""Evaluation metrics against hand-computed values."""
import math

import torch
from torch import nn

from kdistill.data.transforms import Preprocess, Preprocessing
from kdistill.engine.evaluate import Accumulator, evaluate, metrics_from_confusion


def test_mpa_on_imbalanced_toy_set():
    # class 0: 8 images, 6 right; class 1: 2 images, 1 right; class 2: none.
    cm = torch.tensor([[6, 2, 0], [1, 1, 0], [0, 0, 0]])
    top1, mpa, per_class = metrics_from_confusion(cm)
    assert top1 == 7 / 10                      # micro: dominated by the big class
    assert mpa == (6 / 8 + 1 / 2) / 2          # macro over classes that occur = 0.625
    assert per_class[:2] == [0.75, 0.5] and math.isnan(per_class[2])


def test_accumulator_top1_top5_mpa_loss():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.03, 0.02],   # true 0: top1 hit
                          [0.1, 0.2, 0.3, 0.15, 0.15, 0.10],   # true 5: rank 6 -> top5 miss
                          [0.1, 0.5, 0.2, 0.1, 0.05, 0.05],    # true 2: rank 2 -> top5 hit
                          [0.05, 0.05, 0.1, 0.6, 0.1, 0.1]])   # true 3: hit
    target = torch.tensor([0, 5, 2, 3])
    acc = Accumulator(6, torch.device("cpu"))
    acc.update(probs[:2], target[:2])
    acc.update(probs[2:], target[2:])
    r = acc.compute()
    assert r.n == 4 and r.top1 == 0.5 and r.top5 == 0.75
    assert r.mpa == (1 + 0 + 0 + 1) / 4
    expected_nll = -(math.log(0.7) + math.log(0.1) + math.log(0.2) + math.log(0.6)) / 4
    assert abs(r.loss - expected_nll) < 1e-5


class _Fixed(nn.Module):
    """Predicts class = mean pixel bucket, so results are known in advance."""

    def forward(self, x):
        v = x.mean((1, 2, 3))
        return torch.stack([-(v - c).abs() * 50 for c in (0.0, 0.5, 1.0)], 1)


def test_evaluate_loop_and_tta():
    imgs = torch.tensor([0, 0, 128, 255, 255, 255], dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 3, 8, 8)
    target = torch.tensor([0, 1, 1, 2, 2, 0])
    loader = [{"image": imgs[:3], "target": target[:3], "skipped": []},
              {"image": imgs[3:], "target": target[3:], "skipped": ["bad.jpg"]}]
    prep = Preprocess(Preprocessing(8, [0.0] * 3, [1.0] * 3))  # pixel scaling only
    r = evaluate(_Fixed(), prep, loader, 3, torch.device("cpu"))
    assert r.n == 6 and r.top1 == 4 / 6 and r.extra["skipped"] == 1
    assert abs(r.mpa - (1 / 2 + 1 / 2 + 1) / 3) < 1e-9
    r_tta = evaluate(_Fixed(), prep, loader, 3, torch.device("cpu"), tta=True)
    assert r_tta.top1 == r.top1  # constant images: every TTA view agrees
