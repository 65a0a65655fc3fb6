"""What every kernel test compares with: one tolerance table by dtype, and a comparison that says
how many elements differ and where."""

import math

import pytest
import torch

# How far the kernel may be from the float64 reference, by the dtype of the result: twice the
# largest error PyTorch itself makes in that dtype (kd_loss_ref on the same inputs), plus rtol
# times each element's magnitude, plus atol times the size of the terms the result is made of
# (T^2 for losses, alpha * T for gradients, at least 1): the kernel computes in float32, so a
# probability near 1 may be off by an ulp or two even where the exact gradient is 0. Losses are
# float32 whatever the inputs. bf16's rtol is one bf16 ulp because under the interpreter fp32 ->
# bf16 rounds toward zero (compiled kernels round to nearest even: half that).
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-6),  # 1 / T reaches the kernel as a float32 argument
    torch.float32: dict(atol=5e-7, rtol=1e-6),
    torch.float16: dict(atol=5e-7, rtol=2**-11),
    torch.bfloat16: dict(atol=5e-7, rtol=2**-7),
}


def assert_close(name, actual, expected, baseline, dtype, size=1.0, roundings=1):
    """`actual` (the kernel) within TOLERANCES[dtype] of `expected` (float64 reference).

    `baseline` is PyTorch's answer in `dtype`; `size` scales atol (see TOLERANCES); `roundings`
    counts the kernel's roundings to `dtype` (rtol each). Non-finite reference entries must be
    matched exactly. On failure, says how many elements differ and where.
    """
    tol = TOLERANCES[dtype]
    atol = tol["atol"] * max(size, 1.0)
    rtol = tol["rtol"] * roundings
    actual, expected, baseline = (t.detach().double().cpu() for t in (actual, expected, baseline))
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    finite = torch.isfinite(expected)
    pytorch_error = 0.0
    if finite.any():
        pytorch_error = (baseline - expected)[finite].abs().nan_to_num(math.inf).max().item()
    bound = 2 * pytorch_error + atol + rtol * expected.abs()
    error = (actual - expected).abs()
    bad = torch.where(finite, ~(error <= bound), actual != expected)  # a NaN error counts as bad
    if bad.any():
        where = [tuple(i) for i in bad.nonzero().tolist()[:5]]
        detail = ", ".join(f"{i}: {actual[i].item():.6g} vs {expected[i].item():.6g}"
                           for i in where)
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {bad.numel()} elements differ by more than 2 x PyTorch's "
            f"error {pytorch_error:.3g} + atol {atol:g} + rtol {rtol:g} x |reference|; "
            f"first at {detail}"
        )


def loss_and_grad(fn, s, *teachers, grad_out=None, **kwargs):
    """fn(s, *teachers, **kwargs) and its gradient with respect to s (grad_out: the incoming
    gradient, 1 by default)."""
    s = s.detach().clone().requires_grad_()
    loss = fn(s, *teachers, **kwargs)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss)
    (grad,) = torch.autograd.grad(loss, s, g)
    return loss.detach(), grad




def make_sparse_inputs(K, N, V, k, dtype=torch.float32, lp_dtype=None, scale=3.0, extra_classes=0,
                       weights=None, labels="some", ids_dtype=torch.int64, temperature=1.0,
                       device="cpu"):
    """Student (N, V) and K top-k teachers as a sparse store gives them: ids (K, N, k) and exact
    log-probabilities at `temperature`, listed in a shuffled order. The teachers have
    V + extra_classes classes, so with extra_classes > 0 some listed ids lie at or beyond V.
    weights: None, "K" or "NK"; labels: None, "some" (row 1 unlabelled) or "all" (all unlabelled)."""
    s = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype).to(device)
    z = torch.randn(K, N, V + extra_classes, dtype=torch.float64) * scale
    top = torch.log_softmax(z / temperature, dim=-1).topk(k, dim=-1)
    order = torch.rand(K, N, k).argsort(dim=-1)
    ids = top.indices.gather(2, order).to(ids_dtype).to(device)
    logprobs = top.values.gather(2, order).to(lp_dtype or dtype).to(device)
    w = {None: None, "K": torch.rand(K) + 0.1, "NK": torch.rand(N, K)}[weights]
    if w is not None:
        w = w.to(device)
    y = None
    if labels is not None:
        y = torch.randint(0, V, (N,), device=device)
        if labels == "all":
            y[:] = -100
        elif N > 1:
            y[1] = -100
    return s, ids, logprobs, w, y


def compile_for_sm90(kernel, signature, constexprs, num_warps, fp_fusion=True):
    """Compile a @triton.jit function's Python source for an H100/H200 (sm_90) without a GPU."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    if not isinstance(triton.language.standard._sum_combine, triton.runtime.JITFunction):
        pytest.skip("triton was imported with TRITON_INTERPRET=1: no compiled kernels this process")
    fn = triton.runtime.JITFunction(kernel.fn)
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "enable_fp_fusion": fp_fusion})
    return compiled.asm["cubin"]
