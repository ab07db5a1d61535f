"""ONNX Runtime is imported with its telemetry uploader off (issue 25 item 8).

The Linux wheels (1.29 on) start Microsoft's 1DS uploader at ``import onnxruntime`` (a worker
thread; at exit an HTTP thread and resolver threads, while the interpreter is torn down).
kdistill imports it only through ``kdistill.models.onnx.import_onnxruntime``, which sets
``ORT_DISABLE_TELEMETRY=1`` first, so that no rank or test process has one."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytest.importorskip("onnxruntime")

PKG = ROOT / "kdistill"
# ORT reads these at its first import; the child starts without any of them
OPT_OUTS = ("ORT_DISABLE_TELEMETRY", "ORT_RUNNING_UNIT_TESTS", "CI", "GITHUB_ACTIONS", "JENKINS_URL")
THREADS = """
import glob, sys
import torch  # torch's own threads start here, before the count
from kdistill.models import onnx
count = lambda: len(glob.glob("/proc/self/task/*"))
before = count()
ort = {how}
print(before, count(), ort.__name__)
"""


def threads_around_import(how: str, **env: str) -> tuple[int, int]:
    """The child's thread count before and after importing onnxruntime by ``how``."""
    base = {k: v for k, v in os.environ.items() if k not in OPT_OUTS}
    proc = subprocess.run([sys.executable, "-c", THREADS.format(how=how)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120,
                          env={**base, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after, name = proc.stdout.split()
    assert name == "onnxruntime"
    return int(before), int(after)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_import_onnxruntime_starts_no_telemetry_thread():
    before, after = threads_around_import("onnx.import_onnxruntime()")
    assert after == before, f"{after - before} thread(s) started by importing onnxruntime"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_the_thread_check_sees_the_uploader_of_a_plain_import():
    """The check above can fail: a plain import, or an explicit opt-in, starts the uploader
    (skipped for an onnxruntime built without telemetry)."""
    before, after = threads_around_import("__import__('onnxruntime')")
    if after == before:
        pytest.skip("this onnxruntime starts no telemetry thread")
    assert threads_around_import("onnx.import_onnxruntime()", ORT_DISABLE_TELEMETRY="0") == (before, after)


def test_the_environment_opts_out_before_the_first_import(monkeypatch):
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "unset")  # so that the teardown restores the original
    monkeypatch.delenv("ORT_DISABLE_TELEMETRY")
    from kdistill.models.onnx import import_onnxruntime

    assert import_onnxruntime().__name__ == "onnxruntime"
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "1"
    monkeypatch.setenv("ORT_DISABLE_TELEMETRY", "0")  # a user's opt-in stays
    import_onnxruntime()
    assert os.environ["ORT_DISABLE_TELEMETRY"] == "0"


def test_kdistill_imports_onnxruntime_only_through_import_onnxruntime():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "onnxruntime" or n.startswith("onnxruntime.") for n in names) and \
                    path != PKG / "models" / "onnx.py":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bad, "import onnxruntime through kdistill.models.onnx.import_onnxruntime():\n" + "\n".join(bad)
