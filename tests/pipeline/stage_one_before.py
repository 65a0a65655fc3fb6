"""Stage one's per-row work as it was before the one-pass version (commit b2021ad of pipeline/layouts.py),
kept verbatim as the reference the stored bytes are compared with (test_layouts_passes.py)."""

import torch

from mtkd.pipeline.layouts import GROUP, STORAGE, TAIL_CHUNK_BYTES, _label_logprob, row_uniforms, teacher_stream

NORMALISER_CHUNK_BYTES = 2 << 20


def normalisers(z: torch.Tensor, temperatures: tuple[float, ...], *, entropy: bool = False):
    """(n, V) float32 logits -> (n, len(temperatures)): logsumexp(z / T) for each T, over the whole row;
    with `entropy`, also (n,) the exact entropy at T = 1 (temperatures must include 1), as a pair.

    One max pass, then per temperature exp((z - max) / T) summed. A temperature half of another
    stored one squares that one's exponentials instead of taking its own (exp(x / T) = exp(x / 2T)^2,
    exact to float32 rounding; the default 1, 2 needs one exp pass, not two). On the CPU rows go in
    chunks that stay in cache, so the passes over a chunk read memory once; on CUDA one chunk.
    Non-finite rows stay non-finite (NaN, where torch.logsumexp may give inf): they are not stored.

    The entropy comes from the same T = 1 exponentials e = exp(z - max), S = sum e:
        H = -sum p log p = log S - sum_v e_v (z_v - max) / S          (e_v = 0 terms count 0: -inf logits)
    one more pass over the chunk while it is in cache.
    """
    n, vocab = z.shape
    top = z.amax(dim=1)  # (n,)
    out = torch.empty((n, len(temperatures)), dtype=z.dtype, device=z.device)
    ent = torch.empty((n,), dtype=z.dtype, device=z.device) if entropy else None
    chunk = n if z.device.type != "cpu" else max(1, NORMALISER_CHUNK_BYTES // (4 * vocab))
    order = sorted(range(len(temperatures)), key=lambda j: -temperatures[j])  # a T after 2T
    for start in range(0, n, chunk):
        rows, shift = z[start : start + chunk], top[start : start + chunk, None]
        exps: dict[float, torch.Tensor] = {}
        for j in order:
            t = temperatures[j]
            if 2 * t in exps:
                e = exps[2 * t].square()
            else:
                e = rows - shift
                if t != 1.0:
                    e.div_(t)
                e.exp_()
            exps[t] = e
            out[start : start + chunk, j] = e.sum(dim=1)
            if ent is not None and t == 1.0:
                spread = torch.where(e > 0, e * (rows - shift), 0.0).sum(dim=1)  # sum e (z - max)
                ent[start : start + chunk] = out[start : start + chunk, j].log() - spread / out[start : start + chunk, j]
    scale = torch.tensor(temperatures, dtype=z.dtype, device=z.device)
    lse = out.log_().add_(top[:, None] / scale)
    if ent is None:
        return lse
    if not any(t == 1.0 for t in temperatures):
        raise ValueError("the entropy at T = 1 needs 1 among the temperatures")
    return lse, ent


def top_k(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of (n, V) `z` and their column ids (int64), in no order.

    Exactly torch.topk's values (ids alike unless values tie). On the CPU torch.topk costs a partial
    sort of every whole row (measured 30 us a row at V = 8192); here the row's columns are cut into
    GROUP strided groups of V / GROUP (column c holds classes c, c + V/GROUP, ...), the k groups with
    the largest maxima are found (recursively, the same way), and only their GROUP * k members are
    searched: every one of the k largest values lies in those groups, since k groups whose maxima
    are at least any other group's maximum hold k values at least as large as anything outside.
    About 0.6 of torch.topk's time (measured). On CUDA torch.topk is one fast kernel: it is used.
    """
    n, vocab = z.shape
    if z.device.type != "cpu" or vocab < 4 * GROUP * k:
        return z.topk(k, dim=1, sorted=False)
    z = z.contiguous()
    width = vocab // GROUP
    grouped = z[:, : GROUP * width].view(n, GROUP, width)
    _, columns = top_k(grouped.amax(dim=1), k)  # (n, k) of the width columns
    members = columns[:, None, :] + torch.arange(0, GROUP * width, width, device=z.device)[None, :, None]
    candidates = members.view(n, GROUP * k)
    if vocab > GROUP * width:  # the last vocab % GROUP classes are in no group: always candidates
        rest = torch.arange(GROUP * width, vocab, device=z.device).expand(n, -1)
        candidates = torch.cat([candidates, rest], dim=1)
    values, where = z.gather(1, candidates).topk(k, dim=1, sorted=False)
    return values, candidates.gather(1, where)


def sample_unlisted(z: torch.Tensor, listed: torch.Tensor, count: int, seed: int, stream: int, rows: torch.Tensor) -> torch.Tensor:
    """(n, V) float32 logits, (n, k) listed ids, (n,) global rows -> (n, count) int64 draws with
    replacement from softmax(z) restricted to the unlisted classes, ascending per row.

    Inverse CDF in float64, row by row semantics (row chunks bound the (rows, V) float64 work):
    p_v = exp(z_v - max z), 0 for listed v; the draw for uniform u is the first class whose
    cumulative sum exceeds u * sum p. A row with no unlisted mass (every unlisted logit -inf) draws
    its last class; its log-probability is then -inf and the row is refused as non-finite."""
    n, vocab = z.shape
    out = torch.empty((n, count), dtype=torch.int64, device=z.device)
    chunk = max(1, TAIL_CHUNK_BYTES["cuda" if z.device.type == "cuda" else "cpu"] // (8 * vocab))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        p = z[start:stop].double()  # (c, V)
        p.sub_(p.amax(dim=1, keepdim=True)).exp_()
        if listed.shape[1]:
            p.scatter_(1, listed[start:stop], 0.0)
        cdf = p.cumsum_(dim=1)  # (c, V), non-decreasing
        total = cdf[:, -1:]
        target = row_uniforms(seed, stream, rows[start:stop], count) * total  # (c, M) in [0, total)
        drawn = torch.searchsorted(cdf, target, right=True)  # the first class with cdf > target
        # u * total can round up to total: then the last class with mass (the first reaching total).
        last = torch.searchsorted(cdf, total.contiguous(), right=False).clamp(max=vocab - 1)
        out[start:stop] = torch.where(drawn >= vocab, last, drawn)
    return out.sort(dim=1).values


def reduce_before(layout, logits: torch.Tensor, labels: torch.Tensor, rows=None, teacher=None) -> dict[str, torch.Tensor]:
    """The arrays TopK.reduce / SampledTopK.reduce stored before (their head, then the draws)."""
    z = logits.float()
    if layout.top_k:
        lse, entropy = normalisers(z, layout.temperatures, entropy=True)
        top, ids = top_k(z, layout.top_k)
        ids, order = ids.sort(dim=1)
        top = top.gather(1, order)
        arrays = {"topk_ids": ids.to(torch.int32), "topk_logprobs": (top - lse[:, :1]).to(STORAGE[layout.dtype][1]),
                  "lse": lse, "label_logprob": _label_logprob(z, lse[:, 0], labels)}
    else:
        lse, entropy = normalisers(z, layout.temperatures, entropy=True)
        ids = torch.empty((len(z), 0), dtype=torch.int64)
        arrays = {"topk_ids": ids.to(torch.int32), "topk_logprobs": torch.empty((len(z), 0), dtype=STORAGE[layout.dtype][1]),
                  "lse": lse, "label_logprob": _label_logprob(z, lse[:, 0], labels)}
    if layout.entropy:
        arrays["entropy"] = entropy
    if getattr(layout, "tail_samples", 0):
        drawn = sample_unlisted(z, arrays["topk_ids"].long(), layout.tail_samples, layout.tail_seed, teacher_stream(teacher), rows)
        arrays["tail_ids"] = drawn.to(torch.int32)
        arrays["tail_logprobs"] = (z.gather(1, drawn) - arrays["lse"][:, :1]).to(STORAGE[layout.dtype][1])
    return arrays
