"""Running the Triton path of the kernels on CPU in tests (Triton's interpreter).

Triton picks interpreter or compiler when a kernel is decorated, i.e. when ``triton`` (and our kernel modules) are
first imported, from ``TRITON_INTERPRET``. A test module sets ``TRITON_INTERPRET=1`` before its imports, which is
enough when it runs alone; in a full session something may have imported triton earlier (``import timm`` does).
Then the in-process Triton cases skip, and one test reruns them in a fresh interpreter process instead, so exactly
one of the two runs them. Name Triton cases ``test_triton_*`` and use:

    @pytest.fixture
    def triton_path(monkeypatch):
        enable_triton_path(monkeypatch)

    def test_triton_cases_in_fresh_process():
        run_triton_cases_in_fresh_process(__file__)
"""
import os
import subprocess
import sys

from .dispatch import HAS_TRITON, interpreter_active

_FRESH_PROCESS_TIMEOUT_S = 600


def enable_triton_path(monkeypatch):
    """Force ``EPIC_KERNELS=triton`` for one test; skip when the interpreter is not active in this process."""
    import pytest

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if not interpreter_active():
        pytest.skip("triton was imported before TRITON_INTERPRET=1; test_triton_cases_in_fresh_process runs this")
    monkeypatch.setenv("EPIC_KERNELS", "triton")


def run_triton_cases_in_fresh_process(test_file):
    """Run the ``triton`` cases of ``test_file`` in a new process with ``TRITON_INTERPRET=1`` (only when they could
    not run in this one) and fail with its output if any fails."""
    import pytest

    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if interpreter_active():
        pytest.skip("the Triton cases ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("EPIC_KERNELS", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton and not fresh_process",
           str(test_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=_FRESH_PROCESS_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-3000:]
