"""fused_kd_loss against the float64 reference.

Tests without a marker run the Triton kernel on CPU tensors through triton's interpreter (switched
on per test); tests marked `gpu` run the compiled kernel on CUDA and skip without one.
"""

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtkd.kernels import fused_kd_loss, kd_loss_ref
from mtkd.kernels.kd_loss import _kd_loss_kernel, kd_loss_forward
from mtkd.kernels.launch import _scale_grad_kernel
from tests.kernels.checks import assert_close, compile_for_sm90, loss_and_grad

@pytest.fixture(autouse=True)
def kernel_backend(request):
    """The interpreter for every test here except those marked gpu (compiled, on CUDA) and those
    named cpu_path (PyTorch ops, as on a machine without a GPU)."""
    if request.node.get_closest_marker("gpu") is None and "cpu_path" not in request.node.name:
        request.getfixturevalue("triton_interpreter")


both_paths = pytest.mark.parametrize("path", ["kernel", "cpu_path"])


def check_kernel(s, z, grad_out=None, weights=None, **kwargs):
    """fused_kd_loss's loss and gradient against the float64 reference; returns the kernel's.

    A grad_out other than 1 is applied by the backward to the forward's gradient, already rounded
    to the student's dtype: a second rounding, which the tolerance allows for.
    """
    loss, grad = loss_and_grad(fused_kd_loss, s, z, grad_out=grad_out, weights=weights, **kwargs)
    w64 = None if weights is None else weights.double()
    ref_loss, ref_grad = loss_and_grad(kd_loss_ref, s.double(), z.double(), grad_out=grad_out,
                                       weights=w64,
                                       **kwargs)
    pt_loss, pt_grad = loss_and_grad(kd_loss_ref, s, z, grad_out=grad_out, weights=weights,
                                     **kwargs)
    assert grad.dtype == s.dtype
    dtypes = {s.dtype, z.dtype, None if weights is None else weights.dtype}
    wide = torch.float64 in dtypes
    assert loss.dtype == (torch.float64 if wide else torch.float32)
    T, alpha = kwargs.get("temperature", 1.0), kwargs.get("alpha", 1.0)
    assert_close("loss", loss, ref_loss, pt_loss, torch.float64 if wide else torch.float32, T * T)
    assert_close("grad", grad, ref_grad, pt_grad, s.dtype, alpha * T,
                 roundings=1 if grad_out is None else 2)
    return loss, grad


def make_inputs(K, N, V, dtype=torch.float32, z_dtype=None, scale=3.0, weights=None, labels="some",
                device="cpu"):
    """Student (N, V), teachers (K, N, V), weights (None, "K" or "NK") and labels (None, "some":
    row 1 ignored, "all": every row ignored)."""
    s = (torch.randn(N, V, dtype=torch.float64) * scale).to(dtype).to(device)
    z = (torch.randn(K, N, V, dtype=torch.float64) * scale).to(z_dtype or dtype).to(device)
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
    return s, z, w, y


def some_rows_masked(N, device="cpu"):
    """A mask with row 0 (and row 3, when there is one) left out."""
    mask = torch.ones(N, dtype=torch.bool, device=device)
    mask[::3] = False
    return mask


def matrix():
    """Every V with every dtype and fusion; K, T, alpha, weights, reduction and labels vary by a
    seeded draw, so that each value of each shows up across the cases."""
    draw = random.Random(3)
    cases = []
    for V in (1, 10, 37, 128, 129, 1000):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for fusion in ("prob", "logit"):
                alpha = draw.choice((0.0, 0.3, 1.0))
                cases.append(dict(
                    V=V, dtype=dtype, fusion=fusion, K=draw.choice((1, 2, 3, 5)),
                    temperature=draw.choice((0.05, 0.5, 1.0, 2.0, 10.0)), alpha=alpha,
                    weights=draw.choice((None, "K", "NK")),
                    reduction=draw.choice(("mean", "sum", "none")),
                    mask=draw.choice((None, "some")),
                    # alpha = 0 without labels is all zeros, tested on its own below
                    labels="some" if alpha == 0 else draw.choice((None, "some")),
                ))
    ids = ["-".join(str(v).replace("torch.", "") for v in c.values()) for c in cases]
    return [pytest.param(c, id=i) for c, i in zip(cases, ids)]


@pytest.mark.parametrize("case", matrix())
@both_paths
def test_matches_reference(path, case):
    N = 3 if case["V"] == 1000 else 5
    s, z, w, y = make_inputs(case["K"], N, case["V"], case["dtype"], weights=case["weights"],
                             labels=case["labels"])
    check_kernel(s, z, weights=w, labels=y, temperature=case["temperature"], alpha=case["alpha"],
                 fusion=case["fusion"], reduction=case["reduction"],
                 mask=None if case["mask"] is None else some_rows_masked(N, s.device))


@pytest.mark.parametrize("fusion", ["prob", "logit"])
@pytest.mark.parametrize("V", [1, 37, 129])
@both_paths
def test_float64_matches_reference_tightly(path, V, fusion):
    s, z, w, y = make_inputs(3, 4, V, torch.float64, weights="NK")
    check_kernel(s, z, weights=w, labels=y, temperature=0.7, alpha=0.3, fusion=fusion)


@pytest.mark.parametrize("s_dtype, z_dtype", [
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
    (torch.float16, torch.bfloat16),
    (torch.float32, torch.float64),
])
@both_paths
def test_student_and_teachers_in_different_dtypes(path, s_dtype, z_dtype):
    s, z, w, y = make_inputs(2, 4, 37, s_dtype, z_dtype=z_dtype, weights="K")
    check_kernel(s, z, weights=w, labels=y, temperature=2.0, alpha=0.3)


@pytest.mark.parametrize("fusion", ["prob", "logit"])
@pytest.mark.parametrize("V, block_v, first_block_masked", [
    (17, 16, False),  # V one past the block: the last block holds a single class
    (129, 128, False),
    (37, 16, True),  # a block where teachers and student are all -inf
    (1000, 64, False),
])
def test_online_path_matches_reference(V, block_v, first_block_masked, fusion):
    """The two-pass online softmax (forced with a small V block) against the reference."""
    K, N, T, alpha = 3, 4, 2.0, 0.3
    s, z, w, y = make_inputs(K, N, V, weights="NK")
    if first_block_masked:
        z[0, :, :block_v] = -math.inf  # teacher 0 rules out the whole first block...
        z[:, 0, :block_v] = -math.inf  # ...and in row 0 every teacher does, and so does the student
        s[0, :block_v] = -math.inf
        y[0] = V - 1
    kwargs = dict(temperature=T, alpha=alpha, fusion=fusion, ignore_index=-100, need_grad=True)
    for reduction in ("none", "mean"):
        rows, grad, _ = kd_loss_forward(s, z, w, y, reduction=reduction, block_v=block_v,
                                        **kwargs)
        _, whole_grad, _ = kd_loss_forward(s, z, w, y, reduction=reduction, **kwargs)
        ref, ref_grad = loss_and_grad(kd_loss_ref, s.double(), z.double(), weights=w.double(),
                                      labels=y, temperature=T, alpha=alpha, fusion=fusion,
                                      reduction=reduction)
        pt, pt_grad = loss_and_grad(kd_loss_ref, s, z, weights=w, labels=y, temperature=T,
                                    alpha=alpha, fusion=fusion, reduction=reduction)
        total = rows if reduction == "none" else rows.sum()
        assert_close(f"{reduction} loss", total, ref, pt, torch.float32, T * T)
        assert_close(f"{reduction} grad", grad, ref_grad, pt_grad, torch.float32, alpha * T)
        assert_close("online vs whole-row grad", grad, whole_grad.double(), pt_grad, torch.float32,
                     alpha * T)


@pytest.mark.parametrize("fusion", ["prob", "logit"])
@pytest.mark.parametrize("block_v", [None, 16])
def test_minus_inf_teacher_logits_are_exact_zeros(fusion, block_v):
    K, N, V = 3, 4, 37
    s, z, w, y = make_inputs(K, N, V, labels="some")
    z[:, :, 0] = -math.inf  # every teacher rules out class 0
    z[1, :, 3] = -math.inf  # one teacher rules out class 3
    z[:, 2, 5:] = -math.inf  # in row 2 only five classes remain
    loss, grad = check_kernel(s, z, labels=y, temperature=2.0, alpha=0.3, fusion=fusion,
                              reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    rows, grad, _ = kd_loss_forward(s, z, None, None, temperature=1.0, alpha=1.0, fusion=fusion,
                                 reduction="none", ignore_index=-100, need_grad=True,
                                 block_v=block_v)
    # p = 0 where every teacher says -inf: the gradient there is exactly q (T = 1, alpha = 1).
    q = torch.softmax(s.double(), dim=-1)
    assert torch.isfinite(rows).all()
    torch.testing.assert_close(grad[:, 0].double(), q[:, 0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fusion", ["prob", "logit"])
@both_paths
def test_minus_inf_student_logits(path, fusion):
    K, N, V = 2, 3, 10
    s, z, _, _ = make_inputs(K, N, V, labels=None)
    z[:, :, :3] = -math.inf
    s[:, :3] = -math.inf  # ruled out by everyone: contributes nothing
    loss, grad = check_kernel(s, z, temperature=1.5, fusion=fusion, reduction="none")
    assert torch.isfinite(loss).all()
    s[0, 5] = -math.inf  # the teachers give class 5 mass, the student none: KL is +inf
    loss, grad = check_kernel(s, z, temperature=1.5, fusion=fusion, reduction="none")
    assert loss[0] == math.inf and torch.isfinite(loss[1:]).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.05, 1.0, 10.0])
@both_paths
def test_extreme_logits(path, temperature, dtype):
    K, N, V = 3, 4, 37
    s, z, w, y = make_inputs(K, N, V, dtype, weights="NK")
    s = torch.where(torch.rand(N, V) < 0.5, -1e4, 1e4).to(dtype) * torch.rand(N, V).to(dtype)
    z[0] = 1e4
    z[1, :, ::2] = -1e4
    loss, grad = check_kernel(s, z, weights=w, labels=y, temperature=temperature, alpha=0.3,
                              reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss_fn", [fused_kd_loss, kd_loss_ref], ids=["fused", "reference"])
def test_all_rows_masked_is_exactly_zero(loss_fn, reduction, alpha):
    """Masked rows are never looked at: garbage there (NaN, +inf, all -inf, zero weights, labels
    out of range) gives a zero loss and a zero gradient, not an error."""
    s, z, _, y = make_inputs(3, 4, 37)
    s[0, :5] = -math.inf
    z[0, 1] = math.nan
    z[1, 2] = math.inf
    z[:, 3] = -math.inf
    y[2] = 99
    w = torch.rand(4, 3)
    w[1] = 0.0
    mask = torch.zeros(4, dtype=torch.bool)
    s = s.requires_grad_()
    loss = loss_fn(s, z, weights=w, labels=y, alpha=alpha, temperature=2.0, reduction=reduction,
                   mask=mask)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("fusion", ["prob", "logit"])
@both_paths
def test_masked_rows_are_left_out_and_not_counted(path, fusion):
    s, z, w, y = make_inputs(3, 6, 37, weights="NK")
    mask = some_rows_masked(6)
    kwargs = dict(weights=w, labels=y, temperature=2.0, alpha=0.3, fusion=fusion)
    loss, grad = loss_and_grad(fused_kd_loss, s, z, mask=mask, **kwargs)
    kept, kept_grad = loss_and_grad(fused_kd_loss, s[mask], z[:, mask], weights=w[mask],
                                    labels=y[mask], temperature=2.0, alpha=0.3, fusion=fusion)
    torch.testing.assert_close(loss, kept)
    torch.testing.assert_close(grad[mask], kept_grad)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@pytest.mark.parametrize("loss_fn", [fused_kd_loss, kd_loss_ref], ids=["fused", "reference"])
def test_unlabelled_rows_still_distil(loss_fn):
    """ignore_index drops the CE term only (SPEC version 2): a batch mixing labelled and
    unlabelled rows is one call."""
    s, z, _, y = make_inputs(3, 4, 37)
    y[1] = y[3] = -100
    kwargs = dict(temperature=2.0, reduction="none")
    loss, grad = loss_and_grad(loss_fn, s, z, labels=y, alpha=0.3, **kwargs)
    kd, kd_grad = loss_and_grad(loss_fn, s, z, alpha=1.0, **kwargs)
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")  # 0 where y == -100
    torch.testing.assert_close(loss, 0.3 * kd + 0.7 * ce)
    unlabelled = y == -100
    assert (loss[unlabelled] > 0).all()
    torch.testing.assert_close(grad[unlabelled], 0.3 * kd_grad[unlabelled])


@pytest.mark.parametrize("loss_fn", [fused_kd_loss, kd_loss_ref], ids=["fused", "reference"])
def test_alpha_zero_without_labels_is_exactly_zero(loss_fn):
    """No term is left (CE needs labels): a zero loss with a zero gradient, not an error, so that
    a caller may split a batch into labelled and unlabelled rows whatever alpha is."""
    s, z, _, _ = make_inputs(2, 3, 10, labels=None)
    s.requires_grad_()
    loss = loss_fn(s, z, alpha=0.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@both_paths
def test_non_unit_incoming_gradient(path, reduction):
    s, z, w, y = make_inputs(3, 5, 37, torch.bfloat16, weights="NK")
    # Per row for "none": 1.0 exactly (the backward skips such rows), 0, negative, large.
    grad_out = torch.tensor(2.5)
    if reduction == "none":
        grad_out = torch.tensor([1.0, 0.0, -2.5, 1e3, 0.5])
    check_kernel(s, z, grad_out, weights=w, labels=y, temperature=2.0, alpha=0.3,
                 reduction=reduction)


@both_paths
def test_strided_inputs(path):
    K, N, V = 3, 5, 37
    z = torch.randn(N, K, V + 3).permute(1, 0, 2)[:, :, 1 : V + 1]  # (K, N, V), teacher-minor
    z_classes_strided = torch.randn(V, N, K).permute(2, 1, 0)  # class stride N * K
    s = torch.randn(N, V + 7)[:, 2 : V + 2]  # a column slice
    s_transposed = torch.randn(V, N).t()  # class stride N
    w = torch.rand(K, N).t()  # (N, K), column-major
    y = torch.randint(0, V, (2 * N,))[::2]
    assert not (z.is_contiguous() or s.is_contiguous() or w.is_contiguous() or y.is_contiguous())
    for s_, z_ in ((s, z), (s_transposed, z_classes_strided)):
        check_kernel(s_, z_, weights=w, labels=y, temperature=2.0, alpha=0.3, reduction="none")


@pytest.mark.parametrize("loss_fn", [fused_kd_loss, kd_loss_ref], ids=["fused", "reference"])
@pytest.mark.parametrize("fusion", ["prob", "logit"])
@pytest.mark.parametrize("left_out", ["-inf", "nan"])
@both_paths
def test_zero_weight_teacher_is_left_out(path, fusion, left_out, loss_fn):
    s, z, _, y = make_inputs(2, 4, 10)
    z3 = torch.cat([z, torch.full_like(z[:1], float(left_out))])
    kwargs = dict(labels=y, temperature=2.0, alpha=0.3, fusion=fusion, reduction="none")
    loss3, grad3 = loss_and_grad(loss_fn, s, z3, weights=torch.tensor([1.0, 3.0, 0.0]), **kwargs)
    loss2, grad2 = loss_and_grad(loss_fn, s, z, weights=torch.tensor([1.0, 3.0]), **kwargs)
    torch.testing.assert_close(loss3, loss2)
    torch.testing.assert_close(grad3, grad2)


BAD_TEACHERS = {
    # name: (fusion, how the teachers are spoilt in row 2, a word of the message)
    "nan": ("prob", lambda z: z[1, 2, 5].fill_(math.nan), "finite"),
    "plus-inf": ("logit", lambda z: z[0, 2, 0].fill_(math.inf), "finite"),
    "teacher-row-all-minus-inf": ("prob", lambda z: z[1, 2].fill_(-math.inf), "no finite logit"),
    "mix-all-minus-inf": ("logit", lambda z: (z[0, 2, ::2].fill_(-math.inf),
                                              z[1, 2, 1::2].fill_(-math.inf)), "all -inf"),
}


@pytest.mark.parametrize("loss_fn", [fused_kd_loss, kd_loss_ref], ids=["fused", "reference"])
@pytest.mark.parametrize("bad", list(BAD_TEACHERS))
@both_paths
def test_non_finite_teachers_are_refused(path, bad, loss_fn):
    """Such a row gave loss 0 with a NaN gradient in version 1: a student trained on it turns NaN."""
    fusion, spoil, word = BAD_TEACHERS[bad]
    s, z, _, y = make_inputs(2, 4, 37)
    spoil(z)
    with pytest.raises(ValueError, match=word):
        loss_fn(s, z, labels=y, alpha=0.5, fusion=fusion)
    # The same row masked out, or its teacher weighted 0, is fine.
    loss_fn(s, z, labels=y, alpha=0.5, fusion=fusion, mask=torch.arange(4) != 2)
    if bad in ("nan", "teacher-row-all-minus-inf"):
        loss_fn(s, z, labels=y, alpha=0.5, fusion=fusion, weights=torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("bad", list(BAD_TEACHERS))
def test_online_path_reports_non_finite_teachers(bad):
    fusion, spoil, _ = BAD_TEACHERS[bad]
    s, z, _, y = make_inputs(2, 4, 37)
    spoil(z)
    _, _, report = kd_loss_forward(s, z, None, y, temperature=2.0, alpha=0.5, fusion=fusion,
                                   reduction="mean", ignore_index=-100, need_grad=True, block_v=16)
    expected = {"nan": 1, "plus-inf": 1, "teacher-row-all-minus-inf": 2, "mix-all-minus-inf": 3}
    assert report.tolist() == [0, 0, expected[bad], 0]


def test_forward_mode_ad_raises_on_the_kernel_path():
    s, z, _, _ = make_inputs(2, 3, 10, labels=None)
    tangent = torch.randn_like(s)
    with pytest.raises(RuntimeError, match="forward-mode AD"):
        torch.func.jvp(lambda s: fused_kd_loss(s, z), (s,), (tangent,))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(s, tangent)
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            fused_kd_loss(dual, z)


@both_paths
def test_empty_batch(path):
    s, z = torch.zeros(0, 10, requires_grad=True), torch.zeros(2, 0, 10)
    for reduction in ("mean", "sum"):
        loss = fused_kd_loss(s, z, reduction=reduction)
        assert loss.item() == 0.0
    assert fused_kd_loss(s, z, reduction="none").shape == (0,)


@both_paths
def test_gradient_only_to_the_student_and_only_when_needed(path):
    s, z, w, y = make_inputs(2, 3, 10, weights="NK")
    z.requires_grad_()
    s.requires_grad_()
    fused_kd_loss(s, z, weights=w, labels=y, alpha=0.5).backward()
    assert z.grad is None and s.grad is not None
    with torch.no_grad():
        assert not fused_kd_loss(s, z, labels=y).requires_grad
    plain = fused_kd_loss(s.detach(), z.detach(), labels=y)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, kd_loss_ref(s.detach(), z.detach(), labels=y))


def test_second_backward_through_a_retained_graph_fails_loudly():
    """The backward scales the forward's gradient buffer in place (no second (N, V) tensor); a
    second backward would see it already scaled, so autograd's saved-tensor check must refuse."""
    s, z, _, _ = make_inputs(2, 3, 10, labels=None)
    s.requires_grad_()
    loss = fused_kd_loss(s, z)
    (2 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torch_compile_fullgraph():
    """No graph break: no host sync, the kernel is one opaque custom op with a fake kernel."""
    s, z, w, y = make_inputs(3, 4, 37, weights="NK")

    def step(s, z, w, y):
        return fused_kd_loss(s, z, weights=w, labels=y, temperature=2.0, alpha=0.3)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, grad = loss_and_grad(lambda s, z: compiled(s, z, w, y), s, z, grad_out=torch.tensor(3.0))
    ref, ref_grad = loss_and_grad(lambda s, z: step(s, z, w, y), s, z, grad_out=torch.tensor(3.0))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(grad, ref_grad)


# Properties, on random small problems in float32.

problems = st.fixed_dictionaries(dict(
    K=st.integers(1, 4), N=st.integers(1, 4), V=st.integers(1, 40),
    temperature=st.sampled_from([0.1, 0.5, 1.0, 3.0, 10.0]), alpha=st.sampled_from([0.0, 0.3, 1.0]),
    fusion=st.sampled_from(["prob", "logit"]), weights=st.sampled_from([None, "K", "NK"]),
    labels=st.sampled_from([None, "some"]), seed=st.integers(0, 2**16),
))
property_settings = settings(max_examples=25, deadline=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def problem_inputs(p):
    torch.manual_seed(p["seed"])
    s, z, w, y = make_inputs(p["K"], p["N"], p["V"], weights=p["weights"], labels=p["labels"])
    kwargs = dict(weights=w, labels=y, temperature=p["temperature"], alpha=p["alpha"],
                  fusion=p["fusion"], reduction="none")
    return s, z, kwargs


@property_settings
@given(problems)
def test_loss_is_non_negative_and_gradient_rows_sum_to_zero(p):
    s, z, kwargs = problem_inputs(p)
    loss, grad = loss_and_grad(fused_kd_loss, s, z, **kwargs)
    assert (loss >= -1e-5 * (1 + loss.abs())).all(), loss
    # Both alpha T (q - p) and (1 - alpha)(softmax(s) - onehot) sum to zero over the classes.
    row_sums = grad.double().sum(dim=-1)
    assert (row_sums.abs() <= 1e-5 * (1 + grad.abs().sum(dim=-1))).all(), row_sums


@property_settings
@given(problems)
def test_shifting_a_rows_logits_changes_nothing(p):
    s, z, kwargs = problem_inputs(p)
    loss, grad = loss_and_grad(fused_kd_loss, s, z, **kwargs)
    shift_s = torch.randn(p["N"], 1) * 10
    # Each teacher may shift its own rows: softmax(z_k / T) does not change. Under "logit"
    # fusion only a shift shared by all teachers is harmless.
    shift_z = torch.randn(p["K"] if p["fusion"] == "prob" else 1, p["N"], 1) * 10
    shifted, shifted_grad = loss_and_grad(fused_kd_loss, s + shift_s, z + shift_z, **kwargs)
    torch.testing.assert_close(shifted, loss, atol=1e-4 * (1 + p["temperature"] ** 2), rtol=1e-4)
    torch.testing.assert_close(shifted_grad, grad, atol=1e-5 * (1 + p["temperature"]), rtol=1e-4)


@property_settings
@given(problems, st.randoms(use_true_random=False))
def test_permuting_teachers_with_their_weights_changes_nothing(p, rnd):
    s, z, kwargs = problem_inputs(p)
    loss, grad = loss_and_grad(fused_kd_loss, s, z, **kwargs)
    perm = list(range(p["K"]))
    rnd.shuffle(perm)
    w = kwargs["weights"]
    kwargs["weights"] = None if w is None else w[..., perm]
    permuted, permuted_grad = loss_and_grad(fused_kd_loss, s, z[perm], **kwargs)
    torch.testing.assert_close(permuted, loss, atol=1e-4 * (1 + p["temperature"] ** 2), rtol=1e-4)
    torch.testing.assert_close(permuted_grad, grad, atol=1e-5 * (1 + p["temperature"]), rtol=1e-4)


# The compiled kernel.


@pytest.mark.parametrize("flags", [
    dict(),
    dict(SINGLE_BLOCK=False, BLOCK_K=4, BLOCK_V=2048),
    dict(FUSION_PROB=False, SINGLE_BLOCK=False),
    dict(HAS_WEIGHTS=False, HAS_LABELS=False, HAS_MASK=False, USE_CE=False, MEAN_OVER_COUNT=False),
    dict(USE_KD=False, HAS_GRAD=False),
    dict(ACC_DTYPE="fp64", SINGLE_BLOCK=False),
    # A launch specialises int arguments equal to 1 into constants (K = 1, V = 1, unit strides).
    dict(K=1, V=1, stride_sv=1, stride_zv=1, stride_wk=1, stride_y=1, stride_m=1, mean_divisor=1,
         BLOCK_K=1,
         BLOCK_V=1, MEAN_OVER_COUNT=False),
    dict(K=1, stride_sv=1, stride_zv=1, mean_divisor=1, SINGLE_BLOCK=False, BLOCK_K=1),
])
def test_kernel_compiles_for_sm90_without_a_gpu(flags):
    """The interpreter forgives what the compiler does not (loop-carried types, constexpr ints);
    this runs the real compiler down to a cubin, which needs no GPU."""
    import triton.language as tl

    signature = {"s_ptr": "*bf16", "z_ptr": "*bf16", "w_ptr": "*fp32", "y_ptr": "*i64",
                 "m_ptr": "*i1", "count_ptr": "*i64", "loss_ptr": "*fp32", "bad_ptr": "*i8",
                 "grad_ptr": "*bf16"}
    signature.update({name: "i32" for name in (
        "stride_sn", "stride_sv", "stride_zk", "stride_zn", "stride_zv", "stride_wn", "stride_wk",
        "stride_y", "stride_m", "K", "V", "mean_divisor", "ignore_index")})
    signature.update({name: "fp32" for name in (
        "inv_temperature", "kd_loss_scale", "kd_grad_scale", "ce_scale")})
    constexprs = dict(BLOCK_K=4, BLOCK_V=1024, SINGLE_BLOCK=True, FUSION_PROB=True,
                      HAS_WEIGHTS=True, HAS_LABELS=True, HAS_MASK=True, USE_KD=True, USE_CE=True,
                      HAS_GRAD=True,
                      MEAN_OVER_COUNT=True, ACC_DTYPE=tl.float32)
    constexprs.update(flags)
    if constexprs["ACC_DTYPE"] == "fp64":
        constexprs["ACC_DTYPE"] = tl.float64
    assert compile_for_sm90(_kd_loss_kernel, signature, constexprs, num_warps=8)
    scale_signature = {"grad_ptr": "*bf16", "grad_out_ptr": "*fp32", "stride_go": "i32", "V": "i32"}
    assert compile_for_sm90(_scale_grad_kernel, scale_signature, dict(BLOCK_V=4096), num_warps=4)


@pytest.mark.gpu
@pytest.mark.parametrize("case", matrix()[::3])
def test_cuda_matches_reference(case, cuda):
    s, z, w, y = make_inputs(case["K"], 64, case["V"], case["dtype"], weights=case["weights"],
                             labels=case["labels"], device=cuda)
    check_kernel(s, z, weights=w, labels=y, temperature=case["temperature"], alpha=case["alpha"],
                 fusion=case["fusion"], reduction=case["reduction"])


@pytest.mark.gpu
@pytest.mark.parametrize("V", [32000, 128256, 262144])
def test_cuda_large_vocabulary(V, cuda):
    s, z, w, y = make_inputs(4, 16, V, torch.bfloat16, weights="NK", device=cuda)
    check_kernel(s, z, weights=w, labels=y, temperature=2.0, alpha=0.5, reduction="mean")


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_offsets_past_two_to_the_31(cuda):
    """K * N * V > 2^31 elements: teacher offsets must be computed in int64."""
    K, N, V = 3, 8192, 131072
    if torch.cuda.get_device_properties(cuda).total_memory < 16 * 2**30:
        pytest.skip("needs 16 GiB of GPU memory")
    z = torch.empty(K, N, V, dtype=torch.bfloat16, device=cuda).normal_()
    s = torch.randn(N, V, dtype=torch.bfloat16, device=cuda, requires_grad=True)
    rows = [0, N // 2, N - 1]
    loss = fused_kd_loss(s, z, reduction="none")
    loss[rows].sum().backward()
    ref, ref_grad = loss_and_grad(kd_loss_ref, s[rows], z[:, rows], reduction="none")
    torch.testing.assert_close(loss[rows], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.grad[rows].float(), ref_grad.float(), rtol=2e-2, atol=1e-6)


@pytest.mark.gpu
def test_cuda_graph_capture_and_torch_compile(cuda):
    s, z, w, y = make_inputs(4, 64, 1000, torch.bfloat16, weights="NK", device=cuda)
    s.requires_grad_()
    kwargs = dict(weights=w, labels=y, temperature=2.0, alpha=0.3)
    expected = fused_kd_loss(s, z, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected, s)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compiles the kernels) outside the capture
        fused_kd_loss(s, z, **kwargs).backward()
    torch.cuda.current_stream().wait_stream(stream)
    s.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fused_kd_loss(s, z, **kwargs)
        (grad,) = torch.autograd.grad(loss, s)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)

    compiled = torch.compile(lambda s: fused_kd_loss(s, z, **kwargs), fullgraph=True)
    loss = compiled(s)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)
