"""Benchmark of mtkd's KD losses against PyTorch eager, torch.compile, Liger-Kernel, matmuls alone.

    python bench/kernel.py --quick --json bench/results/kernel-h200-DATE.json   # headline shapes
    python bench/kernel.py --loss sparse --V 128256 --pass fwd_bwd              # one loss's matrix
    python bench/kernel.py                                                      # every shape (long)
    python bench/kernel.py --smoke --json /tmp/smoke.json   # tiny shapes on CPU: the harness only

Losses (--loss) and their providers (--provider), all in one table:

  dense         fused_kd_loss: K teachers' (N, V) logits, fusion "prob", uniform weights.
      mtkd            mtkd.kernels.fused_kd_loss (the Triton kernel)
      torch_eager     mtkd.kernels.kd_loss_ref (the reference, plain PyTorch)
      torch_compile   the reference under torch.compile
      liger           LigerKLDIVLoss on the teachers' fused log-probs, computed beforehand and not
                      timed, plus LigerCrossEntropyLoss: it reads ONE (N, V) target, not K
  sparse        fused_sparse_kd_loss: each teacher's top-k ids (int32) and log-probs (float32).
      mtkd            mtkd.kernels.fused_sparse_kd_loss (the Triton kernel)
      torch_eager     mtkd.kernels.kd_sparse_loss_ref (the reference, plain PyTorch: per teacher,
                      the listed ids scattered into a dense (N, V) mask, log_softmax, the KL at
                      the listed classes and the tail bucket's)
      torch_compile   the reference under torch.compile
  fused_linear  fused_linear_sparse_kd_loss: hidden (N, H) and the output layer (V, H).
      mtkd            mtkd.kernels.fused_linear_sparse_kd_loss (row chunks; no (N, V) tensor)
      materialised    logits = hidden @ weight.T, whole, then fused_sparse_kd_loss on them
      liger           LigerFusedLinearJSD with jsd_beta = 0 (forward KL), the closest peer: ONE
                      dense teacher whose logits it computes inside the call from the teacher's
                      own hidden (N, H) and weight (V, H): one more N x H x V matmul than mtkd
      matmul_floor    the matmuls alone, whole: hidden @ weight.T, plus for fwd_bwd G @ weight
                      and G.T @ hidden (grad_hidden, grad_weight): no version can beat it

Passes (--pass): fwd (the loss of inputs that do not require grad) and fwd_bwd (loss and backward).

Default shapes, T = 2, alpha = 0.5, labels on every row, uniform weights:
  dense         K in {1, 4, 8}, N = 8192, V in {100, 1000, 32000, 128256}, bfloat16 and float32
  sparse        K in {1, 4}, N = 8192, k in {32, 64}, V in {32000, 128256, 262144}, bfloat16
  fused_linear  K = 4, k = 64, N = 8192, H = 4096, V = 128256, bfloat16
--quick keeps the headline shapes only (the SPEC targets', both passes): dense K = 4, V = 32000;
sparse K = 4, k = 64, V = 128256; fused_linear as above.

Columns. Times are the median, 20th and 80th percentiles of `triton.testing.do_bench` (ms); `first`
is the first call (compilation included). GB/s is effective bandwidth: the least any implementation
must move, in the inputs' dtypes, over the median time:
  dense    teachers K*N*V and student N*V read once, the gradient N*V written once (fwd_bwd);
           liger: its one (N, V) target instead of the K teachers
  sparse   student N*V read, teachers' ids and log-probs K*N*k read, the gradient N*V written
`%copy` is that over a device-to-device copy measured in the same run (bytes read + written): the
ceiling. `ach GB/s` is achieved bandwidth, for mtkd's dense kernel, whose traffic is known: the
bytes it really moves, a row read twice where it takes two passes over V (`moved_bytes`); "-" for
providers whose traffic is not known (several PyTorch kernels, a CPU path).
TFLOP/s (fused_linear) counts 2*N*H*V per matmul. `peak MB` is the peak memory allocated during
one call beyond what was allocated before it (inputs excluded, the gradients it leaves in .grad
included; CUDA only). `x mtkd` is the median time over mtkd's on the same shape and pass.

Every provider's loss value is checked against a yardstick's on the same inputs (dense, sparse:
torch_eager; fused_linear: materialised) before it is timed; a disagreement is an error row, never
a timing. Not checked: matmul_floor (no loss) and Liger's fused-linear JSD (another loss).

--json writes the JSON after every row (GPU name, versions, copy bandwidth, rows; "complete" turns
true at the end), so a run that fails late keeps what it measured. A row that fails (out of memory,
a compile error) is recorded with its error and the run goes on; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.testing

from mtkd.kernels import (
    fused_kd_loss,
    fused_linear_sparse_kd_loss,
    fused_sparse_kd_loss,
    kd_loss_ref,
    kd_sparse_loss_ref,
)

LOSSES = ("dense", "sparse", "fused_linear")
PASSES = ("fwd", "fwd_bwd")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PROVIDERS = {
    # torch.compile last in each shape: its compilation takes the longest, and a run cut short
    # (--json keeps every row measured) should lose the fewest rows.
    "dense": ("mtkd", "torch_eager", "liger", "torch_compile"),
    "sparse": ("mtkd", "torch_eager", "torch_compile"),
    "fused_linear": ("mtkd", "materialised", "liger", "matmul_floor"),
}
GRID_FIELDS = {  # the shape options each loss takes
    "dense": ("K", "N", "V", "dtype"),
    "sparse": ("K", "N", "V", "k", "dtype"),
    "fused_linear": ("K", "N", "V", "k", "H", "dtype"),
}
YARDSTICK = {"dense": "torch_eager", "sparse": "torch_eager", "fused_linear": "materialised"}
TEMPERATURE, ALPHA = 2.0, 0.5
IDS_DTYPE, LOGPROBS_DTYPE = torch.int32, torch.float32
QUANTILES = [0.5, 0.2, 0.8]  # do_bench returns them in this order: median, p20, p80
# Relative tolerance of a provider's loss against the yardstick's, by the student's dtype: both
# compute in float32 from the same inputs; Liger takes log-softmax in the student's dtype.
LOSS_RTOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}


@dataclass(frozen=True)
class Grid:
    """The shapes one loss is measured at: every combination of the tuples."""

    K: tuple[int, ...]
    N: tuple[int, ...]
    V: tuple[int, ...]
    dtype: tuple[str, ...]
    k: tuple[Optional[int], ...] = (None,)  # sparse and fused_linear: ids per teacher and row
    H: tuple[Optional[int], ...] = (None,)  # fused_linear: hidden size
    chunk_rows: Optional[int] = None  # fused_linear: None lets the kernel choose


FULL = {
    "dense": Grid(K=(1, 4, 8), N=(8192,), V=(100, 1000, 32000, 128256),
                  dtype=("bfloat16", "float32")),
    "sparse": Grid(K=(1, 4), N=(8192,), V=(32000, 128256, 262144), k=(32, 64),
                   dtype=("bfloat16",)),
    "fused_linear": Grid(K=(4,), N=(8192,), V=(128256,), k=(64,), H=(4096,), dtype=("bfloat16",)),
}
QUICK = {
    "dense": Grid(K=(4,), N=(8192,), V=(32000,), dtype=("bfloat16",)),
    "sparse": Grid(K=(4,), N=(8192,), V=(128256,), k=(64,), dtype=("bfloat16",)),
    "fused_linear": FULL["fused_linear"],
}
# On CPU, the kernels through triton's interpreter: tiny shapes, fused_linear in three row chunks.
SMOKE = {
    "dense": Grid(K=(2,), N=(8,), V=(33,), dtype=("bfloat16",)),
    "sparse": Grid(K=(2,), N=(8,), V=(300,), k=(4,), dtype=("bfloat16",)),
    "fused_linear": Grid(K=(2,), N=(24,), V=(300,), k=(4,), H=(16,), dtype=("bfloat16",),
                         chunk_rows=8),
}


@dataclass(frozen=True)
class Case:
    """One shape of one loss."""

    loss: str
    K: int
    N: int
    V: int
    dtype: str
    k: Optional[int] = None
    H: Optional[int] = None
    chunk_rows: Optional[int] = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def cases(loss: str, grid: Grid) -> list[Case]:
    return [Case(loss, K, N, V, dtype, k, H, grid.chunk_rows)
            for dtype in grid.dtype for K in grid.K for N in grid.N for V in grid.V
            for k in grid.k for H in grid.H]


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Inputs


def sparse_teachers(K: int, N: int, V: int, k: int, device: str):
    """Top-k ids (K, N, k), distinct per teacher and row, and their log-probabilities (K, N, k):
    a teacher's listed mass is between 0.5 and 0.99, the rest is its tail."""
    ids = torch.empty(K * N, k, dtype=IDS_DTYPE, device=device)
    step = max(1, 2**26 // V)  # the rows drawn at once: a (step, V) float32 buffer of 256 MiB
    for start in range(0, K * N, step):
        rows = min(step, K * N - start)
        ids[start:start + rows] = torch.rand(rows, V, device=device).topk(k, dim=-1).indices
    listed_mass = torch.empty(K, N, 1, device=device).uniform_(0.5, 0.99)
    logprobs = torch.log_softmax(2 * torch.randn(K, N, k, device=device), dim=-1)
    logprobs = logprobs + listed_mass.log()
    return ids.view(K, N, k), logprobs.to(LOGPROBS_DTYPE)


def make_inputs(case: Case, device: str, with_liger_teacher: bool) -> dict:
    dtype, K, N, V = case.torch_dtype, case.K, case.N, case.V
    inputs = {"labels": torch.randint(0, V, (N,), device=device)}
    if case.loss == "dense":
        inputs["student"] = torch.randn(N, V, device=device, dtype=dtype)
        inputs["teacher_logits"] = torch.randn(K, N, V, device=device, dtype=dtype)
        return inputs
    inputs["teacher_ids"], inputs["teacher_logprobs"] = sparse_teachers(K, N, V, case.k, device)
    if case.loss == "sparse":
        inputs["student"] = torch.randn(N, V, device=device, dtype=dtype)
        return inputs
    H = case.H
    # weight ~ N(0, 1/H): logits of unit scale, as a trained output layer gives.
    inputs["hidden"] = torch.randn(N, H, device=device, dtype=dtype)
    inputs["weight"] = (torch.randn(V, H, device=device) / math.sqrt(H)).to(dtype)
    if with_liger_teacher:  # Liger's one teacher: its own hidden states and output layer
        inputs["teacher_hidden"] = torch.randn(N, H, device=device, dtype=dtype)
        inputs["teacher_weight"] = (torch.randn(V, H, device=device) / math.sqrt(H)).to(dtype)
    return inputs


def leaf_names(loss: str) -> tuple[str, ...]:
    """The inputs a provider's loss is a function of (those that require grad for fwd_bwd)."""
    return ("hidden", "weight") if loss == "fused_linear" else ("student",)


# ---------------------------------------------------------------------------------------------
# Providers: each returns the loss as a function of the leaves, or None when not installed.


def provider_fn(provider: str, case: Case, inputs: dict, compile_backend: str) -> Callable | None:
    kd = dict(temperature=TEMPERATURE, labels=inputs["labels"], alpha=ALPHA)
    if case.loss == "dense":
        z = inputs["teacher_logits"]
        if provider == "mtkd":
            return lambda s: fused_kd_loss(s, z, **kd)
        if provider == "torch_eager":
            return lambda s: kd_loss_ref(s, z, **kd)
        if provider == "torch_compile":
            compiled = fresh_compile(kd_loss_ref, compile_backend)
            return lambda s: compiled(s, z, **kd)
        if provider == "liger":
            return liger_dense(z, inputs["labels"])
    if case.loss == "sparse":
        ids, logprobs = inputs["teacher_ids"], inputs["teacher_logprobs"]
        if provider == "mtkd":
            return lambda s: fused_sparse_kd_loss(s, ids, logprobs, **kd)
        if provider == "torch_eager":
            return lambda s: kd_sparse_loss_ref(s, ids, logprobs, **kd)
        if provider == "torch_compile":
            compiled = fresh_compile(kd_sparse_loss_ref, compile_backend)
            return lambda s: compiled(s, ids, logprobs, **kd)
    if case.loss == "fused_linear":
        ids, logprobs = inputs["teacher_ids"], inputs["teacher_logprobs"]
        if provider == "mtkd":
            return lambda h, w: fused_linear_sparse_kd_loss(
                h, w, ids, logprobs, chunk_rows=case.chunk_rows, **kd)
        if provider == "materialised":
            return lambda h, w: fused_sparse_kd_loss(h @ w.T, ids, logprobs, **kd)
        if provider == "matmul_floor":
            return matmul_floor
        if provider == "liger":
            return liger_fused_linear(inputs["teacher_hidden"], inputs["teacher_weight"])
    raise ValueError(f"provider {provider!r} does not measure the {case.loss} loss")


def fresh_compile(fn, backend: str):
    # A fresh compile per shape: past dynamo's recompile limit it would silently run eager.
    torch._dynamo.reset()
    return torch.compile(fn, backend=backend)


def matmul_floor(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The fused-linear loss's matmuls and nothing else, at full size. Its "loss" has a backward
    that does the two gradient matmuls, with the logits themselves standing in for their
    gradient (same shape and dtype)."""
    return _MatmulFloor.apply(h, w)


class _MatmulFloor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w):
        logits = h @ w.T  # (N, V)
        ctx.save_for_backward(h, w, logits)
        return logits[0, 0].float()

    @staticmethod
    def backward(ctx, _grad):
        h, w, g = ctx.saved_tensors
        return g @ w, g.T @ h  # grad_hidden (N, H), grad_weight (V, H)


def liger_module():
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return None
    return liger


def liger_dense(z: torch.Tensor, y: torch.Tensor) -> Callable | None:
    liger = liger_module()
    if liger is None:
        return None
    kl = liger.LigerKLDIVLoss(reduction="batchmean", log_target=True)
    ce = liger.LigerCrossEntropyLoss(ignore_index=-100)
    T = TEMPERATURE
    with torch.no_grad():  # the fused teacher log-probs, outside the timed region
        log_p = None
        for k in range(z.shape[0]):  # one teacher at a time: K * N * V fp32 may not fit
            term = torch.log_softmax(z[k].float() / T, dim=-1)
            log_p = term if log_p is None else torch.logaddexp(log_p, term)
        log_p = (log_p - math.log(z.shape[0])).to(z.dtype)  # (N, V), uniform weights

    def liger_loss(s):
        log_q = torch.log_softmax(s / T, dim=-1)  # in the student's dtype, as Liger takes it
        return ALPHA * T * T * kl(log_q, log_p) + (1 - ALPHA) * ce(s, y)

    return liger_loss


def liger_fused_linear(teacher_hidden, teacher_weight) -> Callable | None:
    liger = liger_module()
    if liger is None:
        return None
    jsd = liger.LigerFusedLinearJSD(jsd_beta=0.0, temperature=TEMPERATURE)
    return lambda h, w: jsd(h, w, teacher_hidden, teacher_weight)


# ---------------------------------------------------------------------------------------------
# Bytes and operations


def min_bytes(case: Case, provider: str, pass_: str) -> Optional[int]:
    """The least any implementation of what `provider` computes must move (module docstring)."""
    e_s, N, V = element_size(case.torch_dtype), case.N, case.V
    grad = N * V * e_s if pass_ == "fwd_bwd" else 0
    if case.loss == "dense":
        teachers = 1 if provider == "liger" else case.K  # Liger reads one fused target
        return teachers * N * V * e_s + N * V * e_s + grad
    if case.loss == "sparse":
        teachers = case.K * N * case.k * (element_size(IDS_DTYPE) + element_size(LOGPROBS_DTYPE))
        return N * V * e_s + teachers + grad
    return None  # fused_linear is bound by its matmuls: see flops()


def moved_bytes(case: Case, provider: str, pass_: str) -> Optional[int]:
    """The bytes mtkd's kernel really moves (None where that traffic is not known: other
    providers; the sparse loss, whose kernel does not state its passes yet)."""
    if provider != "mtkd" or case.loss == "fused_linear":
        return None
    e_s, N, V = element_size(case.torch_dtype), case.N, case.V
    grad = N * V * e_s if pass_ == "fwd_bwd" else 0
    if case.loss == "dense":
        from mtkd.kernels.kd_loss import _TILE_ELEMENTS, _TILE_ELEMENTS_MANY_TEACHERS

        # kd_loss_forward's choice of the V block: a row longer than one block takes two passes
        # over V (running max and sum, then the loss and gradient), reading its inputs twice.
        block_k = next_pow2(case.K)
        budget = _TILE_ELEMENTS if block_k <= 16 else _TILE_ELEMENTS_MANY_TEACHERS
        block_v = min(next_pow2(V), max(budget // block_k, 16))
        passes = 1 if block_v >= V else 2
        return passes * (case.K * N * V * e_s + N * V * e_s) + grad
    return None


def flops(case: Case, provider: str, pass_: str) -> Optional[int]:
    """fused_linear: 2*N*H*V per matmul; one forward, two more (grad_hidden, grad_weight) for
    fwd_bwd, and Liger's teacher logits: one more in either pass."""
    if case.loss != "fused_linear":
        return None
    matmuls = 1 if pass_ == "fwd" else 3
    if provider == "liger":
        matmuls += 1
    return matmuls * 2 * case.N * case.H * case.V


# ---------------------------------------------------------------------------------------------
# Timing and memory


def cpu_do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
    """`triton.testing.do_bench` for the CPU smoke run: the same arguments and the same result,
    summarised by triton's own `_summarize_statistics`, so the smoke run unpacks exactly what a GPU
    run gets. On the wall clock, and cut short (one call estimates, at most 5 warm up, at least 3
    and at most 20 are timed): the smoke run checks the harness, it measures nothing worth
    reporting."""
    from triton.testing import _summarize_statistics  # private: recheck on a triton upgrade

    start = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(min(int(warmup / estimate_ms), 5)):
        fn()
    times = []
    for _ in range(min(max(3, int(rep / estimate_ms)), 20)):
        for tensor in grad_to_none or ():
            tensor.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return _summarize_statistics(times, quantiles, return_mode)


@dataclass(frozen=True)
class Device:
    """What differs between a GPU run and the CPU smoke run: the timer, the copy buffer's size,
    torch.compile's backend (inductor's C++ build would take minutes on a CPU) and memory stats."""

    name: str  # "cuda" or "cpu"
    do_bench: Callable
    copy_bytes: int
    compile_backend: str

    @property
    def cuda(self) -> bool:
        return self.name == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def peak_extra_memory_mb(self, run: Callable[[], None], leaves: list) -> Optional[float]:
        """Peak memory allocated by one call of `run` beyond what was allocated before it."""
        if not self.cuda:
            return None
        for tensor in leaves:
            tensor.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


CUDA = Device("cuda", triton.testing.do_bench, copy_bytes=2**30, compile_backend="inductor")
CPU = Device("cpu", cpu_do_bench, copy_bytes=2**24, compile_backend="eager")


def copy_gbps(device: Device) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(device.copy_bytes // 4, dtype=torch.float32, device=device.name)
    src.uniform_()  # never time zeros
    dst = torch.empty_like(src)
    ms = device.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * device.copy_bytes / (ms * 1e-3) / 1e9


def relative_difference(value: float, yardstick: float) -> float:
    return abs(value - yardstick) / max(abs(yardstick), 1e-12)


def measure(case: Case, provider: str, pass_: str, fn: Callable, inputs: dict, device: Device,
            yardstick: Optional[float], copy: float, mtkd_ms: Optional[float]) -> dict:
    """One row: check the loss value, then time the call and take its peak memory."""
    row = dict(case_fields(case), provider=provider, pass_=pass_)
    backward = pass_ == "fwd_bwd"
    leaves = [inputs[name].detach().requires_grad_(backward) for name in leaf_names(case.loss)]
    if backward:
        run = lambda: fn(*leaves).backward()  # noqa: E731
    else:
        run = lambda: fn(*leaves)  # noqa: E731
    start = time.perf_counter()
    value = fn(*leaves)  # the first call: kernels and graphs compile here
    if backward:
        value.backward()
    device.synchronize()
    row["first_ms"] = (time.perf_counter() - start) * 1e3
    row["loss_value"] = value = float(value.detach())
    if not math.isfinite(value):
        raise ArithmeticError(f"the loss is {value}")
    # Not checked: the floor computes no loss, Liger's fused-linear JSD another one (one teacher).
    comparable = provider != "matmul_floor" and not (
        case.loss == "fused_linear" and provider == "liger")
    row["checked"] = comparable and yardstick is not None
    if row["checked"]:
        rtol = LOSS_RTOL[case.torch_dtype]
        if relative_difference(value, yardstick) > rtol:
            raise ArithmeticError(f"loss {value:.6g} disagrees with {YARDSTICK[case.loss]}'s "
                                  f"{yardstick:.6g} (relative tolerance {rtol})")
    ms_median, ms_p20, ms_p80 = device.do_bench(run, quantiles=QUANTILES,
                                                grad_to_none=leaves if backward else None)
    row.update(ms_median=ms_median, ms_p20=ms_p20, ms_p80=ms_p80)
    seconds = ms_median * 1e-3
    nbytes, moved, ops = (f(case, provider, pass_) for f in (min_bytes, moved_bytes, flops))
    row["bytes_min"], row["bytes_moved"] = nbytes, moved
    row["gbps"] = nbytes / seconds / 1e9 if nbytes is not None else None
    row["achieved_gbps"] = moved / seconds / 1e9 if moved is not None else None
    row["copy_fraction"] = row["gbps"] / copy if row["gbps"] is not None else None
    row["tflops"] = ops / seconds / 1e12 if ops is not None else None
    if provider == "mtkd":
        mtkd_ms = ms_median
    row["vs_mtkd"] = ms_median / mtkd_ms if mtkd_ms else None
    row["peak_mem_mb"] = device.peak_extra_memory_mb(run, leaves)
    return row


# ---------------------------------------------------------------------------------------------
# The run


class Report:
    """The results so far; with a path, rewritten (atomically) after every row."""

    def __init__(self, path: Optional[str], header: dict):
        self.path, self.results = path, dict(header, complete=False, rows=[], skipped={})
        self.write()

    def add(self, row: dict) -> None:
        self.results["rows"].append(row)
        print_row(row)
        self.write()

    def skip(self, provider: str, why: str) -> None:
        if provider not in self.results["skipped"]:
            print(f"skipping {provider}: {why}", file=sys.stderr)
            self.results["skipped"][provider] = why
            self.write()

    def finish(self) -> dict:
        self.results["complete"] = True
        self.write()
        return self.results

    def write(self) -> None:
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.results, f, indent=1)
            f.write("\n")
        os.replace(tmp, self.path)


def versions() -> dict:
    found = {"torch": torch.__version__, "triton": triton.__version__,
             "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    try:
        found["liger_kernel"] = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        found["liger_kernel"] = None
    return found


def run_case(case: Case, args, device: Device, report: Report, copy: float) -> None:
    # mtkd first (PROVIDERS' order): every other provider's time is compared with its.
    providers = [p for p in PROVIDERS[case.loss] if p in args.provider]
    try:
        inputs = make_inputs(case, device.name, with_liger_teacher="liger" in providers)
    except Exception as error:
        for provider in providers:
            for pass_ in args.passes:
                report.add(error_row(case, provider, pass_, error, device))
        return
    yardstick = yardstick_value(case, inputs, device)
    mtkd_ms = {}
    for provider in providers:
        try:
            fn = provider_fn(provider, case, inputs, device.compile_backend)
        except Exception as error:
            for pass_ in args.passes:
                report.add(error_row(case, provider, pass_, error, device))
            continue
        if fn is None:
            report.skip(provider, "liger_kernel is not installed")
            continue
        for pass_ in args.passes:
            try:
                row = measure(case, provider, pass_, fn, inputs, device, yardstick, copy,
                              mtkd_ms.get(pass_))
            except Exception as error:  # recorded; the run goes on with the next row
                row = error_row(case, provider, pass_, error, device)
            else:
                if provider == "mtkd":
                    mtkd_ms[pass_] = row["ms_median"]
            report.add(row)
    del inputs
    device.free()


def yardstick_value(case: Case, inputs: dict, device: Device) -> Optional[float]:
    """The yardstick's loss on these inputs, which every provider's is checked against; None
    (and the rows say "checked": false) when it cannot be computed, say out of memory."""
    leaves = [inputs[name] for name in leaf_names(case.loss)]
    try:
        with torch.no_grad():
            fn = provider_fn(YARDSTICK[case.loss], case, inputs, device.compile_backend)
            return float(fn(*leaves))
    except Exception as error:
        print(f"no yardstick for {case}: {type(error).__name__}: {first_line(error)}",
              file=sys.stderr)
        device.free()
        return None


def case_fields(case: Case) -> dict:
    fields = dataclasses.asdict(case)
    del fields["chunk_rows"]  # a setting, not a shape
    return fields


def error_row(case: Case, provider: str, pass_: str, error: Exception, device: Device) -> dict:
    """The row of a measurement that failed: its error in one line (the traceback on stderr)."""
    if isinstance(error, torch.OutOfMemoryError):
        message = "out of memory"
    else:
        traceback.print_exception(error)
        message = f"{type(error).__name__}: {first_line(error)}"
    device.free()
    return dict(case_fields(case), provider=provider, pass_=pass_, error=message)


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def bench(args, device: Device) -> dict:
    copy = copy_gbps(device)
    print(f"device-to-device copy: {copy:.1f} GB/s on {device_name(device)}")
    header = {
        "gpu": device_name(device),
        "versions": versions(),
        "copy_gbps": copy,
        "preset": args.preset,
        "argv": sys.argv[1:] if args.argv is None else args.argv,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(temperature=TEMPERATURE, alpha=ALPHA, weights="uniform", labels="every row",
                       dense_fusion="prob", ids_dtype=str(IDS_DTYPE),
                       logprobs_dtype=str(LOGPROBS_DTYPE),
                       liger_jsd_beta=0.0, compile_backend=device.compile_backend,
                       quantiles=QUANTILES),
    }
    report = Report(args.json, header)
    print(HEADER)
    for loss in args.loss:
        for case in cases(loss, args.grids[loss]):
            run_case(case, args, device, report, copy)
    return report.finish()


def device_name(device: Device) -> str:
    return torch.cuda.get_device_name() if device.cuda else "cpu (smoke run: not a measurement)"


COLUMNS = (  # (header, row key, format)
    ("loss", "loss", ">12"), ("pass", "pass_", ">7"), ("provider", "provider", ">13"),
    ("K", "K", ">2"), ("N", "N", ">5"), ("V", "V", ">6"), ("k", "k", ">3"), ("H", "H", ">4"),
    ("dtype", "dtype", ">8"), ("ms", "ms_median", ">9.3f"), ("p20", "ms_p20", ">9.3f"),
    ("p80", "ms_p80", ">9.3f"), ("first", "first_ms", ">8.0f"), ("GB/s", "gbps", ">7.0f"),
    ("ach GB/s", "achieved_gbps", ">8.0f"), ("%copy", "copy_fraction", ">6.1%"),
    ("TFLOP/s", "tflops", ">7.1f"), ("peak MB", "peak_mem_mb", ">8.0f"),
    ("x mtkd", "vs_mtkd", ">6.2f"),
)
HEADER = " ".join(format(name, spec.rstrip("f%").split(".")[0]) for name, _, spec in COLUMNS)


def print_row(row: dict) -> None:
    cells = []
    for _, key, spec in COLUMNS:
        value = row.get(key)
        width = spec.rstrip("f%").split(".")[0]
        cells.append(format("-", width) if value is None else format(value, spec))
    print(" ".join(cells), row.get("error", ""), flush=True)


# ---------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--loss", nargs="+", choices=LOSSES, default=list(LOSSES))
    parser.add_argument("--pass", dest="passes", nargs="+", choices=PASSES, default=list(PASSES))
    all_providers = sorted({p for ps in PROVIDERS.values() for p in ps})
    parser.add_argument("--provider", nargs="+", choices=all_providers, default=all_providers,
                        help="default: every provider of each loss")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="the headline shapes only (under 6 minutes on one H200)")
    preset.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU (the kernels through triton's interpreter, "
                             "torch.compile with its eager backend): checks the harness, "
                             "measures nothing worth reporting")
    for name, kind, what in (("K", int, "numbers of teachers"), ("N", int, "rows"),
                             ("V", int, "vocabulary sizes"), ("k", int, "ids per teacher and row"),
                             ("H", int, "hidden sizes (fused_linear)")):
        parser.add_argument(f"--{name}", type=kind, nargs="+",
                            help=f"{what} (replace the preset's)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES),
                        help="student dtypes (replace the preset's)")
    parser.add_argument("--json", metavar="PATH",
                        help="write the results as JSON, rewritten after every row")
    args = parser.parse_args(argv)
    args.argv = argv
    args.preset = "smoke" if args.smoke else "quick" if args.quick else "full"
    base = SMOKE if args.smoke else QUICK if args.quick else FULL
    overrides = {name: tuple(getattr(args, name)) for name in ("K", "N", "V", "k", "H", "dtype")
                 if getattr(args, name)}
    args.grids = {loss: dataclasses.replace(base[loss], **{
        name: value for name, value in overrides.items() if name in GRID_FIELDS[loss]})
        for loss in args.loss}
    return args


def smoke(args) -> dict:
    """bench() on CPU with the kernels run by triton's interpreter, which mtkd's losses pick when
    TRITON_INTERPRET=1 at call time; the variable is restored afterwards."""
    import numpy as np

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with np.errstate(all="ignore"):  # the interpreter's numpy meets log(0) and inf - inf
            return bench(args, CPU)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/kernel.py needs a CUDA GPU (none found). Use --smoke to check the harness on "
              "CPU; it measures nothing worth reporting.", file=sys.stderr)
        return 2
    results = smoke(args) if args.smoke else bench(args, CUDA)
    failed = [row for row in results["rows"] if "error" in row]
    if failed:
        print(f"{len(failed)} of {len(results['rows'])} rows failed (see 'error')", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
