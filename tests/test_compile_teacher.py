"""The compile teacher runtime: one graph per teacher whatever the batch size or the
caller's autocast state, parity at the run's batch size and precision, and failures that
say why (tested on the CPU with Dynamo's aot_eager backend)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from kdistill.data.transforms import Preprocessing
from kdistill.errors import TrainingError
from kdistill.methods import compiled
from kdistill.methods.teachers import FrozenTeachers, Teacher
from kdistill.models import create_model

CPU = torch.device("cpu")
PP = Preprocessing(32, [0.5] * 3, [0.25] * 3, 1.0)


@pytest.fixture(autouse=True)
def aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()


def _teacher(seed: int = 0) -> Teacher:
    torch.manual_seed(seed)
    return Teacher(create_model("resnet8", 3), PP, f"t{seed}")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_one_graph_per_teacher_over_batch_sizes_and_autocast(dtype, capsys):
    """The calls of one run: parity, training batches under autocast, the eval batch, the
    last partial batch, a batch of one; before, each added a Dynamo cache entry."""
    source = FrozenTeachers([_teacher(0), _teacher(1)])  # an ensemble of one architecture
    eager = list(source.teachers)
    start = counters["stats"]["unique_graphs"]
    compiled.compile_teachers(source, "compile", CPU, lambda: _images(8), dtype, batch_size=16)
    assert all(isinstance(t, compiled.CompiledTeacher) for t in source.teachers)
    err = capsys.readouterr().err
    assert "t0: compile runtime (1 graph compiled" in err and f"{'bf16' if dtype else 'fp32'})" in err
    for t, e in zip(source.teachers, eager):
        for n, cast in [(16, True), (16, False), (40, False), (5, True), (1, False)]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast and dtype is not None):
                out = t(_images(n, n))
            ref = e(_images(n, n)).softmax(-1)
            assert out.shape == (n, 3) and out.dtype is torch.float32 and not out.requires_grad
            torch.testing.assert_close(out.softmax(-1), ref, atol=2e-2 if dtype else 1e-4, rtol=0)
    assert [t.runner.graphs for t in source.teachers] == [1, 1]
    assert counters["stats"]["unique_graphs"] - start == 2
    assert "expected one per teacher" not in capsys.readouterr().err


class _Fixed(torch.nn.Module):
    def __init__(self, probs):
        super().__init__()
        self.logits = torch.tensor(probs).log()

    def forward(self, x):
        return self.logits.expand(len(x), -1)


@pytest.mark.parametrize("compiled_probs, ok", [
    ([0.4995, 0.5005, 0.0], True),  # a near-tie swapped within tolerance: a good compile
    ([0.6, 0.4, 0.0], False),  # off by 0.1
])
def test_parity_needs_top1_only_where_the_margin_is_clear(compiled_probs, ok):
    eager = Teacher(_Fixed([0.5005, 0.4995, 0.0]), PP, "e")
    other = Teacher(_Fixed(compiled_probs), PP, "c")
    check = compiled.parity(eager, other, _images(4), torch.bfloat16)
    assert check.ok is ok and check.tolerance == 2e-2 and check.decisive == 0 and check.n == 4
    strict = compiled.parity(eager, Teacher(_Fixed([0.5005, 0.4995, 0.0]), PP, "same"), _images(4))
    assert strict.ok and strict.tolerance == 1e-4 and strict.max_diff == 0


def test_parity_runs_at_the_training_batch_size(monkeypatch):
    seen = []
    real = compiled.parity
    monkeypatch.setattr(compiled, "parity", lambda e, c, x, d=None: seen.append(len(x)) or real(e, c, x, d))
    compiled.compile_teachers(FrozenTeachers([_teacher()]), "compile", CPU, lambda: _images(8), batch_size=24)
    assert seen == [24]


def test_out_of_memory_while_compiling_says_so_and_runs_eager(monkeypatch, capsys):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(compiled, "CompileRunner", oom)
    source = FrozenTeachers([_teacher()])
    compiled.compile_teachers(source, "compile", CPU, lambda: _images(4))
    assert not isinstance(source.teachers[0], compiled.CompiledTeacher)
    assert "out of GPU memory while compiling" in capsys.readouterr().err


def test_a_cuda_error_while_compiling_ends_the_run():
    with pytest.raises(TrainingError, match="CUDA error while compiling the teacher"):
        compiled._failure(RuntimeError("CUDA error: an illegal memory access was encountered"),
                          torch.device("cuda"))
    assert "illegal" in compiled._failure(RuntimeError("CUDA error: illegal"), CPU)  # not on a GPU
