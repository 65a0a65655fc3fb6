"""Which implementation fused_kd_loss runs: TRITON_INTERPRET is read per call and never leaks.

The pipeline's tests train small students on CPU in the same pytest process as the kernel tests;
they must keep the fast reference path however many interpreter tests ran before them.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mtkd.kernels.kd_loss as kd_loss_module
from mtkd.kernels import fused_kd_loss, kd_loss_ref


@pytest.fixture
def kernel_launches(monkeypatch):
    """Counts launches of the Triton kernel (through the custom op's launcher)."""
    launches = []
    launcher = kd_loss_module.kd_loss_forward

    def counting_launcher(*args, **kwargs):
        launches.append(args[0].device)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(kd_loss_module, "kd_loss_forward", counting_launcher)
    return launches


def small_problem():
    s = torch.randn(3, 10, requires_grad=True)
    z = torch.randn(2, 3, 10)
    y = torch.tensor([1, -100, 4])
    return s, z, y


def test_cpu_without_interpreter_launches_no_kernel_and_matches_the_reference(monkeypatch, kernel_launches):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    s, z, y = small_problem()
    assert not kd_loss_module.runs_triton(s)
    loss = fused_kd_loss(s, z, labels=y, alpha=0.5)
    loss.backward()
    assert kernel_launches == []
    torch.testing.assert_close(loss, kd_loss_ref(s, z, labels=y, alpha=0.5))


def test_interpreter_switch_is_read_at_each_call(monkeypatch, kernel_launches):
    s, z, y = small_problem()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with np.errstate(all="ignore"):  # the interpreter's numpy meets log(0) and inf - inf
        with_kernel = fused_kd_loss(s, z, labels=y, alpha=0.5)
    assert len(kernel_launches) == 1
    monkeypatch.delenv("TRITON_INTERPRET")
    with_reference = fused_kd_loss(s, z, labels=y, alpha=0.5)
    assert len(kernel_launches) == 1
    torch.testing.assert_close(with_kernel, with_reference)


def test_interpreter_tests_leave_cpu_calls_on_the_reference(kernel_launches):
    """Runs after test_kd_loss.py's interpreter tests in one session (file order): nothing of
    them remains, neither the environment variable nor a cached choice of implementation."""
    assert os.environ.get("TRITON_INTERPRET", "0") != "1"
    s, z, y = small_problem()
    fused_kd_loss(s, z, labels=y).backward()
    assert kernel_launches == []


# Two fresh interpreters: TRITON_INTERPRET set before triton is imported (the kernels are then
# decorated as interpreted), and set only after the import (they are re-made for the call).
SCRIPT = r"""
import json, os, sys
import numpy as np
import torch
if sys.argv[1] == "after":
    import mtkd.kernels  # triton imported with the interpreter off
    os.environ["TRITON_INTERPRET"] = "1"
from mtkd.kernels import fused_kd_loss, kd_loss_ref
import mtkd.kernels.kd_loss as m

torch.manual_seed(0)
s = torch.randn(4, 37, requires_grad=True)
z = torch.randn(3, 4, 37)
y = torch.tensor([1, -100, 4, 36])
out = {}
with np.errstate(all="ignore"):
    loss = fused_kd_loss(s, z, labels=y, alpha=0.3, temperature=2.0)
    (grad,) = torch.autograd.grad(loss, s)
out["kernel_on_cpu"] = m.runs_triton(s)
ref = kd_loss_ref(s, z, labels=y, alpha=0.3, temperature=2.0)
(ref_grad,) = torch.autograd.grad(ref, s)
out["loss_error"] = (loss - ref).abs().item()
out["grad_error"] = (grad - ref_grad).abs().max().item()
del os.environ["TRITON_INTERPRET"]
out["kernel_after_unset"] = m.runs_triton(s)
print(json.dumps(out))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_interpreter_set_before_or_after_importing_triton(when):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if when == "before":
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT, when], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["kernel_on_cpu"] is True and out["kernel_after_unset"] is False
    assert out["loss_error"] < 1e-5 and out["grad_error"] < 1e-6, out


def test_without_triton_the_cpu_path_is_the_loss():
    """triton is Linux-only (pyproject): elsewhere mtkd.kernels still imports, on the CPU path."""
    script = (
        "import sys, torch; sys.modules['triton'] = None\n"  # import triton now fails
        "import mtkd.kernels as k\n"
        "from mtkd.kernels.dense_cpu import kd_loss_cpu\n"
        "assert k.fused_kd_loss is kd_loss_cpu, k.fused_kd_loss\n"
        "print(float(k.fused_kd_loss(torch.zeros(2, 3), torch.zeros(1, 2, 3))))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) == 0.0
