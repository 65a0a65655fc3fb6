"""Benchmark of the fused multi-teacher KD loss against PyTorch eager, torch.compile and Liger.

    python bench/kernel.py                          # every shape, dtype, provider and mode (CUDA)
    python bench/kernel.py --K 4 --V 32000 --dtype bfloat16 --mode fwd_bwd --json out.json
    python bench/kernel.py --smoke --json /tmp/smoke.json   # tiny shapes on CPU: the harness only

Shapes: K teachers in {1, 4, 8}, N = 8192 rows, V in {100, 1000, 32000, 128256}, student and
teachers in bfloat16 or float32; T = 2, alpha = 0.5, labels, uniform weights, fusion "prob".

Providers:
    mtkd           mtkd.kernels.fused_kd_loss (the Triton kernel)
    torch_eager    mtkd.kernels.kd_loss_ref (the reference, plain PyTorch)
    torch_compile  the reference under torch.compile
    liger          LigerKLDIVLoss on fused teacher log-probs computed beforehand (not timed), plus
                   LigerCrossEntropyLoss; only when liger_kernel imports
Modes: fwd (the loss of a student that does not require grad), fwd_bwd (loss and backward).

Times are the median, 20th and 80th percentiles of `triton.testing.do_bench`. GB/s counts the
least any implementation must move, in the inputs' dtypes: the teachers (K * N * V) and the
student (N * V) read once, plus for fwd_bwd the gradient (N * V) written once. `copy_gbps` is a
device-to-device copy measured in the same run: the ceiling those GB/s approach. peak_mem_mb is
the peak memory allocated during one call beyond what was allocated before it (inputs excluded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch

from mtkd.kernels import fused_kd_loss, kd_loss_ref

PROVIDERS = ("mtkd", "torch_eager", "torch_compile", "liger")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
TEMPERATURE, ALPHA = 2.0, 0.5
QUANTILES = [0.5, 0.2, 0.8]


def minimal_bytes(K: int, N: int, V: int, dtype: torch.dtype, mode: str) -> int:
    """Teachers and student read once, plus the gradient written once for fwd_bwd."""
    size = torch.empty((), dtype=dtype).element_size()
    return (K * N * V + N * V + (N * V if mode == "fwd_bwd" else 0)) * size


def make_inputs(K: int, N: int, V: int, dtype: torch.dtype, device: str):
    s = torch.randn(N, V, device=device, dtype=dtype)
    z = torch.randn(K, N, V, device=device, dtype=dtype)
    y = torch.randint(0, V, (N,), device=device)
    return s, z, y


def loss_fn(provider: str, z: torch.Tensor, y: torch.Tensor) -> Callable | None:
    """provider's loss as a function of the student logits (None when unavailable)."""
    kwargs = dict(temperature=TEMPERATURE, labels=y, alpha=ALPHA)
    if provider == "mtkd":
        return lambda s: fused_kd_loss(s, z, **kwargs)
    if provider == "torch_eager":
        return lambda s: kd_loss_ref(s, z, **kwargs)
    if provider == "torch_compile":
        # A fresh compile per shape: past dynamo's recompile limit it would silently run eager.
        torch._dynamo.reset()
        compiled = torch.compile(kd_loss_ref)
        return lambda s: compiled(s, z, **kwargs)
    if provider == "liger":
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
        except ImportError:
            return None
        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        ce = LigerCrossEntropyLoss(ignore_index=-100)
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
    raise ValueError(f"unknown provider {provider!r}")


def step(fn, s: torch.Tensor, mode: str):
    """One timed call, and the tensors whose .grad must be reset between calls."""
    if mode == "fwd":
        student = s.detach()
        return (lambda: fn(student)), []
    student = s.detach().requires_grad_()
    return (lambda: fn(student).backward()), [student]


def time_cuda(run: Callable[[], None], grads: list[torch.Tensor]) -> list[float]:
    import triton.testing

    return triton.testing.do_bench(run, quantiles=QUANTILES, grad_to_none=grads)


def time_cpu(run: Callable[[], None], repeats: int = 5) -> list[float]:
    """The smoke run's stand-in for do_bench: wall-clock quantiles of a few calls."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


def peak_extra_memory_mb(run: Callable[[], None], grads: list[torch.Tensor]) -> float:
    for tensor in grads:
        tensor.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def copy_gbps(device: str) -> float:
    """Device-to-device copy bandwidth (read + write) of a 1 GiB buffer."""
    import triton.testing

    src = torch.empty(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])[0]
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def bench(args) -> dict:
    cuda = not args.smoke
    device = "cuda" if cuda else "cpu"
    rows = []
    for dtype_name in args.dtype:
        for K in args.K:
            for V in args.V:
                s, z, y = make_inputs(K, args.N, V, DTYPES[dtype_name], device)
                for provider in args.provider:
                    fn = loss_fn(provider, z, y)
                    if fn is None:
                        print(f"skipping {provider}: not installed", file=sys.stderr)
                        continue
                    for mode in args.mode:
                        row = dict(K=K, N=args.N, V=V, dtype=dtype_name, provider=provider,
                                   mode=mode, ms_median=None, ms_p20=None, ms_p80=None, gbps=None,
                                   peak_mem_mb=None)
                        run, grads = step(fn, s, mode)
                        try:
                            ms = time_cuda(run, grads) if cuda else time_cpu(run)
                            if cuda:
                                row["peak_mem_mb"] = peak_extra_memory_mb(run, grads)
                        except torch.cuda.OutOfMemoryError:
                            row["error"] = "out of memory"
                            torch.cuda.empty_cache()
                        else:
                            nbytes = minimal_bytes(K, args.N, V, DTYPES[dtype_name], mode)
                            row.update(ms_median=ms[0], ms_p20=ms[1], ms_p80=ms[2],
                                       gbps=nbytes / (ms[0] * 1e-3) / 1e9)
                        rows.append(row)
                        print_row(row)
                del s, z, y
                if cuda:
                    torch.cuda.empty_cache()
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run: not a measurement)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_gbps": copy_gbps(device) if cuda else None,
        "config": dict(temperature=TEMPERATURE, alpha=ALPHA, fusion="prob", weights="uniform",
                       labels="all counted"),
        "rows": rows,
    }


HEADER = f"{'K':>2} {'N':>5} {'V':>7} {'dtype':>8} {'provider':>13} {'mode':>7} " \
         f"{'ms':>9} {'p20':>9} {'p80':>9} {'GB/s':>8} {'peak MB':>9}"


def print_row(row: dict) -> None:
    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    print(f"{row['K']:>2} {row['N']:>5} {row['V']:>7} {row['dtype']:>8} {row['provider']:>13} "
          f"{row['mode']:>7} {fmt(row['ms_median'], '9.3f')} {fmt(row['ms_p20'], '9.3f')} "
          f"{fmt(row['ms_p80'], '9.3f')} {fmt(row['gbps'], '8.1f')} "
          f"{fmt(row['peak_mem_mb'], '9.1f')} {row.get('error', '')}", flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--K", type=int, nargs="+", help="numbers of teachers (default: 1 4 8)")
    parser.add_argument("--N", type=int, help="rows, samples or tokens (default: 8192)")
    parser.add_argument("--V", type=int, nargs="+",
                        help="numbers of classes (default: 100 1000 32000 128256)")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--provider", nargs="+", choices=PROVIDERS,
                        help=f"default: all ({', '.join(PROVIDERS)}); "
                             "with --smoke: mtkd torch_eager")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on CPU (the kernel through triton's interpreter): checks "
                             "the harness, measures nothing worth reporting")
    args = parser.parse_args(argv)
    small = args.smoke  # tiny defaults for a smoke run
    args.K = args.K or ([1, 2] if small else [1, 4, 8])
    args.N = args.N or (8 if small else 8192)
    args.V = args.V or ([10, 33] if small else [100, 1000, 32000, 128256])
    if args.provider is None:
        # A smoke run skips the C++ compile of torch.compile on CPU, and Liger (GPU only).
        args.provider = ["mtkd", "torch_eager"] if args.smoke else list(PROVIDERS)
    return args


def smoke(args) -> dict:
    """bench() on CPU with the kernel run by triton's interpreter, which fused_kd_loss picks when
    TRITON_INTERPRET=1 at call time; the variable is restored afterwards."""
    import numpy as np

    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        with np.errstate(all="ignore"):  # the interpreter's numpy meets log(0) and inf - inf
            return bench(args)
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
    print(HEADER)
    results = smoke(args) if args.smoke else bench(args)
    if results["copy_gbps"] is not None:
        print(f"device-to-device copy: {results['copy_gbps']:.1f} GB/s on {results['gpu']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
