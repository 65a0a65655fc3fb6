"""The sparse KD loss on the CPU against plain cross-entropy on the same logits, forward + backward.

    python bench/loss_cpu.py --threads 2 --json /tmp/loss.json                    # the issue's two shapes
    python bench/loss_cpu.py --shape 2048,2048,32,2 --chunk-rows 32,256,2048      # fused-linear chunk sizes

Per shape (N rows, V classes, H hidden, K teachers; k = --top-k listed ids each, T = 2, alpha 1),
interleaved repeats, medians, in one process:
  ce            F.cross_entropy on (N, V) logits
  sparse        fused_sparse_kd_loss on the same logits (kernels/sparse_cpu.py)
  dense         fused_kd_loss on the same logits against K dense teachers' (N, V) logits
                (kernels/dense_cpu.py; --dense-max-v: skipped above that V)
  linear_ce     hidden @ W.T then cross-entropy (the hard-label step's loss)
  linear_sparse fused_linear_sparse_kd_loss(hidden, W) at each --chunk-rows (0: the default rule)
and the ratios sparse / ce, dense / ce and linear_sparse / linear_ce (target: 1.5). The JSON names the torch
threads and the load average (1 min) at the start and end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mtkd.kernels import fused_kd_loss, fused_linear_sparse_kd_loss, fused_sparse_kd_loss
from mtkd.kernels.fused_linear import default_chunk_rows


def _shape(text: str) -> tuple[int, int, int, int]:
    n, v, h, k = (int(x) for x in text.split(","))
    return n, v, h, k


def measure(n: int, v: int, h: int, teachers: int, top_k: int, chunks: list[int], repeats: int, dense_max_v: int = 2048) -> dict:
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    hidden, weight = torch.randn(n, h, generator=g), 0.3 * torch.randn(v, h, generator=g)
    ids = torch.rand(teachers, n, v, generator=g).argsort(dim=2)[:, :, :top_k]  # distinct per row
    logprobs = torch.log_softmax(torch.randn(teachers, n, top_k, generator=g), dim=2) - 0.1  # a tail of 1 - e^-0.1

    def ce():
        s = logits.clone().requires_grad_()
        F.cross_entropy(s, labels).backward()

    def sparse():
        s = logits.clone().requires_grad_()
        fused_sparse_kd_loss(s, ids, logprobs, temperature=2.0).backward()

    dense_logits = 2 * torch.randn(teachers, n, v, generator=g) if v <= dense_max_v else None

    def dense():
        s = logits.clone().requires_grad_()
        fused_kd_loss(s, dense_logits, temperature=2.0).backward()

    def linear_ce():
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        F.cross_entropy(x @ w.T, labels).backward()

    def linear_sparse(rows: int):
        x, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        fused_linear_sparse_kd_loss(x, w, ids, logprobs, temperature=2.0, chunk_rows=rows or None).backward()

    runs = {"ce": ce, "sparse": sparse, **({"dense": dense} if dense_logits is not None else {}), "linear_ce": linear_ce}
    runs.update({f"linear_sparse_chunk{rows or default_chunk_rows(n, v, h)}": (lambda rows=rows: linear_sparse(rows)) for rows in chunks})
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # unmeasured: first-call allocations
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"N": n, "V": v, "H": h, "K": teachers, "k": top_k, "ms": ms, "sparse_over_ce": ms["sparse"] / ms["ce"],
            **({"dense_over_ce": ms["dense"] / ms["ce"]} if "dense" in ms else {}),
            "linear_sparse_over_linear_ce": {name: t / ms["linear_ce"] for name, t in ms.items() if name.startswith("linear_sparse")}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", dest="shapes", type=_shape, action="append",
                        help="N,V,H,K (repeatable; default: 2048,2048,32,2 and 4096,8192,64,3)")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--chunk-rows", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                        help="fused-linear chunk sizes in rows (0: the default rule)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dense-max-v", type=int, default=2048, help="time the dense loss only up to this V (its K x N x V logits)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", dest="json_path", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    rows = [measure(*shape, args.top_k, args.chunk_rows, args.repeats, args.dense_max_v) for shape in args.shapes or [(2048, 2048, 32, 2), (4096, 8192, 64, 3)]]
    result = {"rows": rows, "conditions": {"threads": torch.get_num_threads(), "temperature": 2.0, "alpha": 1.0,
                                           "repeats": args.repeats, "load_average_1min": [load, os.getloadavg()[0]],
                                           "torch": torch.__version__, "cpus": os.cpu_count()}}
    for row in rows:
        print(f"N={row['N']} V={row['V']} H={row['H']} K={row['K']} k={row['k']}: "
              + ", ".join(f"{name} {t:.1f} ms" for name, t in row["ms"].items())
              + f"; sparse/ce {row['sparse_over_ce']:.2f}" + (f", dense/ce {row['dense_over_ce']:.2f}" if "dense_over_ce" in row else ""))
    print(f"({torch.get_num_threads()} threads, load average {result['conditions']['load_average_1min']})")
    if args.json_path:
        args.json_path.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
