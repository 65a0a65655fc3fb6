"""fused_sparse_kd_loss (the Triton kernel, and its CPU path) against the float64 reference.

Tests without a marker run the kernel on CPU tensors through triton's interpreter (switched on per
test); tests marked `gpu` run the compiled kernel on CUDA and skip without one. Tests parametrised
`@both_paths` run twice: through the kernel, and as `[cpu_path]` through what CPU tensors take
without the interpreter (`sparse_cpu.py`, the loss and gradient in PyTorch ops).
"""

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mtkd.kernels.sparse_kd_loss as sparse_module
from mtkd.kernels import fused_kd_loss, fused_sparse_kd_loss, kd_sparse_loss_ref
from mtkd.kernels.sparse_kd_loss import _sparse_kd_loss_kernel, sparse_kd_loss_forward
from tests.kernels.checks import assert_close, compile_for_sm90, loss_and_grad, make_sparse_inputs


@pytest.fixture(autouse=True)
def kernel_backend(request):
    """The interpreter for every test here except those marked gpu (compiled, on CUDA) and those
    named cpu_path (PyTorch ops, as on a machine without a GPU)."""
    if request.node.get_closest_marker("gpu") is None and "cpu_path" not in request.node.name:
        request.getfixturevalue("triton_interpreter")


both_paths = pytest.mark.parametrize("path", ["kernel", "cpu_path"])


def check_sparse_kernel(s, ids, lp, grad_out=None, weights=None, **kwargs):
    """The kernel's loss and gradient against the float64 reference (and PyTorch's own error in
    the student's dtype, the baseline of the tolerance); returns the kernel's."""
    loss, grad = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, grad_out=grad_out,
                               weights=weights, **kwargs)
    w64 = None if weights is None else weights.double()
    ref, ref_grad = loss_and_grad(kd_sparse_loss_ref, s.double(), ids, lp.double(),
                                  grad_out=grad_out, weights=w64, **kwargs)
    pt, pt_grad = loss_and_grad(kd_sparse_loss_ref, s, ids, lp, grad_out=grad_out,
                                weights=weights, **kwargs)
    assert grad.dtype == s.dtype
    wide = torch.float64 in {s.dtype, lp.dtype, None if weights is None else weights.dtype}
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    T, alpha = kwargs.get("temperature", 1.0), kwargs.get("alpha", 1.0)
    assert_close("loss", loss, ref, pt, torch.float64 if wide else torch.float32, T * T)
    assert_close("grad", grad, ref_grad, pt_grad, s.dtype, alpha * T,
                 roundings=1 if grad_out is None else 2)
    return loss, grad


def some_rows_masked(N):
    mask = torch.ones(N, dtype=torch.bool)
    mask[::3] = False
    return mask


def matrix():
    """Every V with every student dtype; K, k, T, alpha, weights, reduction, labels, mask, ids
    beyond V and the ids' dtype vary by a seeded draw."""
    draw = random.Random(5)
    cases = []
    for V in (1, 10, 37, 129, 300):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            alpha = draw.choice((0.0, 0.3, 1.0))
            cases.append(dict(
                V=V, dtype=dtype, K=draw.choice((1, 2, 3, 5)),
                k=min(V, draw.choice((1, 4, 16))),
                temperature=draw.choice((0.05, 0.5, 1.0, 2.0, 20.0)), alpha=alpha,
                weights=draw.choice((None, "K", "NK")),
                reduction=draw.choice(("mean", "sum", "none")),
                labels="some" if alpha == 0 else draw.choice((None, "some")),
                mask=draw.choice((None, "some")),
                extra=draw.choice((0, 0, 5)),
                ids_dtype=draw.choice((torch.int32, torch.int64)),
            ))
    ids = ["-".join(str(v).replace("torch.", "") for v in c.values()) for c in cases]
    return [pytest.param(c, id=i) for c, i in zip(cases, ids)]


@pytest.mark.parametrize("case", matrix())
@both_paths
def test_matches_reference(path, case):
    N = 5
    s, ids, lp, w, y = make_sparse_inputs(
        case["K"], N, case["V"], case["k"], case["dtype"], extra_classes=case["extra"],
        weights=case["weights"], labels=case["labels"], ids_dtype=case["ids_dtype"],
        temperature=case["temperature"])
    check_sparse_kernel(s, ids, lp, weights=w, labels=y, temperature=case["temperature"],
                        alpha=case["alpha"], reduction=case["reduction"],
                        mask=None if case["mask"] is None else some_rows_masked(N))


@pytest.mark.parametrize("V, block_v", [(17, 16), (129, 128), (300, 32)])
def test_blocked_over_v_matches_reference(V, block_v):
    """V blocks smaller than V (as for V = 262144 with 4096-class blocks), V one past a block."""
    K, N, k, T, alpha = 3, 4, 6, 2.0, 0.3
    s, ids, lp, w, y = make_sparse_inputs(K, N, V, k, extra_classes=4, weights="NK",
                                          temperature=T)
    kwargs = dict(temperature=T, alpha=alpha, ignore_index=-100, need_grad=True)
    rows, grad, report = sparse_kd_loss_forward(s, ids, lp, w, y, None, None, reduction="none",
                                                block_v=block_v, **kwargs)
    assert not report.any()
    ref, ref_grad = loss_and_grad(kd_sparse_loss_ref, s.double(), ids, lp.double(),
                                  weights=w.double(), labels=y, temperature=T, alpha=alpha,
                                  reduction="none")
    pt, pt_grad = loss_and_grad(kd_sparse_loss_ref, s, ids, lp, weights=w, labels=y,
                                temperature=T, alpha=alpha, reduction="none")
    assert_close("loss", rows, ref, pt, torch.float32, T * T)
    assert_close("grad", grad, ref_grad, pt_grad, torch.float32, alpha * T)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@both_paths
def test_every_class_listed_gives_the_dense_prob_gradient(path, dtype):
    K, N, V, T = 3, 4, 29, 2.0
    z = torch.randn(K, N, V, dtype=torch.float64) * 3
    s = (torch.randn(N, V, dtype=torch.float64) * 3).to(dtype)
    order = torch.rand(K, N, V).argsort(dim=-1)
    lp = torch.log_softmax(z / T, dim=-1).gather(2, order).float()
    _, grad = loss_and_grad(fused_sparse_kd_loss, s, order, lp, temperature=T, reduction="none")
    _, dense_grad = loss_and_grad(fused_kd_loss, s, z.float(), temperature=T, reduction="none")
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2**-7}[dtype]
    torch.testing.assert_close(grad.double(), dense_grad.double(), rtol=rtol, atol=1e-6)


@both_paths
def test_confident_student_keeps_its_tail(path):
    """Q_k > 1 - 1e-6 in float32: the kernel's 1 - Q_k comes from float64 sums of exactly the
    same terms (header), not from 1 - sum q."""
    N, V, k = 4, 300, 8
    s = torch.randn(N, V, dtype=torch.float64)
    s[:, :k] += 20.0
    ids = torch.arange(k).expand(2, N, k).contiguous()
    p = torch.softmax(torch.randn(2, N, k, dtype=torch.float64), -1) * 0.8  # r = 0.2
    q = torch.softmax(s, -1)
    assert (q[:, :k].sum(-1) > 1 - 1e-6).all()
    loss, grad = loss_and_grad(fused_sparse_kd_loss, s.float(), ids, p.log().float(),
                               reduction="none")
    ref, ref_grad = loss_and_grad(kd_sparse_loss_ref, s, ids, p.log(), reduction="none")
    torch.testing.assert_close(loss.double(), ref, rtol=2e-6, atol=0)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-5, atol=1e-7)
    # What the cancellation would have cost: 1 - Q from float32 sums is off by percents.
    q32 = torch.softmax(s.float(), -1)
    naive_tail = 1 - q32[:, :k].sum(-1).double()
    true_tail = q[:, k:].sum(-1)
    assert ((naive_tail - true_tail).abs() / true_tail).max() > 1e-2


@both_paths
@pytest.mark.parametrize("K", [1, 3])
def test_rows_of_every_kind_in_one_batch(path, K):
    """A batch mixing ordinary rows with rows whose student is far sharper than the teachers on
    their listed classes (w r / (1 - Q) in the hundreds), a tail below 1e-6, rows of no tail and
    ids beyond V: each row as the float64 reference has it, whichever way the CPU path takes it."""
    N, V, k = 12, 97, 6
    g = torch.Generator().manual_seed(3)
    s = torch.randn(N, V, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:k].expand(N, k) for _ in range(K)]).contiguous()
    p = torch.softmax(torch.randn(K, N, k, generator=g, dtype=torch.float64), -1) * 0.7  # r = 0.3
    for n in (1, 5, 9):  # the student puts nearly everything on teacher 0's listed classes
        s[n, ids[0, n]] += 9.0 + n
    s[7, ids[0, 7]] += 30.0  # a student tail of ~1e-12 beside the teachers' 0.3
    ids[:, 3, 0] = V + 2  # an id beyond V: tail mass
    p[:, 10] = p[:, 10] / p[:, 10].sum(-1, keepdim=True)  # no tail at all on row 10
    check_sparse_kernel(s.float(), ids, p.log().float(), temperature=1.0, reduction="none")
    check_sparse_kernel(s.float(), ids, p.log().float(), temperature=2.0, alpha=0.5,
                        labels=torch.randint(0, V, (N,), generator=g), reduction="none")


@both_paths
def test_tails_too_deep_for_the_difference_are_summed_directly(path):
    """The student's unlisted mass ~1e-24 of its listed mass (T = 0.1): below what Z - Z_listed
    resolves in float64, so the kernel sums that tail directly (found by hypothesis: the
    difference gave 0, an infinite loss and NaN gradients)."""
    s = torch.tensor([[2.529, 0.6216, 7.9678, 2.2687, -1.2661, -4.0539, 2.3495],
                      [0.1, 0.2, 9.0, 0.3, 8.9, 0.0, -1.0]])
    ids = torch.tensor([[[2, 20], [2, 4]]])  # teacher 0 lists the student's top class(es)
    lp = torch.tensor([[[-7.8447e-06, -math.inf], [-0.5, -1.0]]])
    loss, grad = check_sparse_kernel(s, ids, lp, temperature=0.1, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@both_paths
def test_ids_beyond_v_are_tail_mass_and_lists_of_one(path):
    s, ids, lp, w, y = make_sparse_inputs(2, 6, 12, 5, extra_classes=20, weights="K")
    assert (ids >= 12).any()
    check_sparse_kernel(s, ids, lp, weights=w, labels=y, alpha=0.5, temperature=1.5,
                        reduction="none")
    s, ids, lp, _, _ = make_sparse_inputs(3, 4, 50, 1)
    check_sparse_kernel(s, ids, lp, temperature=3.0, reduction="sum")


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 5.0, 20.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@both_paths
def test_temperatures(path, dtype, temperature):
    s, ids, lp, w, y = make_sparse_inputs(2, 4, 40, 6, dtype, lp_dtype=torch.float32,
                                          weights="NK", temperature=temperature)
    loss, grad = check_sparse_kernel(s, ids, lp, weights=w, labels=y, alpha=0.7,
                                     temperature=temperature, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@both_paths
def test_masked_rows_all_masked_and_unlabelled_rows(path, reduction):
    s, ids, lp, w, y = make_sparse_inputs(3, 6, 20, 4, weights="NK")
    mask = some_rows_masked(6)
    lp[1, 0, 2] = math.nan  # masked rows are never looked at: no error
    w[3] = 0.0
    check_sparse_kernel(s, ids, lp, weights=w, labels=y, alpha=0.4, reduction=reduction,
                        mask=mask)
    loss, grad = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, weights=w, labels=y, alpha=0.4,
                               reduction=reduction, mask=torch.zeros(6, dtype=torch.bool))
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))
    y[:] = -100  # unlabelled rows still distil
    loss, _ = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, weights=w, labels=y, alpha=0.4,
                            reduction="none", mask=mask)
    kd, _ = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, weights=w, reduction="none",
                          mask=mask)
    torch.testing.assert_close(loss, 0.4 * kd)
    assert (loss[mask] > 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@both_paths
def test_non_unit_incoming_gradient(path, reduction):
    s, ids, lp, w, y = make_sparse_inputs(3, 5, 37, 6, torch.bfloat16, lp_dtype=torch.float32,
                                          weights="NK")
    grad_out = torch.tensor(2.5) if reduction != "none" else \
        torch.tensor([1.0, 0.0, -3.0, 1e3, 0.25])  # 1.0 exactly: the backward skips such rows
    check_sparse_kernel(s, ids, lp, grad_out=grad_out, weights=w, labels=y, alpha=0.3,
                        temperature=2.0, reduction=reduction)


@both_paths
def test_strided_inputs(path):
    K, N, V, k = 2, 4, 37, 5
    s, ids, lp, _, y = make_sparse_inputs(K, N, V, k)
    s_t = s.t().contiguous().t()  # column-major student
    ids_t = ids.transpose(0, 1).contiguous().transpose(0, 1)  # (K, N, k) with rows outermost
    lp_strided = torch.full((K, N, 2 * k), math.nan)
    lp_strided[..., ::2] = lp
    lp_strided = lp_strided[..., ::2]  # every other element of a buffer whose others are NaN
    w = torch.rand(K, N).t()  # (N, K) column-major
    y = torch.randint(0, V, (2 * N,))[::2]
    assert not any(t.is_contiguous() for t in (s_t, ids_t, lp_strided, w, y))
    check_sparse_kernel(s_t, ids_t, lp_strided, weights=w, labels=y, alpha=0.3, temperature=2.0,
                        reduction="none")


@both_paths
def test_non_finite_log_probabilities_are_refused(path):
    s, ids, lp, _, y = make_sparse_inputs(2, 4, 20, 4)
    for value in (math.nan, math.inf):
        bad = lp.clone()
        bad[1, 2, 3] = value
        with pytest.raises(ValueError, match="finite"):
            fused_sparse_kd_loss(s, ids, bad, labels=y, alpha=0.5)
        # ...unless that teacher has weight 0 in the row, or the row is masked out
        fused_sparse_kd_loss(s, ids, bad, weights=torch.tensor([1.0, 0.0]))
        fused_sparse_kd_loss(s, ids, bad, mask=torch.arange(4) != 2)


def test_forward_mode_ad_raises_on_the_kernel_path():
    s, ids, lp, _, _ = make_sparse_inputs(2, 3, 10, 3)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda s: fused_sparse_kd_loss(s, ids, lp), (s,), (torch.ones_like(s),))


def test_gradient_only_when_needed_and_second_backward_fails_loudly():
    s, ids, lp, _, y = make_sparse_inputs(2, 3, 10, 3)
    with torch.no_grad():
        assert not fused_sparse_kd_loss(s.requires_grad_(), ids, lp).requires_grad
    loss = fused_sparse_kd_loss(s, ids, lp, labels=y, alpha=0.5)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@both_paths
def test_empty_batch(path):
    s = torch.zeros(0, 10, requires_grad=True)
    ids, lp = torch.zeros(2, 0, 3, dtype=torch.long), torch.zeros(2, 0, 3)
    assert fused_sparse_kd_loss(s, ids, lp).item() == 0.0
    assert fused_sparse_kd_loss(s, ids, lp, reduction="none").shape == (0,)


def test_torch_compile_fullgraph():
    """No graph break: no host sync, the kernel is one opaque custom op with a fake kernel."""
    s, ids, lp, w, y = make_sparse_inputs(3, 4, 37, 5, weights="NK")
    mask = torch.tensor([True, False, True, True])

    def step(s):
        return fused_sparse_kd_loss(s, ids, lp, weights=w, labels=y, temperature=2.0, alpha=0.3,
                                    mask=mask)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, grad = loss_and_grad(compiled, s, grad_out=torch.tensor(3.0))
    ref, ref_grad = loss_and_grad(step, s, grad_out=torch.tensor(3.0))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_cpu_path_launches_no_kernel_and_matches_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    launches = []
    monkeypatch.setattr(sparse_module, "sparse_kd_loss_forward",
                        lambda *a, **k: launches.append(1))
    s, ids, lp, w, y = make_sparse_inputs(2, 4, 20, 4, weights="NK")
    kwargs = dict(weights=w, labels=y, alpha=0.3, temperature=2.0)
    torch.testing.assert_close(loss_and_grad(fused_sparse_kd_loss, s, ids, lp, **kwargs),
                               loss_and_grad(kd_sparse_loss_ref, s, ids, lp, **kwargs))
    assert launches == []


# Properties, on random small problems in float32.

# Shapes from small sets: each new combination of block sizes costs the interpreter a fresh
# specialisation (seconds), while the properties are about values.
problems = st.fixed_dictionaries(dict(
    K=st.sampled_from([1, 3]), N=st.integers(1, 4), V=st.sampled_from([7, 40]),
    k=st.sampled_from([1, 5]),
    extra=st.sampled_from([0, 5]), temperature=st.sampled_from([0.1, 0.5, 1.0, 3.0, 10.0]),
    alpha=st.sampled_from([0.3, 1.0]), weights=st.sampled_from([None, "K", "NK"]),
    labels=st.sampled_from([None, "some"]), seed=st.integers(0, 2**16),
))
# derandomize: the same 15 examples every run, so that CI is not a lottery; the case a random run
# once found is pinned as its own test.
property_settings = settings(max_examples=15, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def problem_inputs(p):
    torch.manual_seed(p["seed"])
    s, ids, lp, w, y = make_sparse_inputs(p["K"], p["N"], p["V"], min(p["k"], p["V"]),
                                          extra_classes=p["extra"], weights=p["weights"],
                                          labels=p["labels"], temperature=p["temperature"])
    kwargs = dict(weights=w, labels=y, temperature=p["temperature"], alpha=p["alpha"],
                  reduction="none")
    return s, ids, lp, kwargs


def close(a, b, T):
    torch.testing.assert_close(a[0], b[0], atol=1e-4 * (1 + T * T), rtol=1e-4)
    torch.testing.assert_close(a[1], b[1], atol=1e-5 * (1 + T), rtol=1e-4)


@both_paths
def test_a_student_tail_below_float32s_range_keeps_the_gradient_finite_and_exact(path):
    # Found by a random run: at T = 0.1 the student's tail is ~1e-40, so r / (1 - Q) overflows float32.
    p = dict(K=1, N=3, V=7, k=5, extra=5, temperature=0.1, alpha=1.0, weights=None, labels=None,
             seed=1252)
    s, ids, lp, kwargs = problem_inputs(p)
    loss, grad = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, **kwargs)
    ref_loss, ref_grad = loss_and_grad(kd_sparse_loss_ref, s, ids, lp, **kwargs)
    assert torch.isfinite(ref_grad).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)


@property_settings
@given(problems)
@both_paths
def test_gradient_rows_sum_to_zero_at_alpha_one(path, p):
    s, ids, lp, kwargs = problem_inputs(p)
    kwargs["alpha"] = 1.0
    loss, grad = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, **kwargs)
    assert (loss >= -1e-5 * (1 + loss.abs())).all(), loss
    row_sums = grad.double().sum(dim=-1)
    assert (row_sums.abs() <= 1e-5 * (1 + grad.abs().sum(dim=-1))).all(), row_sums


@property_settings
@given(problems)
@both_paths
def test_a_constant_added_to_the_student_changes_nothing(path, p):
    s, ids, lp, kwargs = problem_inputs(p)
    shifted = s + torch.randn(p["N"], 1) * 10
    close(loss_and_grad(fused_sparse_kd_loss, shifted, ids, lp, **kwargs),
          loss_and_grad(fused_sparse_kd_loss, s, ids, lp, **kwargs), p["temperature"])


@property_settings
@given(problems, st.randoms(use_true_random=False))
@both_paths
def test_permuting_teachers_with_their_weights_changes_nothing(path, p, rnd):
    s, ids, lp, kwargs = problem_inputs(p)
    expected = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, **kwargs)
    perm = list(range(p["K"]))
    rnd.shuffle(perm)
    w = kwargs["weights"]
    kwargs["weights"] = None if w is None else w[..., perm]
    close(loss_and_grad(fused_sparse_kd_loss, s, ids[perm], lp[perm], **kwargs), expected,
          p["temperature"])


@property_settings
@given(problems)
@both_paths
def test_an_extra_id_of_probability_zero_changes_nothing(path, p):
    """Beyond V always; within V when the teacher's listed mass is 1 (see the reference test)."""
    s, ids, lp, kwargs = problem_inputs(p)
    V = p["V"]
    expected = loss_and_grad(fused_sparse_kd_loss, s, ids, lp, **kwargs)
    beyond = torch.full(ids.shape[:2] + (1,), V + 7)
    zero = torch.full_like(lp[..., :1], -math.inf)
    close(loss_and_grad(fused_sparse_kd_loss, s, torch.cat([ids, beyond], 2),
                        torch.cat([lp, zero], 2), **kwargs), expected, p["temperature"])


# Ids across the student's vocabulary boundary: the last class V - 1 beside ids at V, V + 1 and
# the padding ids near 2^31 (a teacher with a larger or padded vocabulary), repeated across teachers.


def boundary_pool(V):
    """Every class of a small student, and ids just past it and at the padding end of int32."""
    return sorted(set(range(V)) | {V, V + 1, 2**31 - 2, 2**31 - 1})


@st.composite
def boundary_problems(draw):
    V = draw(st.sampled_from([1, 10, 40]))
    K, N, k = draw(st.sampled_from([1, 3])), draw(st.integers(1, 3)), draw(st.sampled_from([3, 5]))
    pool = boundary_pool(V)
    beside = [V - 1, V]  # the pattern that matters most: V - 1 and V in one list
    ids = []
    for _ in range(K * N):
        listed = draw(st.lists(st.sampled_from(pool), min_size=k, max_size=k, unique=True))
        if draw(st.booleans()):
            listed = beside + [i for i in listed if i not in beside][:k - 2]
        ids.append(draw(st.permutations(listed)))
    return dict(V=V, K=K, N=N, k=k, ids=ids, seed=draw(st.integers(0, 2**16)),
                full=draw(st.booleans()), zeros=draw(st.booleans()),
                temperature=draw(st.sampled_from([0.5, 1.0, 4.0])),
                alpha=draw(st.sampled_from([0.4, 1.0])),
                weights=draw(st.sampled_from([None, "NK"])),
                ids_dtype=draw(st.sampled_from([torch.int32, torch.int64])))


def boundary_inputs(p):
    """Student logits and teachers listing `p["ids"]`: listed probabilities summing to 1 (`full`)
    or to less (a tail), some of them 0 (`zeros`), float32."""
    torch.manual_seed(p["seed"])
    K, N, k, V = p["K"], p["N"], p["k"], p["V"]
    s = torch.randn(N, V) * 3
    ids = torch.tensor(p["ids"], dtype=p["ids_dtype"]).reshape(K, N, k)
    raw = torch.rand(K, N, k + 1, dtype=torch.float64) + 0.05
    if p["zeros"]:
        raw[..., 0] = 0.0  # a listed id of probability 0 (log -inf)
    mass = raw[..., :k] / (raw[..., :k] if p["full"] else raw).sum(dim=-1, keepdim=True)
    w = torch.rand(N, K) + 0.1 if p["weights"] == "NK" else None
    y = torch.randint(0, V, (N,)) if p["alpha"] < 1 else None
    return s, ids, mass.log().float(), w, y


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boundary_problems())
@both_paths
def test_ids_across_the_vocabulary_boundary_match_the_reference(path, p):
    s, ids, lp, w, y = boundary_inputs(p)
    check_sparse_kernel(s, ids, lp, weights=w, labels=y, temperature=p["temperature"],
                        alpha=p["alpha"], reduction="none")


@pytest.mark.parametrize("listed", [[3, 9, 10], [9, 10, 3], [3, 8, 10], [9, 10, 2**31 - 1]])
@both_paths
def test_the_last_class_beside_an_id_beyond_v_is_listed(path, listed):
    """The SPEC's sum written out by hand for one row, V = 10: class 9 listed beside an id >= V
    is in S (its own term, and out of the student's tail 1 - Q); the id >= V is tail mass."""
    V = 10
    s = torch.randn(1, V, dtype=torch.float64)
    p = [0.3, 0.2, 0.3]
    q = torch.softmax(s[0], dim=0).tolist()
    in_s = [(i, pi) for i, pi in zip(listed, p) if i < V]
    r = 1 - sum(pi for _, pi in in_s)
    expected = sum(pi * math.log(pi / q[i]) for i, pi in in_s) \
        + r * math.log(r / (1 - sum(q[i] for i, _ in in_s)))
    ids = torch.tensor([[listed]])
    lp = torch.tensor([[p]], dtype=torch.float64).log()
    loss, _ = check_sparse_kernel(s, ids, lp)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


# The compiled kernel.


@pytest.mark.parametrize("flags", [
    dict(),
    dict(HAS_WEIGHTS=False, HAS_LABELS=False, HAS_MASK=False, USE_CE=False, CE_AT_T=False,
         MEAN_OVER_COUNT=False),
    dict(CE_AT_T=True),
    dict(USE_KD=False, CE_AT_T=False),
    dict(HAS_GRAD=False),
    dict(ACC_DTYPE="fp64"),
    dict(BLOCK_K=16, BLOCK_L=256, BLOCK_J=1, BLOCK_F=1),
    # A launch specialises int arguments equal to 1 into constants (K = 1, k = 1, unit strides).
    dict(K=1, L=1, stride_sv=1, stride_il=1, stride_pl=1, stride_gv=1, mean_divisor=1,
         BLOCK_K=1, BLOCK_L=1, BLOCK_J=1, BLOCK_F=4096, MEAN_OVER_COUNT=False),
])
def test_kernel_compiles_for_sm90_without_a_gpu(flags):
    """The interpreter forgives what the compiler does not; this runs the real compiler down to a
    cubin, which needs no GPU."""
    import triton.language as tl

    signature = {"s_ptr": "*bf16", "ids_ptr": "*i32", "lp_ptr": "*fp32", "w_ptr": "*fp32",
                 "y_ptr": "*i64", "m_ptr": "*i1", "count_ptr": "*i64", "loss_ptr": "*fp32",
                 "bad_ptr": "*i8", "grad_ptr": "*bf16"}
    signature.update({name: "i32" for name in (
        "stride_sn", "stride_sv", "stride_ik", "stride_in", "stride_il", "stride_pk",
        "stride_pn", "stride_pl", "stride_wn", "stride_wk", "stride_y", "stride_m", "stride_gn",
        "stride_gv", "K", "V", "L", "mean_divisor", "ignore_index")})
    signature.update({name: "fp32" for name in (
        "inv_temperature", "kd_loss_scale", "kd_grad_scale", "ce_scale")})
    constexprs = dict(BLOCK_K=4, BLOCK_L=64, BLOCK_J=16, BLOCK_F=16, BLOCK_V=4096, HAS_WEIGHTS=True,
                      HAS_LABELS=True, HAS_MASK=True, USE_KD=True, USE_CE=True, CE_AT_T=False,
                      HAS_GRAD=True, MEAN_OVER_COUNT=True, ACC_DTYPE=tl.float32)
    constexprs.update(flags)
    if constexprs["ACC_DTYPE"] == "fp64":
        constexprs["ACC_DTYPE"] = tl.float64
    for name in set(flags) & set(signature):
        del signature[name]
        signature[name] = "constexpr"
    assert compile_for_sm90(_sparse_kd_loss_kernel, signature, constexprs, num_warps=8,
                            fp_fusion=False)


# On a GPU.


@pytest.mark.gpu
@pytest.mark.parametrize("case", matrix()[::2])
def test_cuda_matches_reference(case, cuda):
    s, ids, lp, w, y = make_sparse_inputs(
        case["K"], 64, case["V"], case["k"], case["dtype"], extra_classes=case["extra"],
        weights=case["weights"], labels=case["labels"], ids_dtype=case["ids_dtype"],
        temperature=case["temperature"], device=cuda)
    check_sparse_kernel(s, ids, lp, weights=w, labels=y, temperature=case["temperature"],
                        alpha=case["alpha"], reduction=case["reduction"])


@pytest.mark.gpu
@pytest.mark.parametrize("V", [32000, 128256, 262144])
def test_cuda_large_vocabulary(V, cuda):
    s, ids, lp, w, y = make_sparse_inputs(4, 16, V, 64, torch.bfloat16, lp_dtype=torch.float32,
                                          weights="NK", device=cuda)
    check_sparse_kernel(s, ids, lp, weights=w, labels=y, temperature=2.0, alpha=0.5)


@pytest.mark.gpu
def test_cuda_graph_capture_and_torch_compile(cuda):
    s, ids, lp, w, y = make_sparse_inputs(4, 64, 1000, 32, torch.bfloat16,
                                          lp_dtype=torch.float32, weights="NK", device=cuda)
    s.requires_grad_()
    kwargs = dict(weights=w, labels=y, temperature=2.0, alpha=0.3)
    expected = fused_sparse_kd_loss(s, ids, lp, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, s)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        fused_sparse_kd_loss(s, ids, lp, **kwargs).backward()
    torch.cuda.current_stream().wait_stream(stream)
    s.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fused_sparse_kd_loss(s, ids, lp, **kwargs)
        (grad,) = torch.autograd.grad(loss, s)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
    compiled = torch.compile(lambda s: fused_sparse_kd_loss(s, ids, lp, **kwargs), fullgraph=True)
    loss = compiled(s)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
