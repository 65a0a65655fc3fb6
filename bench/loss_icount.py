"""Instructions of one loss on the CPU, forward + backward, counted by valgrind (load-independent,
where wall times on a shared machine are not): cross-entropy, the sparse loss and the dense loss on
the same (N, V) student logits as bench/loss_cpu.py (T = 2, alpha 1, K teachers, k listed ids).

    valgrind --tool=callgrind --instr-atstart=no python bench/loss_icount.py sparse
    # prints nothing itself: read "I refs" from valgrind's summary (or callgrind_annotate the file)

One call first, uncounted (first-call allocations, imports); then counting is switched on
(callgrind_control -i on) for --calls calls. Instructions are not time: an operation bound by
memory traffic costs more than its instructions say.
"""

from __future__ import annotations

import argparse
import os
import subprocess

import torch
import torch.nn.functional as F

from mtkd.kernels import fused_kd_loss, fused_sparse_kd_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("loss", choices=["ce", "sparse", "dense"])
    parser.add_argument("--shape", default="2048,2048,2", help="N,V,K")
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--calls", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, v, k_teachers = (int(x) for x in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(n, v, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    ids = torch.rand(k_teachers, n, v, generator=g).argsort(dim=2)[:, :, : args.top_k]  # distinct per row
    logprobs = torch.log_softmax(torch.randn(k_teachers, n, args.top_k, generator=g), dim=2) - 0.1
    teachers = 2 * torch.randn(k_teachers, n, v, generator=g)

    def run() -> None:
        s = logits.clone().requires_grad_()
        if args.loss == "ce":
            F.cross_entropy(s, labels).backward()
        elif args.loss == "sparse":
            fused_sparse_kd_loss(s, ids, logprobs, temperature=2.0).backward()
        else:
            fused_kd_loss(s, teachers, temperature=2.0).backward()

    run()
    subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], capture_output=True, check=False)
    for _ in range(args.calls):
        run()
    subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], capture_output=True, check=False)


if __name__ == "__main__":
    main()
