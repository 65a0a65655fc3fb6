"""What the Triton kernels share: picking a kernel's flavour, the dispatch rule, in-place gradient
scaling, and the autograd wiring of a loss whose gradient is computed in its forward pass.

A fused loss here is a `torch.library.custom_op` returning (per-row losses, gradient, report): the
gradient with respect to the student is computed in the forward, already multiplied by the
reduction's row scale, and `register_gradient_in_forward` makes its backward multiply that buffer
in place by the incoming gradient (`scale_grad_rows`): no second (N, V) tensor, and for
`loss.backward()` through a mean or a sum (an incoming 1) no bytes moved at all. The report is an
(N,) int8 per-row code of bad teacher inputs that `check_teacher_report` turns into errors without
a host synchronisation on CUDA.
"""

import contextlib
import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from mtkd.kernels.reference import check_value

# Interpreter quirk (TRITON_INTERPRET): tl.sum, tl.max (and tl.zeros) are @triton.jit functions,
# compiled or interpreted as decided when triton.language was imported, so under an interpreter
# switched on later (per test) calling them fails. The builtin tl.reduce with the very combine
# functions they use is the same reduction when compiled, and the interpreter recognises these
# combine functions and runs numpy's sum / max. (Private names: recheck on a triton upgrade.)
SUM = tl.standard._sum_combine
MAX = tl.standard._elementwise_max


@triton.jit
def _scale_grad_kernel(
    grad_ptr,  # (N, V) contiguous gradient from the forward, scaled in place
    grad_out_ptr,  # (N,) incoming gradient of the per-row losses
    stride_go,  # elements between two incoming gradients (0 when expanded from a scalar)
    V,  # number of classes
    BLOCK_V: tl.constexpr,  # classes per block
):
    row = tl.program_id(0).to(tl.int64)
    go = tl.load(grad_out_ptr + row * stride_go)
    # loss.backward() through a mean or a sum sends exactly 1: such rows are already right.
    if go != 1.0:
        grad_row = grad_ptr + row * V
        for v0 in range(0, V, BLOCK_V):
            cols = (v0 + tl.arange(0, BLOCK_V)).to(tl.int64)
            g = tl.load(grad_row + cols, mask=cols < V, other=0.0)
            g = g.to(go.dtype) * go
            if grad_ptr.dtype.element_ty != tl.float64:
                g = g.to(tl.float32)  # interpreter quirk: fp64 -> bf16 casts reinterpret bits
            tl.store(grad_row + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < V)


@functools.cache
def _rejit(fn, interpret: bool):
    # `interpret` is only part of the cache key: triton.jit reads TRITON_INTERPRET itself, now.
    return triton.jit(fn)


def launchable(kernel):
    """`kernel` in the flavour TRITON_INTERPRET asks for now, not the one it had at import.

    triton.jit picks compiled (JITFunction) or interpreted (InterpretedFunction) when it decorates,
    i.e. when this module is imported; tests switch the interpreter on per test with the
    environment variable, so the other flavour is made from the same Python function on demand.
    Neither kernel calls another @triton.jit function, whose flavour would be frozen at import.
    """
    compiled = isinstance(kernel, triton.runtime.JITFunction)
    if compiled != bool(triton.knobs.runtime.interpret):
        return kernel
    return _rejit(kernel.fn, not compiled)


@torch.compiler.assume_constant_result
def _interpreter_on() -> bool:
    # Read through triton's own knob, so "1", "true", "on" mean what they mean to triton.
    # assume_constant_result: torch.compile cannot trace the C getenv behind the knob, so a
    # compiled graph keeps the answer it was traced with (CPU tensors only; CUDA never asks).
    return bool(triton.knobs.runtime.interpret)


def runs_triton(tensor: Tensor) -> bool:
    """True when `tensor` takes the Triton kernel: CUDA, or CPU with TRITON_INTERPRET=1 set now."""
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and _interpreter_on()


def device_of(tensor: Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def scale_grad_rows(grad: Tensor, grad_rows: Tensor) -> None:
    """grad[n] *= grad_rows[n] in place (grad: contiguous (N, V); grad_rows: (N,), any stride)."""
    N = grad_rows.shape[0]
    if N == 0 or grad.numel() == 0:
        return
    if not runs_triton(grad):
        # The interpreter was switched off between forward and backward: same result in PyTorch.
        grad.copy_(grad.to(grad_rows.dtype) * grad_rows[:, None])
        return
    V = grad.shape[1]
    kernel = launchable(_scale_grad_kernel)
    with device_of(grad):
        kernel[(N,)](grad, grad_rows, grad_rows.stride(0), V, BLOCK_V=min(next_pow2(V), 4096),
                     num_warps=4, enable_fp_fusion=True)


@torch.library.custom_op("mtkd::scale_grad_rows", mutates_args=("grad",))
def _scale_grad_op(grad: Tensor, grad_rows: Tensor) -> None:
    scale_grad_rows(grad, grad_rows)


@_scale_grad_op.register_fake
def _scale_grad_op_fake(grad, grad_rows):
    return None




def register_gradient_in_forward(op, num_inputs: int) -> None:
    """Autograd for a loss op returning (rows, grad, report) whose last input is `need_grad` and
    whose first input is the student: the backward scales `grad` in place by the incoming
    gradient of the rows and hands it to the student."""

    def setup_context(ctx, inputs, output):
        _, grad, report = output
        ctx.need_grad = inputs[-1]
        ctx.mark_non_differentiable(grad, report)
        ctx.save_for_backward(grad)

    def backward(ctx, grad_rows, _grad, _report):
        (grad,) = ctx.saved_tensors
        if not ctx.need_grad or grad_rows is None:
            return (None,) * num_inputs
        # In place: the forward's buffer becomes the student's gradient, no second (N, V) tensor.
        # A second backward through a retained graph then fails loudly (the saved tensor changed).
        _scale_grad_op(grad, grad_rows)
        return (grad,) + (None,) * (num_inputs - 1)

    op.register_autograd(backward, setup_context=setup_context)


def refuse_forward_ad(tensor: Tensor, name: str) -> None:
    """Raise if forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) reaches a kernel, which
    has no forward-mode derivative: autograd would otherwise return a zero tangent silently."""
    if torch.compiler.is_compiling():
        return
    from torch._C._functorch import TransformType
    from torch._functorch import pyfunctorch

    in_jvp = any(i.key() == TransformType.Jvp
                 for i in pyfunctorch.retrieve_all_functorch_interpreters())
    dual = torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None
    if in_jvp or dual:
        raise RuntimeError(f"{name}: forward-mode AD is not supported by the Triton kernel "
                           "(use reverse mode, or the reference in mtkd.kernels.reference)")


# Codes of a kernel's per-row report (0: nothing wrong), and the error each one raises.
BAD_NONFINITE = tl.constexpr(1)  # a NaN or +inf teacher input
BAD_EMPTY_TEACHER_ROW = tl.constexpr(2)  # "prob": a teacher with weight > 0 has no finite logit
BAD_EMPTY_LOGIT_MIX = tl.constexpr(3)  # "logit": every mixed logit is -inf


def check_teacher_report(report: Tensor, messages: dict) -> None:
    """Raise (CPU: ValueError now; CUDA: a device-side assert) for the first code in `messages`
    ({code: message}) that some row of `report` carries."""
    if report.numel() == 0:
        return
    for code, message in messages.items():
        check_value(~(report == code.value).any(), message)
