"""fused_linear_sparse_kd_loss: the sparse loss on hidden @ weight.T + bias, in row chunks.

Gradients for hidden, weight and bias against the sparse reference on materialised logits, and the
peak memory measured on CPU against the size of one chunk.
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mtkd.kernels import fused_linear_sparse_kd_loss, kd_sparse_loss_ref
from mtkd.kernels.fused_linear import CPU_CHUNK_BYTES, default_chunk_rows
from tests.kernels.checks import make_sparse_inputs


def linear_inputs(N, H, V, K, k, dtype=torch.float64, bias=True, **kwargs):
    hidden = torch.randn(N, H, dtype=dtype)
    weight = torch.randn(V, H, dtype=dtype) / H**0.5 * 3
    b = torch.randn(V, dtype=dtype) if bias else None
    _, ids, lp, w, y = make_sparse_inputs(K, N, V, k, dtype, **kwargs)
    return hidden, weight, b, ids, lp, w, y


def grads_of(fn, hidden, weight, bias, grad_out=None):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    loss = fn(*leaves)
    g = torch.ones_like(loss) if grad_out is None else grad_out.to(loss)
    return (loss.detach(),) + torch.autograd.grad(loss, leaves, g)


def materialised(ids, lp, **kwargs):
    def fn(h, w, b=None):
        logits = h @ w.T if b is None else h @ w.T + b
        return kd_sparse_loss_ref(logits, ids, lp, **kwargs)
    return fn


def fused(ids, lp, chunk_rows=None, **kwargs):
    def fn(h, w, b=None):
        return fused_linear_sparse_kd_loss(h, w, ids, lp, bias=b, chunk_rows=chunk_rows, **kwargs)
    return fn


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 64, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradients_for_hidden_weight_and_bias(reduction, chunk_rows):
    N, H, V, K, k = 7, 5, 23, 2, 4
    hidden, weight, bias, ids, lp, w, y = linear_inputs(N, H, V, K, k, weights="NK",
                                                        extra_classes=3)
    mask = torch.arange(N) != 4
    kwargs = dict(weights=w, labels=y, alpha=0.6, temperature=1.7, reduction=reduction, mask=mask)
    grad_out = torch.linspace(-1.0, 2.0, N, dtype=torch.float64) if reduction == "none" \
        else torch.tensor(2.5, dtype=torch.float64)
    got = grads_of(fused(ids, lp, chunk_rows, **kwargs), hidden, weight, bias, grad_out)
    expected = grads_of(materialised(ids, lp, **kwargs), hidden, weight, bias, grad_out)
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_without_bias_and_in_float32():
    hidden, weight, _, ids, lp, _, y = linear_inputs(9, 6, 17, 3, 5, torch.float32, bias=False)
    kwargs = dict(labels=y, alpha=0.5)
    got = grads_of(fused(ids, lp, 4, **kwargs), hidden, weight, None)
    expected = grads_of(materialised(ids, lp, **kwargs), hidden, weight, None)
    for a, b in zip(got, expected):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_only_the_tensors_that_need_it_get_gradients():
    hidden, weight, bias, ids, lp, _, _ = linear_inputs(5, 4, 9, 1, 3)
    weight.requires_grad_()
    loss = fused_linear_sparse_kd_loss(hidden, weight, ids, lp, bias=bias)
    loss.backward()
    assert weight.grad is not None and hidden.grad is None and bias.grad is None
    with torch.no_grad():
        assert not fused_linear_sparse_kd_loss(hidden, weight, ids, lp).requires_grad


def test_default_chunk_is_about_the_hidden_states_size():
    assert default_chunk_rows(8192, 128256, 4096) == 256  # 256 x 128256 ~ 8192 x 4096
    assert default_chunk_rows(10, 50, 8) == 2
    assert default_chunk_rows(3, 2, 8) == 4


def test_on_the_cpu_a_chunk_is_sixteen_mib_of_logits_not_the_gpu_rule():
    assert default_chunk_rows(2048, 2048, 32, "cpu") == 2048  # the GPU rule: 32 rows
    assert default_chunk_rows(8192, 128256, 4096, "cpu") == CPU_CHUNK_BYTES // (4 * 128256) == 32
    assert default_chunk_rows(10, 50, 8, "cpu") == 10  # never more rows than there are
    assert default_chunk_rows(4, 10**8, 8, "cpu") == 1


@pytest.mark.parametrize("change, error, word", [
    (dict(weight=torch.randn(9, 3)), ValueError, "weight"),
    (dict(weight=torch.randn(9, 4, dtype=torch.float32)), ValueError, "weight"),
    (dict(bias=torch.randn(8, dtype=torch.float64)), ValueError, "bias"),
    (dict(chunk_rows=0), ValueError, "chunk_rows"),
    (dict(hidden=torch.randn(5, 4, 1, dtype=torch.float64)), TypeError, "hidden"),
    (dict(teacher_ids=torch.zeros(1, 6, 3, dtype=torch.long)), ValueError, "teacher_ids"),
])
def test_bad_arguments_are_refused_by_name(change, error, word):
    hidden, weight, bias, ids, lp, _, _ = linear_inputs(5, 4, 9, 1, 3)
    args = dict(hidden=hidden, weight=weight, teacher_ids=ids, teacher_logprobs=lp, bias=bias)
    args.update(change)
    with pytest.raises(error, match=word):
        fused_linear_sparse_kd_loss(**args)


def peak_bytes(fn):
    """Peak of the bytes that CPU tensors allocated while `fn` runs hold at once, above what was
    held when it started: from the allocator's own alloc/free events as torch.profiler records
    them (profile_memory=True), summed in time order. Every CPU allocation of every op counts,
    temporaries inside ops included."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_peak_memory_is_about_one_chunk_not_the_logits():
    """Forward and backward together. What must be allocated whatever the method: the gradients
    returned (hidden, weight, bias). Beyond those the fused loss holds one chunk's temporaries: on
    this CPU path the reference's, with autograd (the chunk's logits, their tempered copy,
    log-softmax, one teacher's listed-class mask and tail, the gradient): measured here at about
    10.5 chunks' bytes, whatever N; materialising holds the (N, V) logits several times over."""
    N, H, V, K, k, chunk = 512, 32, 4096, 2, 8, 16
    hidden, weight, bias, ids, lp, _, y = linear_inputs(N, H, V, K, k, torch.float32)
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    kwargs = dict(labels=y, alpha=0.5)

    def run(fn):
        def step():
            loss = fn(*leaves)
            loss.backward()
        for t in leaves:
            t.grad = None
        return peak_bytes(step)

    fused_peak = run(fused(ids, lp, chunk, **kwargs))
    full_peak = run(materialised(ids, lp, **kwargs))
    logits_bytes = N * V * 4
    chunk_bytes = chunk * V * 4
    grads_bytes = sum(t.numel() * 4 for t in leaves)
    beyond = fused_peak - grads_bytes
    assert beyond <= 12 * chunk_bytes, (fused_peak, grads_bytes, chunk_bytes)
    assert full_peak > 2 * logits_bytes, (fused_peak, full_peak)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_gradients(triton_interpreter, dtype, reduction):
    """Under the interpreter each chunk runs the Triton kernel, its gradient written over the
    chunk's logits; against the float64 reference on materialised logits."""
    N, H, V, K, k = 9, 6, 40, 2, 5
    hidden, weight, bias, ids, lp, w, y = linear_inputs(N, H, V, K, k, weights="NK",
                                                        extra_classes=3)
    mask = torch.arange(N) != 2
    kwargs = dict(weights=w, labels=y, alpha=0.6, temperature=2.0, reduction=reduction, mask=mask)
    grad_out = torch.linspace(-1.0, 2.0, N) if reduction == "none" else torch.tensor(1.5)
    got = grads_of(fused(ids, lp.float(), 4, **kwargs), hidden.to(dtype), weight.to(dtype),
                   bias.to(dtype), grad_out)
    expected = grads_of(materialised(ids, lp, **kwargs), hidden, weight, bias, grad_out)
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, expected):
        assert a.dtype == (torch.float32 if name == "loss" else dtype)
        torch.testing.assert_close(a.double(), b, **tol[dtype], msg=name)


@pytest.mark.parametrize("chunk_rows", [1, 2, None])
def test_ids_across_the_vocabulary_boundary_in_chunks(chunk_rows):
    """The CPU chunks with the last class V - 1 listed beside ids at V, V + 1 and padding ids
    near 2^31, the same ids repeated across teachers, against the reference on whole logits."""
    N, H, V, K = 5, 4, 10, 2
    hidden, weight, bias, _, _, w, y = linear_inputs(N, H, V, K, 3, weights="NK")
    rows = [[9, 10, 3], [9, 2**31 - 1, 10], [V - 1, V + 1, 0], [2**31 - 2, 9, 2**31 - 1], [8, 9, 10]]
    ids = torch.tensor([rows, rows[::-1]], dtype=torch.int32)  # (K, N, 3)
    lp = torch.tensor([0.3, 0.2, 0.3], dtype=torch.float64).log().expand(K, N, 3)
    kwargs = dict(weights=w, labels=y, alpha=0.7, temperature=1.3, reduction="none")
    grad_out = torch.linspace(0.5, 2.0, N, dtype=torch.float64)
    got = grads_of(fused(ids, lp, chunk_rows, **kwargs), hidden, weight, bias, grad_out)
    expected = grads_of(materialised(ids, lp, **kwargs), hidden, weight, bias, grad_out)
    for name, a, b in zip(("loss", "hidden", "weight", "bias"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
