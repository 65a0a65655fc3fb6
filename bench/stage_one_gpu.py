"""Stage one's per-position work on a GPU against a Llama-shaped teacher's bare forward (issue 21 item 4).

    python bench/stage_one_gpu.py --json /tmp/stage-one.json      # CUDA only; bash bench/gpu_check.sh stage1

The teacher: Llama-3.2-1B's shapes (hidden 2048, 16 layers, 32 heads over 8 key-value heads, SwiGLU
of 8192, V = 128256), random weights, bfloat16, built here from torch ops (RMSNorm, grouped-query
attention through scaled_dot_product_attention, no rotary embedding: its cost is negligible), so
that the GPU machine needs neither transformers nor zarr. On B x L random tokens (default 4 x 1024:
4096 positions), CUDA-event medians of:

  forward_s      the teacher's forward to its (B * L, V) bfloat16 logits
  work_s         what stage one's top-k layout does on the device per batch (layouts.TopK._head's CUDA
                 path): logits.float(), kernels/stage_one (max, logsumexp at T = 1, 2, entropy) and
                 torch.topk (k = 64), ids sorted, log-probabilities gathered, the label gathered
  work_ref_s     the same with the plain-PyTorch reference in place of the kernel (stage_one_ref)
  kernel_s       kernels/stage_one alone on the float32 logits; its GB/s (the logits read once)
  logsumexp_s    one torch.logsumexp pass over the float32 logits (the CPU figure's unit)

and the figure  stage_one_vs_forward = forward_s / (forward_s + work_s)  (target >= 0.95), with the
kernel's largest difference from the reference. Numbers only from a run on a lent GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

from mtkd.kernels.stage_one import stage_one_ref, stage_one_rows


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, hidden // heads
        self.norm1, self.norm2 = nn.RMSNorm(hidden), nn.RMSNorm(hidden)
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.kv = nn.Linear(hidden, 2 * kv_heads * self.dim, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, n, self.heads, self.dim).transpose(1, 2)
        k, v = self.kv(h).view(b, n, 2, self.kv_heads, self.dim).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, n, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class LlamaShaped(nn.Module):
    def __init__(self, vocab: int, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs after two warm-ups, by CUDA events."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def head(z: torch.Tensor, labels: torch.Tensor, k: int, temperatures: tuple[float, ...], rows_fn) -> dict:
    """The device work of layouts.TopK._head on CUDA, with `rows_fn` for the vocabulary-wide part."""
    z = z.float()
    lse, _, entropy, _ = rows_fn(z, torch.full_like(labels, -1), temperatures)
    values, ids = z.topk(k, dim=1, sorted=False)
    ids, order = ids.sort(dim=1)
    logprobs = (values.gather(1, order) - lse[:, :1]).half()
    label = z.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) - lse[:, 0]
    return {"ids": ids, "logprobs": logprobs, "lse": lse, "entropy": entropy, "label": label}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/stage_one_gpu.py needs CUDA")
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = LlamaShaped(args.vocab, 2048, args.layers, 32, 8, 8192).to(dev, torch.bfloat16).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.length), device=dev)
    labels = torch.randint(0, args.vocab, (args.batch * args.length,), device=dev)
    temps = (1.0, 2.0)
    with torch.inference_mode():
        logits = model(ids).flatten(0, 1)  # (B * L, V) bfloat16
        z = logits.float()
        forward_s = timed(lambda: model(ids), args.repeats)
        work_s = timed(lambda: head(logits, labels, args.top_k, temps, stage_one_rows), args.repeats)
        work_ref_s = timed(lambda: head(logits, labels, args.top_k, temps, stage_one_ref), args.repeats)
        kernel_s = timed(lambda: stage_one_rows(z, labels, temps), args.repeats)
        logsumexp_s = timed(lambda: torch.logsumexp(z, dim=1), args.repeats)
        got, want = stage_one_rows(z, labels, temps), stage_one_ref(z, labels, temps)
        differences = {name: float((a - b).abs().max()) for name, a, b in zip(("lse", "label_logprob", "entropy", "max"), got, want)}
    result = {
        "stage_one_vs_forward": forward_s / (forward_s + work_s),
        "stage_one_vs_forward_ref": forward_s / (forward_s + work_ref_s),
        "forward_s": forward_s, "work_s": work_s, "work_ref_s": work_ref_s, "kernel_s": kernel_s,
        "kernel_gb_per_s": z.numel() * 4 / kernel_s / 1e9, "logsumexp_s": logsumexp_s,
        "kernel_vs_reference_max_abs": differences,
        "conditions": {"teacher": "Llama-3.2-1B shapes (hidden 2048, 32/8 heads, SwiGLU 8192), random bf16 weights",
                       "layers": args.layers, "vocab": args.vocab, "batch": args.batch, "length": args.length,
                       "top_k": args.top_k, "temperatures": list(temps), "gpu": torch.cuda.get_device_name(dev),
                       "torch": torch.__version__, "repeats": args.repeats},
    }
    assert all(math.isfinite(v) for v in differences.values())
    print(json.dumps(result, indent=2))
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
