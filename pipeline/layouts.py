"""How a teacher's outputs are stored: the one place where the dense and the top-k layouts differ.

A layout answers three questions, for rows and tokens alike (a token position is a row):
- which arrays a teacher has in the store (`arrays`: names, per-row shapes, dtypes, codecs);
- how a batch of the teacher's (n, V) logits becomes rows of those arrays, on the device and in
  float32 (`reduce`), plus a per-row summary the teacher's stats are built from;
- how stored rows become kernel inputs (`Dense.decode`: logits; `TopK.decode`: ids and
  log-probabilities re-tempered exactly at a stored temperature T).

Dense (SPEC "Store"): `logits` (rows, V), the raw logits at T = 1.
Values (v3, regression teachers): `values` (rows, D) float32, the teacher's raw outputs: no softmax,
no temperature, no entropy; `vocab_size` holds D.
Both layouts (v3): `entropy` (rows,) float32, the teacher's exact entropy at T = 1 over its whole
vocabulary, computed from the float32 logits in the same pass as the normaliser (`normalisers`);
teachers written before v3 have none (`Layout.entropy` False: the store finds no such array).
Top-k: for each row, with z the teacher's logits over its whole vocabulary,
    topk_ids       (rows, k) int32      the k most probable classes, distinct, in ascending id order
    topk_logprobs  (rows, k)            log softmax(z)[id], same order
    lse            (rows, len(Ts))      logsumexp(z / T), one column per stored temperature
    label_logprob  (rows,) float32      log softmax(z)[label]; NaN where the row has no label
and at a stored T:  log p_T(id) = (logprob + lse[T=1]) / T - lse[T]   (z / T minus its normaliser).
Top-k plus a sampled tail (`SampledTopK`, `--tail-samples M`): the top-k arrays plus `tail_ids` and
`tail_logprobs` (rows, M), M draws per row from the unlisted classes; its `decode` gives one sparse
target per row with no tail bucket (SPEC v3 "Sparse targets with sampled tails"; details below).

16-bit values are stored as float16, or bfloat16 kept bit-exact as uint16 (attrs: logical_dtype).
Every array carries zarr's Crc32cCodec after its compressor: a flipped byte fails the read.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

from mtkd.pipeline.errors import BadInputError

# logical dtype -> (dtype stored in Zarr, torch dtype of the values, fill value in the stored dtype)
BF16_NAN_BITS = 0x7FC0  # the canonical bfloat16 quiet NaN, as uint16
STORAGE: dict[str, tuple[np.dtype, torch.dtype, Any]] = {
    "float16": (np.dtype(np.float16), torch.float16, float("nan")),
    "bfloat16": (np.dtype(np.uint16), torch.bfloat16, BF16_NAN_BITS),
    "float32": (np.dtype(np.float32), torch.float32, float("nan")),
}
DTYPES = tuple(STORAGE)
LAYOUTS = ("dense", "topk", "values")
DEFAULT_TOP_K = 64
DEFAULT_TEMPERATURES = (1.0, 2.0)
DENSE_TOKENS_MAX_VOCAB = 1024  # SPEC: tokens are stored dense only when asked and V <= this
FEATURES = "features"  # the group of a teacher's stored module outputs (v3)


@dataclass(frozen=True)
class ArraySpec:
    """One array of a teacher: (num_rows, *row_shape), chunked by whole rows."""

    name: str
    row_shape: tuple[int, ...]
    dtype: np.dtype  # as stored in Zarr
    fill: Any
    compressors: tuple[Any, ...]  # bytes-to-bytes codecs; Crc32cCodec is always appended last
    logical_dtype: str | None = None  # 16-bit floats: what the stored bits mean
    dims: tuple[str, ...] = ("row",)

    def codecs(self) -> list[Any]:
        return [*self.compressors, Crc32cCodec()]

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the values in memory (bfloat16 for its uint16 bits)."""
        if self.logical_dtype is not None:
            return STORAGE[self.logical_dtype][1]
        return {np.dtype(np.int32): torch.int32, np.dtype(np.float32): torch.float32}[self.dtype]


class RowSummary(NamedTuple):
    """Per row of a batch (on the device): whether it may be stored, and what the teacher's stats are
    computed from. Dense rows without a label carry no stats values (NaN / 0): none are needed."""

    nonfinite: torch.Tensor  # (n,) bool: a stored value would be NaN/inf (the row must not be stored)
    label_logprob: torch.Tensor  # (n,) log p(label) at T = 1, NaN without label
    top1: torch.Tensor  # (n,) int64, the most probable class
    top1_logprob: torch.Tensor  # (n,) its log-probability (the confidence, as a log)
    tail: torch.Tensor | None  # (n, len(temperatures)) mass outside the stored top-k, per T (top-k only)


class SparseRows(NamedTuple):
    """Top-k teacher rows as `fused_sparse_kd_loss` takes them (one teacher; stack K of them)."""

    ids: torch.Tensor  # (n, k) int64
    logprobs: torch.Tensor  # (n, k) float32: log-probabilities at the requested temperature
    label_logprob: torch.Tensor  # (n,) float32 at T = 1, NaN where the row has no label


@dataclass(frozen=True)
class Layout:
    """A teacher's storage: its layout name, logical dtype and vocabulary size (V of its logits)."""

    name: ClassVar[str]
    dtype: str
    vocab_size: int
    entropy: bool = field(default=True, kw_only=True)  # v3: the `entropy` array is stored (False: older teachers)
    # v3 "Features": (module, per-row shape) of each captured module, stored as features/<module>
    features: tuple[tuple[str, tuple[int, ...]], ...] = field(default=(), kw_only=True)

    def attrs(self) -> dict[str, Any]:
        """The teacher attributes SPEC lists for its layout (see `layout_from_attrs`)."""
        out = {"layout": self.name, "dtype": self.dtype, "vocab_size": self.vocab_size, "top_k": None, "temperatures": None}
        if self.features:  # only where there are some: older teachers' attributes (and records) stay as they were
            out["features"] = {module: list(shape) for module, shape in self.features}
        return out

    def feature_arrays(self) -> list[ArraySpec]:
        """features/<module> (rows, *shape) in the teacher's dtype, uncompressed (hidden states barely
        compress), NaN fill, whole-row chunks like every array."""
        stored, _, fill = STORAGE[self.dtype]
        return [ArraySpec(f"{FEATURES}/{module}", tuple(shape), stored, fill, (), self.dtype,
                          ("row", *(f"{module}.{i}" for i in range(len(shape))))) for module, shape in self.features]

    def feature_row_bytes(self) -> dict[str, int]:
        """Uncompressed bytes per row of each stored feature."""
        return {module: math.prod(shape) * STORAGE[self.dtype][0].itemsize for module, shape in self.features}

    def entropy_arrays(self) -> list[ArraySpec]:
        """[the `entropy` array] where this teacher stores it, else []."""
        return [ArraySpec("entropy", (), np.dtype(np.float32), float("nan"), _blosc(4), None, ("row",))] if self.entropy else []

    def arrays(self) -> list[ArraySpec]:
        raise NotImplementedError

    def row_bytes(self) -> int:
        """Uncompressed bytes of one row of the largest array (what sets the rows per chunk)."""
        return max(math.prod(a.row_shape) * a.dtype.itemsize for a in self.arrays())

    def reduce(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], RowSummary]:
        """(n, V) logits and (n,) labels (-100: none), on the device -> stored arrays' rows (on the
        device, in their stored torch dtype) and the rows' summary."""
        raise NotImplementedError

    def summarize(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor) -> RowSummary:
        """Stored rows (torch tensors in their stored dtypes) -> what the stats are computed from."""
        raise NotImplementedError

    def tensors(self, raw: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Arrays as read from the store -> torch tensors in their stored dtypes (bfloat16 from its bits)."""
        logical = {a.name: a.logical_dtype for a in self.arrays()}
        return {k: from_storage(v, logical[k]) if logical[k] else torch.from_numpy(v) for k, v in raw.items()}


@dataclass(frozen=True)
class Dense(Layout):
    name: ClassVar[str] = "dense"

    def arrays(self) -> list[ArraySpec]:
        stored, _, fill = STORAGE[self.dtype]
        # No compressor: dense logits barely compress (~1.09x) and decompression slowed reads 2-4x.
        return [ArraySpec("logits", (self.vocab_size,), stored, fill, (), self.dtype, ("row", "class")), *self.entropy_arrays(),
                *self.feature_arrays()]

    def reduce(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], RowSummary]:
        stored = STORAGE[self.dtype][1]
        # On CUDA the cast happens here (half the bytes over the bus for 16-bit stores); on the CPU
        # the copy into the block's buffer casts on the way, in one pass.
        values = logits if logits.device.type == "cpu" else logits.to(stored)
        # Finite as stored: a row overflows iff its largest magnitude does (the cast is monotone);
        # amax and amin propagate NaN. Two reading passes (no |logits| copy) instead of isfinite over
        # the cast row.
        nonfinite = ~torch.isfinite(torch.maximum(logits.amax(dim=1), -logits.amin(dim=1)).to(stored))
        if self.entropy:  # from the float32 logits, one normaliser pass (not from the 16-bit values stored)
            values = {"logits": values, "entropy": normalisers(logits.float(), (1.0,), entropy=True)[1]}
        else:
            values = {"logits": values}
        keep = labels >= 0
        if not bool(keep.any()):  # unlabelled rows (a transfer set): no stats to compute
            nan = torch.full(labels.shape, float("nan"), device=logits.device)
            return values, RowSummary(nonfinite, nan, torch.zeros_like(labels), nan, None)
        if bool(keep.all()):
            return values, self.summarize({"logits": logits.to(stored)}, labels)._replace(nonfinite=nonfinite)
        labelled = self.summarize({"logits": logits[keep].to(stored)}, labels[keep])
        summary = RowSummary(
            nonfinite,
            torch.full(labels.shape, float("nan"), device=logits.device).masked_scatter(keep, labelled.label_logprob),
            torch.zeros_like(labels).masked_scatter(keep, labelled.top1),
            torch.full(labels.shape, float("nan"), device=logits.device).masked_scatter(keep, labelled.top1_logprob),
            None,
        )
        return values, summary

    def summarize(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor) -> RowSummary:
        z = arrays["logits"].float()  # the logits as stored (16-bit rounding counts)
        lse = torch.logsumexp(z, dim=1)
        top, top1 = z.max(dim=1)
        return RowSummary(~torch.isfinite(z).all(dim=1), _label_logprob(z, lse, labels), top1, top - lse, None)

    def decode(self, raw: dict[str, np.ndarray]) -> torch.Tensor:
        """Stored rows -> (n, V) logits in the logical dtype (bfloat16 bit-exact)."""
        return from_storage(raw["logits"], self.dtype)


@dataclass(frozen=True)
class Values(Layout):
    """A regression teacher (v3): `values` (rows, D) float32, its raw outputs as they are (the
    batch's (n, D) output is what `reduce` gets in place of logits). `dtype` is always float32."""

    name: ClassVar[str] = "values"
    entropy: bool = field(default=False, kw_only=True)  # a regression output has no entropy

    def arrays(self) -> list[ArraySpec]:
        return [ArraySpec("values", (self.vocab_size,), np.dtype(np.float32), float("nan"), (), None, ("row", "output")),
                *self.feature_arrays()]

    def reduce(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], RowSummary]:
        values = {"values": logits.float()}  # (n, D) the outputs, in float32 whatever the forward's dtype
        return values, self.summarize(values, labels)

    def summarize(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor) -> RowSummary:
        v = arrays["values"].float()
        nan = torch.full((len(v),), float("nan"), device=v.device)  # no class, no label log-probability
        return RowSummary(~torch.isfinite(v).all(dim=1), nan, torch.zeros(len(v), dtype=torch.int64, device=v.device), nan, None)

    def decode(self, raw: dict[str, np.ndarray]) -> torch.Tensor:
        """Stored rows -> (n, D) float32 values."""
        return torch.from_numpy(raw["values"])


@dataclass(frozen=True)
class TopK(Layout):
    top_k: int = DEFAULT_TOP_K
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES  # sorted, 1.0 first
    name: ClassVar[str] = "topk"

    def attrs(self) -> dict[str, Any]:
        return {**super().attrs(), "top_k": self.top_k, "temperatures": list(self.temperatures)}

    def arrays(self) -> list[ArraySpec]:
        stored, _, fill = STORAGE[self.dtype]
        k, t = self.top_k, len(self.temperatures)
        return [
            ArraySpec("topk_ids", (k,), np.dtype(np.int32), -1, _blosc(4), None, ("row", "rank")),
            ArraySpec("topk_logprobs", (k,), stored, fill, _blosc(stored.itemsize), self.dtype, ("row", "rank")),
            ArraySpec("lse", (t,), np.dtype(np.float32), float("nan"), _blosc(4), None, ("row", "temperature")),
            ArraySpec("label_logprob", (), np.dtype(np.float32), float("nan"), _blosc(4), None, ("row",)),
            *self.entropy_arrays(),
            *self.feature_arrays(),
        ]

    def reduce(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], RowSummary]:
        arrays, _ = self._head(logits.float(), labels)
        return arrays, self.summarize(arrays, labels)

    def _head(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(n, V) float32 logits -> the top-k arrays and (n,) the rows' maxima. Every normaliser is over
        the teacher's whole vocabulary, in float32; one pass over the logits (`row_pass`)."""
        done = row_pass(z, self.temperatures, entropy=True, k=self.top_k)  # lse (n, T), entropy (n,)
        lse, top, ids = done.lse, done.topk_values, done.topk_ids  # (n, k): raw logits; minus lse[T=1] log-probabilities
        # Stored in ascending id order (log-probabilities alike): measured to compress best (README).
        ids, order = ids.sort(dim=1)
        top = top.gather(1, order)
        arrays = {
            "topk_ids": ids.to(torch.int32),
            "topk_logprobs": (top - lse[:, :1]).to(STORAGE[self.dtype][1]),
            "lse": lse,
            "label_logprob": _label_logprob(z, lse[:, 0], labels),
        }
        if self.entropy:
            arrays["entropy"] = done.entropy
        return arrays, done.top

    def summarize(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor) -> RowSummary:
        logprobs = arrays["topk_logprobs"].float()  # as stored, so that stats match what readers get
        # Not storable: a non-finite log-probability or normaliser, or a labelled row whose label
        # log-probability is not finite (-inf: the teacher rules its label out).
        good = torch.isfinite(logprobs).all(dim=1) & torch.isfinite(arrays["lse"]).all(dim=1)
        good &= torch.isfinite(arrays["label_logprob"]) | (labels < 0)
        if "entropy" in arrays:
            good &= torch.isfinite(arrays["entropy"])
        top, where = logprobs.max(dim=1)
        top1 = arrays["topk_ids"].gather(1, where[:, None]).squeeze(1).long()
        tempered = retemper(logprobs, arrays["lse"], self.temperatures)  # (T, n, k)
        tail = (1.0 - tempered.exp().sum(dim=2)).clamp(min=0.0).T  # (n, T): mass on unlisted classes
        return RowSummary(~good, arrays["label_logprob"], top1, top, tail)

    def decode(self, raw: dict[str, np.ndarray], temperature: float = 1.0) -> SparseRows:
        """Stored rows -> ids and log-probabilities at `temperature` (one of the stored ones)."""
        column = self.temperature_index(temperature)
        # Memory of its own when re-tempered in place (a float32 store's would be `raw`'s).
        logprobs = from_storage(raw["topk_logprobs"], self.dtype).to(torch.float32, copy=bool(column))
        if column:
            lse = torch.from_numpy(raw["lse"])
            # In place, the same three float32 operations in the same order: a new (n, k) tensor for
            # each cost the reader more (page faults) than the arithmetic.
            logprobs.add_(lse[:, :1]).div_(self.temperatures[column]).sub_(lse[:, column : column + 1])
        ids = torch.from_numpy(raw["topk_ids"].astype(np.int64))
        return SparseRows(ids, logprobs, torch.from_numpy(raw["label_logprob"]))

    def temperature_index(self, temperature: float) -> int:
        for i, t in enumerate(self.temperatures):
            if math.isclose(t, float(temperature), rel_tol=0, abs_tol=1e-9):
                return i
        raise BadInputError(f"temperature {temperature:g} is not stored (stored: {format_temperatures(self.temperatures)})")

    @property
    def target_width(self) -> int:
        """Columns of the sparse target `decode` gives."""
        return self.top_k


def retemper(logprobs: torch.Tensor, lse: torch.Tensor, temperatures: tuple[float, ...]) -> torch.Tensor:
    """(n, k) log-probabilities at T = 1 and (n, len(temperatures)) normalisers, column j being
    logsumexp(z / temperatures[j]) with temperatures[0] == 1 -> (len(temperatures), n, k) at each T:
    log p_T = (logprob + lse[T=1]) / T - lse[T], i.e. z / T minus its normaliser."""
    z = logprobs + lse[:, :1]  # the raw logits of the listed classes
    return torch.stack([z / t - lse[:, j : j + 1] for j, t in enumerate(temperatures)])


# -- the vocabulary-wide work of a top-k row, done as few times over (n, V) as exactness allows --------
# On the CPU this is most of stage one's cost beyond the forward (bench/pipeline.py's
# infer_overhead_passes, in passes of torch.logsumexp over the same logits): the row's maximum, its
# normalisers at every stored T, its entropy and its top-k are all computed chunk by chunk of rows
# that stay in cache (`row_pass`), so that the logits are read from memory once; the float64 tail
# draws (`sample_unlisted`) read them once more. Every float operation is the one the straightforward
# version did, on tensors of the same shapes (so that vectorised and scalar loops split alike): the
# stored bytes are bit-identical to it (tests/pipeline/test_layouts_passes.py, bench/identical.py).

NORMALISER_CHUNK_BYTES = 2 << 20  # CPU: rows per pass that stay in cache (measured best of 1-64 MiB on one thread; 2-16 alike on two)
GROUP = 8  # top_k: classes per group whose maximum stands for them (measured best of 4, 8, 16, 32)


class RowPass(NamedTuple):
    """What one pass over a batch's (n, V) float32 logits gives (`row_pass`)."""

    top: torch.Tensor  # (n,) the row's maximum
    lse: torch.Tensor  # (n, len(temperatures)) logsumexp(z / T)
    entropy: torch.Tensor | None  # (n,) at T = 1, when asked
    topk_values: torch.Tensor | None  # (n, k) the k largest logits, in no order (k > 0)
    topk_ids: torch.Tensor | None  # (n, k) int64, their classes


def normalisers(z: torch.Tensor, temperatures: tuple[float, ...], *, entropy: bool = False):
    """(n, V) float32 logits -> (n, len(temperatures)): logsumexp(z / T) for each T, over the whole row;
    with `entropy`, also (n,) the exact entropy at T = 1 (temperatures must include 1), as a pair.
    Non-finite rows stay non-finite (NaN, where torch.logsumexp may give inf): they are not stored.
    (`row_pass` without the top-k; the maths is there.)"""
    done = row_pass(z, temperatures, entropy=entropy)
    return (done.lse, done.entropy) if entropy else done.lse


def row_pass(z: torch.Tensor, temperatures: tuple[float, ...], *, entropy: bool = False, k: int = 0) -> RowPass:
    """(n, V) float32 logits -> their maxima, normalisers at every T, the entropy at T = 1 (with
    `entropy`) and the top-k (k > 0: `top_k`'s values and ids), in one pass over memory on the CPU.

    One max, then per temperature exp((z - max) / T) summed. A temperature half of another stored one
    squares that one's exponentials instead of taking its own (exp(x / T) = exp(x / 2T)^2, exact to
    float32 rounding; the default 1, 2 needs one exp pass, not two). The entropy comes from the same
    T = 1 exponentials e = exp(z - max), S = sum e:
        H = -sum p log p = log S - sum_v e_v (z_v - max) / S          (e_v = 0 terms count 0: -inf logits)
    On the CPU rows go in chunks that stay in cache (NORMALISER_CHUNK_BYTES), and every pass over a
    chunk reads it there: the group maxima `top_k` searches first (their maximum is the row's), the
    differences z - max (once, reused by every T and the entropy), the exponentials (in reused
    buffers, squared in place down a chain of halved temperatures), their sums, and the chunk's top-k.
    On CUDA the maximum, the normalisers and the entropy are one Triton kernel (mtkd.kernels.stage_one,
    the logits read once) and the top-k torch.topk: not bit-identical to the CPU's float32 sums (a
    different summation order), deterministic all the same (no atomics; each row alone).
    """
    n, vocab = z.shape
    if entropy and not any(t == 1.0 for t in temperatures):
        raise ValueError("the entropy at T = 1 needs 1 among the temperatures")
    if z.is_cuda and temperatures and temperatures[0] == 1.0 and _cuda_kernel() is not None:
        # One Triton program per row, the logits read once (the label's log-probability stays a
        # gather, by the caller); the top-k by torch.topk, one more read.
        lse, _, ent, top = _cuda_kernel()(z, torch.full((n,), -1, dtype=torch.int64, device=z.device), temperatures)
        values, ids = z.topk(k, dim=1, sorted=False) if k else (None, None)
        return RowPass(top, lse, ent if entropy else None, values, ids)
    sums = torch.empty((n, len(temperatures)), dtype=z.dtype, device=z.device)
    ent = torch.empty((n,), dtype=z.dtype, device=z.device) if entropy else None
    top = torch.empty((n,), dtype=z.dtype, device=z.device)
    values = torch.empty((n, k), dtype=z.dtype, device=z.device) if k else None
    ids = torch.empty((n, k), dtype=torch.int64, device=z.device) if k else None
    cpu = z.device.type == "cpu"
    if cpu:
        z = z.contiguous()  # the group maxima view its rows
    chunk = n if not cpu else max(1, NORMALISER_CHUNK_BYTES // (4 * vocab))
    order = sorted(range(len(temperatures)), key=lambda j: -temperatures[j])  # a T after 2T
    halves = {temperatures[j] for j in order if temperatures[j] / 2 in temperatures}  # exponentials squared once used
    # After T = 1, does a temperature still need z - max (one below 1 that is not half of another)?
    diff_after_one = any(t < 1.0 and 2 * t not in temperatures for t in temperatures)
    grouped = cpu and k and vocab >= 4 * GROUP * k
    width = vocab // GROUP
    rows_max = min(chunk, n)
    diff = torch.empty((rows_max, vocab), dtype=z.dtype, device=z.device)
    buffers = [torch.empty((rows_max, vocab), dtype=z.dtype, device=z.device) for _ in range(min(2, len(temperatures)))]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        c, rows = stop - start, z[start:stop]
        if grouped:  # the group maxima; their maximum (and the ungrouped last classes') is the row's
            group_max = rows[:, : GROUP * width].view(c, GROUP, width).amax(dim=1)
            torch.amax(group_max, dim=1, out=top[start:stop])
            if vocab > GROUP * width:
                torch.maximum(top[start:stop], rows[:, GROUP * width :].amax(dim=1), out=top[start:stop])
        else:
            torch.amax(rows, dim=1, out=top[start:stop])
        d = torch.sub(rows, top[start:stop, None], out=diff[:c])  # z - max
        exps: dict[float, torch.Tensor] = {}
        free = [b[:c] for b in buffers]
        for j in order:
            t = temperatures[j]
            if 2 * t in exps:
                e = exps.pop(2 * t).square_()  # 2t is used once: by t
            else:
                e = free.pop() if free else torch.empty_like(d)
                if t != 1.0:
                    torch.div(d, t, out=e)
                    e.exp_()
                else:
                    torch.exp(d, out=e)
            sums[start:stop, j] = e.sum(dim=1)
            if ent is not None and t == 1.0:
                # sum e (z - max), 0 where e is 0 ((z - max) * 0 is -0 or NaN there: -0 adds as 0)
                spread = torch.mul(d, e) if diff_after_one else d.mul_(e)
                spread = spread.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(dim=1)
                s = sums[start:stop, j]
                ent[start:stop] = s.log() - spread / s
            if t in halves:
                exps[t] = e
            else:
                free.append(e)
        if k:
            v, i = top_k(rows, k, group_max=group_max if grouped else None)
            values[start:stop], ids[start:stop] = v, i
    scale = torch.tensor(temperatures, dtype=z.dtype, device=z.device)
    lse = sums.log_().add_(top[:, None] / scale)
    return RowPass(top, lse, ent, values, ids)


def _cuda_kernel():
    """mtkd.kernels.stage_one.stage_one_rows, or None where triton is not installed."""
    try:
        from mtkd.kernels.stage_one import stage_one_rows
    except ModuleNotFoundError as error:
        if error.name != "triton":
            raise
        return None
    return stage_one_rows


def top_k(z: torch.Tensor, k: int, *, group_max: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest values of each row of (n, V) `z` and their column ids (int64), in no order.

    Exactly torch.topk's values (ids alike unless values tie). On the CPU torch.topk costs a partial
    sort of every whole row (measured 30 us a row at V = 8192); here the row's columns are cut into
    GROUP strided groups of V / GROUP (column c holds classes c, c + V/GROUP, ...), the k groups with
    the largest maxima are found (recursively, the same way), and only their GROUP * k members are
    searched: every one of the k largest values lies in those groups, since k groups whose maxima
    are at least any other group's maximum hold k values at least as large as anything outside.
    About 0.6 of torch.topk's time (measured). Row by row: any split of the rows gives the same.
    `group_max`: those (n, V / GROUP) maxima, when already computed (`row_pass`).
    On CUDA torch.topk is one fast kernel: it is used.
    """
    n, vocab = z.shape
    if z.device.type != "cpu" or vocab < 4 * GROUP * k:
        return z.topk(k, dim=1, sorted=False)
    z = z.contiguous()
    width = vocab // GROUP
    if group_max is None:
        group_max = z[:, : GROUP * width].view(n, GROUP, width).amax(dim=1)
    _, columns = top_k(group_max, k)  # (n, k) of the width columns
    members = columns[:, None, :] + torch.arange(0, GROUP * width, width, device=z.device)[None, :, None]
    candidates = members.view(n, GROUP * k)
    if vocab > GROUP * width:  # the last vocab % GROUP classes are in no group: always candidates
        rest = torch.arange(GROUP * width, vocab, device=z.device).expand(n, -1)
        candidates = torch.cat([candidates, rest], dim=1)
    values, where = z.gather(1, candidates).topk(k, dim=1, sorted=False)
    return values, candidates.gather(1, where)


def _label_logprob(z: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(z)[label] per row, NaN where label is -100 (float32)."""
    has = labels >= 0
    picked = z.gather(1, labels.clamp(min=0).view(-1, 1)).squeeze(1) - lse
    return torch.where(has, picked, torch.full_like(picked, float("nan")))


def from_storage(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored 16/32-bit values -> a torch tensor in the logical dtype (bfloat16 from its uint16 bits)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(raw).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(raw))


def to_storage(values: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    """A host tensor -> the numpy array Zarr stores (bfloat16 as its uint16 bits, a view)."""
    values = values.detach().cpu().contiguous()
    if values.dtype == torch.bfloat16:
        return values.view(torch.int16).numpy().view(np.uint16)
    out = values.numpy()
    if out.dtype != dtype:
        raise TypeError(f"expected {dtype} values, got {out.dtype}")
    return out


def format_temperatures(temperatures: tuple[float, ...] | list[float]) -> str:
    return ",".join(f"{t:g}" for t in temperatures)


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'1,2,4' -> (1.0, 2.0, 4.0): positive, distinct, 1 added when missing, sorted (1 first)."""
    values = []
    for part in text.split(","):
        try:
            t = float(part)
        except ValueError:
            raise BadInputError(f"--temperatures {text!r}: {part.strip()!r} is not a number") from None
        if not math.isfinite(t) or t <= 0:
            raise BadInputError(f"--temperatures {text!r}: {part.strip()!r} is not a positive temperature")
        if t in values:
            raise BadInputError(f"--temperatures {text!r}: {t:g} is listed twice")
        values.append(t)
    return tuple(sorted(set(values) | {1.0}, key=lambda t: (t != 1.0, t)))


def layout_from_attrs(attrs: dict[str, Any], num_classes: int, *, entropy: bool = False) -> Dense | TopK | Values:
    """A stored teacher's layout; format-1 teachers (no `layout`) are dense over the store's classes.
    `entropy`: the teacher has the v3 `entropy` array (older teachers do not)."""
    layout = attrs.get("layout", "dense")
    vocab = int(attrs.get("vocab_size") or num_classes)
    features = tuple((str(m), tuple(int(d) for d in shape)) for m, shape in (attrs.get("features") or {}).items())
    if layout == "dense":
        return Dense(attrs["dtype"], vocab, entropy=entropy, features=features)
    if layout == "values":
        return Values(attrs["dtype"], vocab, features=features)
    if layout == "topk" and attrs.get("tail_samples"):
        return SampledTopK(attrs["dtype"], vocab, int(attrs["top_k"]), tuple(float(t) for t in attrs["temperatures"]),
                           int(attrs["tail_samples"]), int(attrs.get("tail_seed", 0)), entropy=entropy, features=features)
    if layout == "topk":
        return TopK(attrs["dtype"], vocab, int(attrs["top_k"]), tuple(float(t) for t in attrs["temperatures"]), entropy=entropy,
                    features=features)
    raise ValueError(f"unknown layout {layout!r}")


def _blosc(typesize: int) -> tuple[Any, ...]:
    """The top-k arrays' compressor, chosen by measurement (bench/token_encoding.py, README "bytes per
    token"): with ids sorted per row, blosc-zstd with byte shuffle gave 120 B/token at k = 64 (raw:
    396; zstd-3 on ids in probability order: 172), lossless, and read fastest of the compact choices."""
    return (BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.shuffle, typesize=typesize),)


# -- top-k plus a sampled tail (SPEC v3 "Sparse targets with sampled tails") -------------------------
# Stage one adds, per row, M draws with replacement from the teacher at T = 1 restricted to the
# classes the top-k does not list (all classes when k = 0):
#     tail_ids       (rows, M) int32      ascending; a repeated id is a repeated draw
#     tail_logprobs  (rows, M)            log softmax(z)[id] at T = 1, same order, the store's dtype
# The draws are a function of (tail_seed, teacher name, global row) alone: each row's M uniforms come
# from a counter-based hash of those three (pure integer arithmetic, on the device), and each uniform
# is inverted through the row's own float64 cumulative distribution. Nothing depends on the batch
# (its size, its other rows) or the thread count: row-wise float64 operations differ between two
# batchings at most by float64 rounding (~1e-16 of the row's mass), which moves a draw only if its
# uniform lies that close to a class boundary.
# Stage two (`SampledTopK.decode`) turns head + samples into one target per row with no tail bucket:
# the head's exact probabilities at T, and for each distinct sampled id j with count c_j
#     r_T c_j u_j / sum_i c_i u_i,   u_j = p_T(j) / p_1(j),   r_T = 1 - sum_head p_T (exact tail mass)
# (at T = 1: r c_j / M, unbiased); repeated draws become padding ids past every vocabulary with
# log-probability -inf (probability 0), so ids stay distinct per row as the sparse kernels require.

TAIL_PAD_ID = 2**30  # repeated draws become ids TAIL_PAD_ID + column: past any vocabulary, distinct
TAIL_CHUNK_BYTES = {"cpu": 8 << 20, "cuda": 256 << 20}  # float64 (rows, V) work per pass
SEED_MAX = 2**32 - 1
_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SampledTopK(TopK):
    """Top-k plus `tail_samples` draws from the unlisted classes per row (k may be 0: pure sampling)."""

    tail_samples: int = 0
    tail_seed: int = 0

    @property
    def target_width(self) -> int:
        """Columns of the sparse target `decode` gives (head + one per draw)."""
        return self.top_k + self.tail_samples

    def attrs(self) -> dict[str, Any]:
        return {**super().attrs(), "tail_samples": self.tail_samples, "tail_seed": self.tail_seed}

    def arrays(self) -> list[ArraySpec]:
        stored, _, fill = STORAGE[self.dtype]
        m = self.tail_samples
        return [
            *super().arrays(),
            ArraySpec("tail_ids", (m,), np.dtype(np.int32), -1, _blosc(4), None, ("row", "draw")),
            ArraySpec("tail_logprobs", (m,), stored, fill, _blosc(stored.itemsize), self.dtype, ("row", "draw")),
        ]

    def reduce(self, logits: torch.Tensor, labels: torch.Tensor, *, rows: torch.Tensor | None = None,
               teacher: str | None = None) -> tuple[dict[str, torch.Tensor], RowSummary]:
        """As TopK's, plus the draws; `rows` (n,) are the rows' global indices in the store and
        `teacher` the teacher's name: with the seed, all the draws depend on."""
        if rows is None or teacher is None:
            raise ValueError("a sampled layout draws from (seed, teacher, row): give rows= and teacher=")
        z = logits.float()  # (n, V)
        if self.top_k:  # the head exactly as TopK stores it (every array TopK has)
            arrays, top = self._head(z, labels)
            ids = arrays["topk_ids"].long()
        else:
            done = row_pass(z, self.temperatures, entropy=True)
            lse, entropy, top = done.lse, done.entropy, done.top  # (n, T), (n,), (n,)
            ids = torch.empty((len(z), 0), dtype=torch.int64, device=z.device)
            arrays = {
                "topk_ids": ids.to(torch.int32),
                "topk_logprobs": torch.empty((len(z), 0), dtype=STORAGE[self.dtype][1], device=z.device),
                "lse": lse,
                "label_logprob": _label_logprob(z, lse[:, 0], labels),
            }
            if self.entropy:
                arrays["entropy"] = entropy
        drawn = sample_unlisted(z, ids, self.tail_samples, self.tail_seed, teacher_stream(teacher), rows.to(z.device), top=top)
        arrays["tail_ids"] = drawn.to(torch.int32)
        arrays["tail_logprobs"] = (z.gather(1, drawn) - arrays["lse"][:, :1]).to(STORAGE[self.dtype][1])
        return arrays, self.summarize(arrays, labels)

    def summarize(self, arrays: dict[str, torch.Tensor], labels: torch.Tensor) -> RowSummary:
        if "tail_logprobs" not in arrays:  # TopK.reduce summarising the head it has just made
            return super().summarize(arrays, labels)
        tail_lp = arrays["tail_logprobs"].float()
        if self.top_k:
            summary = super().summarize(arrays, labels)
        else:  # pure sampling: the most probable draw stands for the top-1; every class is tail
            good = torch.isfinite(arrays["lse"]).all(dim=1) & (torch.isfinite(arrays["label_logprob"]) | (labels < 0))
            if "entropy" in arrays:
                good &= torch.isfinite(arrays["entropy"])
            top, where = tail_lp.max(dim=1)
            top1 = arrays["tail_ids"].gather(1, where[:, None]).squeeze(1).long()
            tail = torch.ones((len(tail_lp), len(self.temperatures)), dtype=torch.float32, device=tail_lp.device)
            summary = RowSummary(~good, arrays["label_logprob"], top1, top, tail)
        return summary._replace(nonfinite=summary.nonfinite | ~torch.isfinite(tail_lp).all(dim=1))

    def decode(self, raw: dict[str, np.ndarray], temperature: float = 1.0) -> SparseRows:
        """Stored rows -> one sparse target per row at `temperature`: (n, k + M) ids and
        log-probabilities, the head exact, the tail estimated (see above); listed mass 1."""
        head = super().decode(raw, temperature)
        column = self.temperature_index(temperature)
        lse = torch.from_numpy(raw["lse"])
        tail_ids = torch.from_numpy(raw["tail_ids"].astype(np.int64))
        tail_lp = from_storage(raw["tail_logprobs"], self.dtype).float()
        ids, logprobs = tail_target(head.logprobs, tail_ids, tail_lp, lse[:, 0], lse[:, column], self.temperatures[column])
        return SparseRows(torch.cat([head.ids, ids], dim=1), torch.cat([head.logprobs, logprobs], dim=1), head.label_logprob)


def teacher_stream(name: str) -> int:
    """A teacher's 32-bit stream number: crc32 of its name (the same in every process, unlike hash())."""
    return zlib.crc32(name.encode("utf-8"))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding values in [0, 2^32). The
    products wrap modulo 2^64; their low 32 bits, which are kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def row_uniforms(seed: int, stream: int, rows: torch.Tensor, count: int) -> torch.Tensor:
    """(n,) global row indices -> (n, count) float64 uniforms in [0, 1), 53 random bits each, a pure
    function of (seed, stream, row, column): counter-based, so any subset of rows, in any batch, on
    any device, gets the same numbers."""
    rows = rows.long()
    key = _mix32(torch.full_like(rows, (seed & _MASK32) ^ 0x5EED5EED))
    key = _mix32(key ^ (stream & _MASK32))
    key = _mix32(key ^ (rows & _MASK32))
    key = _mix32(key ^ ((rows >> 32) & _MASK32))  # (n,)
    counter = torch.arange(2 * count, device=rows.device, dtype=torch.int64) * 0x9E3779B9 & _MASK32  # (2M,)
    words = _mix32(_mix32(key[:, None] ^ counter[None, :]))  # (n, 2M)
    high, low = words[:, 0::2] >> 6, words[:, 1::2] >> 5  # 26 + 27 bits
    return (high * (1 << 27) + low).double() * 2.0**-53


def sample_unlisted(z: torch.Tensor, listed: torch.Tensor, count: int, seed: int, stream: int, rows: torch.Tensor,
                    *, top: torch.Tensor | None = None) -> torch.Tensor:
    """(n, V) float32 logits, (n, k) listed ids, (n,) global rows -> (n, count) int64 draws with
    replacement from softmax(z) restricted to the unlisted classes, ascending per row.

    Inverse CDF in float64, row by row semantics (row chunks bound the (rows, V) float64 work):
    p_v = exp(z_v - max z), 0 for listed v; the draw for uniform u is the first class whose
    cumulative sum exceeds u * sum p. A row with no unlisted mass (every unlisted logit -inf) draws
    its last class; its log-probability is then -inf and the row is refused as non-finite.
    `top`: the rows' maxima when known (`row_pass`; float64 of the float32 maximum is the float64
    maximum). Each chunk is one float64 buffer, reused: z - max is taken in float64 straight from
    the float32 logits (the same numbers as a float64 copy minus its maximum), then exponentiated,
    its listed classes zeroed and summed cumulatively, all in place."""
    n, vocab = z.shape
    out = torch.empty((n, count), dtype=torch.int64, device=z.device)
    chunk = max(1, TAIL_CHUNK_BYTES["cuda" if z.device.type == "cuda" else "cpu"] // (8 * vocab))
    if top is None:
        top = z.amax(dim=1) if n else torch.empty((0,), dtype=z.dtype, device=z.device)
    top = top.double()[:, None]
    buffer = torch.empty((min(chunk, n), vocab), dtype=torch.float64, device=z.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        p = torch.sub(z[start:stop], top[start:stop], out=buffer[: stop - start])  # (c, V) in float64
        p.exp_()
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


def tail_target(head_logprobs: torch.Tensor, tail_ids: torch.Tensor, tail_logprobs: torch.Tensor,
                lse1: torch.Tensor, lse_t: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampled tail of a sparse target at `temperature`, vectorised over rows (any leading dims):

    head_logprobs (..., k) at T; tail_ids (..., M) ascending and tail_logprobs (..., M) at T = 1 as
    stored; lse1, lse_t (...,) the normalisers at 1 and T -> ids (..., M), log-probabilities (..., M):
    each distinct id once, at the first of its draws, with log(r_T c_j u_j / sum_i c_i u_i); its
    repeats TAIL_PAD_ID + column with -inf. In float64, then float32."""
    m = tail_ids.shape[-1]
    ids = tail_ids.long()
    lp1 = tail_logprobs.double()
    r = (1.0 - head_logprobs.double().exp().sum(dim=-1)).clamp(min=0.0)  # exact tail mass at T
    first = torch.ones_like(ids, dtype=torch.bool)
    first[..., 1:] = ids[..., 1:] != ids[..., :-1]  # sorted: a run of equal ids is one class
    column = torch.arange(m, device=ids.device).expand_as(ids)
    run = torch.where(first, column, torch.zeros_like(column)).cummax(dim=-1).values  # (..., M) its run's first column
    counts = torch.zeros_like(lp1).scatter_add_(-1, run, torch.ones_like(lp1))  # c_j at the run's first column
    if temperature == 1.0:
        log_u = torch.zeros_like(lp1)
    else:  # log p_T(j) - log p_1(j), from the stored normalisers
        log_u = (lp1 + lse1.double()[..., None]) / temperature - lse_t.double()[..., None] - lp1
    weight = torch.where(first, counts.log() + log_u, torch.full_like(lp1, -math.inf))
    estimate = weight - torch.logsumexp(weight, dim=-1, keepdim=True) + r.log()[..., None]
    estimate = torch.where(first, estimate, torch.full_like(estimate, -math.inf))
    return torch.where(first, ids, TAIL_PAD_ID + column), estimate.float()
