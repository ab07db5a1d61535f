"""Training-step speed of the CIFAR ResNets with fp32 vs bf16 autocast, NCHW vs channels_last.

    .venv/bin/python bench/speed_amp.py [--batch 128] [--steps 5]

Random inputs, SGD step, one process; all four settings of a model are measured in the same
run, so the ratios are comparable even on a noisy machine.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_result, today, update_section  # noqa: E402

from kdistill.models import create_model  # noqa: E402


def step_rate(name: str, amp: bool, channels_last: bool, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = create_model(name, 10)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="resnet20,resnet56")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        rates = {(amp, cl): step_rate(name, amp, cl, args.batch, args.steps)
                 for amp in (False, True) for cl in (False, True)}
        base = rates[(False, False)]
        for (amp, cl), r in rates.items():
            rows.append({"model": name, "amp": amp, "channels_last": cl, "img_s": r, "speedup": r / base})
            print(f"{name} {'bf16' if amp else 'fp32'} {'channels_last' if cl else 'NCHW'}: {r:.0f} img/s "
                  f"({r / base:.2f}x)", flush=True)
    save_result("speed_amp", {"date": today(), "machine": machine(), "batch": args.batch, "rows": rows})
    from kdistill.engine import precision

    native = "native bf16" if precision.cpu_native_bf16() else "no native bf16: bf16 is emulated"
    lines = [f"Measured {today()} on {machine()}, CPU capability {precision.cpu_capability()} ({native}), "
             f"by `python bench/speed_amp.py` (train step, batch {args.batch}, random 32 px inputs):", "",
             "| model | precision | layout | img/s | vs fp32 NCHW |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'bf16 autocast' if r['amp'] else 'fp32'} | "
                     f"{'channels_last' if r['channels_last'] else 'NCHW'} | {r['img_s']:.0f} | {r['speedup']:.2f}x |")
    update_section("speed-amp", "## Mixed precision and memory layout (CPU)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
