"""The loss of one batch, from the student's output, the teachers' stored rows and the config.

    objective = Objective.from_config(config, device)
    loss = objective(student_logits, batch)                       # rows: (B, V), a loader Batch
    loss = objective.tokens(out, head, batch.teachers, labels, batch.position_seqs)  # tokens: (P, H) or (P, V)

Per row n (the SPEC's `fused_kd_loss` / `fused_sparse_kd_loss` terms), over the batch's B rows:

    L = 1/B * sum_n [ alpha * D_n + (1 - alpha) * CE_n ]         CE_n = 0 where the label is unknown

D_n is the KD term: T^2 KL(p_n || softmax(s_n / T)) for `--loss kl`, sum_v (p_nv - q_nv)^2 with
q = softmax(s / T) for `--loss mse`. So a row without a label (an unlabelled transfer set) trains
on alpha * D_n alone rather than being dropped: the kernels' ignore_index drops the CE term only
(SPEC version 2), so every batch is one kernel call whatever mix of labelled rows it holds.
The fused target p_n = sum_k w_nk softmax(z_k / T), with the weights w of `--fusion` (fusion.py:
mean, weighted, confidence, posterior, best, entropy); vote instead fuses one pseudo-teacher whose
tempered softmax is the fraction of teachers voting each class. Top-k teachers go to the sparse
kernel with the same weights, per position; a student LM whose output layer the loss may apply
itself (`head`) goes through fused_linear_sparse_kd_loss, so its (P, V) logits never exist whole.
Without a store: L = mean over labelled rows of CE_n.

Regression (v3, teachers stored as layout "values", targets y (B, D) with NaN where unknown): with
l the elementwise `--loss` (mse (s - t)^2, huber (delta 1), l1 |s - t|) and t_n the fused target
(fusion.fused_values: mean, weighted or median over the teachers, per output),

    L = 1/B * sum_n [ alpha * mean_d l(s_nd, t_nd) + (1 - alpha) * mean_{d known} l(s_nd, y_nd) ]

(the second term 0 on a row with no known target: unlabelled rows train on the first alone);
without a store, L = the mean of l(s, y) over the batch's known targets.

What the fusions read besides the logits: the stored label log-probabilities (top-k teachers; dense
ones give theirs from the logits), the stored entropies (rows: held whole, (K, N) float32, indexed
by the batch's rows; tokens: read with the teachers' rows), and for scope `sequence` the sequence of
each position.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mtkd.kernels import fused_kd_loss, fused_linear_sparse_kd_loss, fused_sparse_kd_loss
from mtkd.pipeline import fusion as fusions
from mtkd.pipeline.config import Fusion, FusionScope, Loss, TrainConfig
from mtkd.pipeline.data import IGNORE_LABEL


class Objective:
    """The loss of one batch: mean over its rows of alpha * D_n + (1 - alpha) * CE_n (see the module doc)."""

    def __init__(
        self, *, distil: bool, fusion: str, weights: Tensor | None, temperature: float, alpha: float, loss: str,
        fusion_temperature: float = 1.0, fusion_scope: str = "row", row_entropy: Tensor | None = None,
        regression: bool = False,
    ):
        self.distil = distil
        self.regression = regression  # v3: float targets, teachers' stored values (see the module doc)
        self.fusion = Fusion(fusion)
        self.weights = weights  # (K,): --teacher-weights (weighted), or the prior pi of the fusions that select
        self.temperature = temperature
        self.alpha = alpha
        self.loss = Loss(loss)
        self.tau = float(fusion_temperature)
        self.scope = FusionScope(fusion_scope)
        self.row_entropy = row_entropy  # rows: (K, N) float32 stored entropies, indexed by a batch's rows

    @classmethod
    def from_config(cls, config: TrainConfig, device: torch.device, *, row_entropy: Tensor | None = None) -> Objective:
        return cls(
            distil=config.distil,
            fusion=config.fusion,
            weights=fusions.prior_tensor(config.teacher_weights, device),
            temperature=config.temperature,
            alpha=config.alpha,
            loss=config.loss or Loss.KL,  # unresolved (no for_kind yet): classification, as config.py reads it
            fusion_temperature=config.fusion_temperature,
            fusion_scope=config.fusion_scope,
            row_entropy=row_entropy,
            regression=config.regression,
        )

    def __call__(self, student_logits: Tensor, batch: Any) -> Tensor:
        """Rows: (B, V) student logits and a Batch with (K, B, V) logits, (B,) labels and data rows
        (regression: (B, D) outputs, (K, B, D) teachers' values, (B, D) targets)."""
        if self.regression:
            return self.values(student_logits, batch.logits, batch.labels)
        entropies = None
        if self.row_entropy is not None:
            entropies = self.row_entropy[:, batch.rows].to(student_logits.device)  # (K, B)
        return self.dense(student_logits, batch.logits, batch.labels, entropies)

    def tokens(self, out: Tensor, head: torch.nn.Linear | None, teachers: Mapping[str, Tensor], labels: Tensor,
               segments: Tensor | None = None, *, mask: Tensor | None = None) -> Tensor:
        """Tokens: the P real positions' student output, (P, H) hidden states with the output layer
        `head`, or (P, V) logits with head None; their teachers' rows (K, P, ...), labels (P,), the
        batch's sequence of each position (P,) (scope `sequence`) and `mask` (P,) bool: False
        positions (the -100 of data with its own labels) contribute nothing; None: all count."""
        segments = segments if self.scope is FusionScope.SEQUENCE else None
        if "ids" not in teachers:  # dense teachers, or none (hard labels): the rows' loss
            return self.dense(out, teachers.get("logits"), labels, teachers.get("entropy"), segments, mask)
        ids, logprobs, w = self.sparse_target(teachers, labels, segments)
        options = dict(temperature=self.temperature, weights=w, labels=labels if self.alpha < 1.0 else None,
                       alpha=self.alpha, reduction="mean", ignore_index=IGNORE_LABEL, mask=mask)
        if head is None:
            return fused_sparse_kd_loss(out, ids, logprobs, **options)
        # Under autocast the hidden states are bf16: the output layer in their dtype, as a Linear would be.
        bias = None if head.bias is None else head.bias.to(out.dtype)
        return fused_linear_sparse_kd_loss(out, head.weight.to(out.dtype), ids, logprobs, bias=bias, **options)

    def sparse_target(self, teachers: Mapping[str, Tensor], labels: Tensor,
                      segments: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The top-k teachers as the sparse kernel sees them: ids and log-probabilities (K', P, k), weights."""
        ids, logprobs = teachers["ids"], teachers["logprobs"]
        if self.fusion is Fusion.VOTE:
            return (*fusions.vote_sparse(ids, logprobs, teachers.get("top1")), None)  # (1, P, K)
        w = fusions.weights_for(self.fusion, labels=labels, prior=self.weights, tau=self.tau,
                                label_logprob=teachers.get("label_logprob"), entropies=teachers.get("entropy"),
                                segments=segments)
        return ids, logprobs, w

    def dense(self, student_logits: Tensor, logits: Tensor | None, labels: Tensor, entropies: Tensor | None = None,
              segments: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        s, y = student_logits, labels
        if not self.distil:  # (masked positions are unlabelled: no CE)
            # Hard labels: mean cross-entropy over the batch's labelled rows (0 when none are).
            known = (y != IGNORE_LABEL).sum().clamp(min=1)
            return F.cross_entropy(s.float(), y, ignore_index=IGNORE_LABEL, reduction="sum") / known
        z, w = self.target(logits, y, entropies, segments)  # (K', B, V) logits to fuse with weights w (None | (K,) | (B, K))
        if self.loss is Loss.MSE:
            return self._mse(s, z, w, y, mask)
        # One call: rows labelled ignore_index keep their KD term and drop the CE term only.
        return fused_kd_loss(
            s, z, temperature=self.temperature, weights=w, labels=y if self.alpha < 1.0 else None, alpha=self.alpha,
            fusion="prob", reduction="mean", ignore_index=IGNORE_LABEL, mask=mask,
        )

    def target(self, logits: Tensor, labels: Tensor, entropies: Tensor | None = None,
               segments: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The teachers as the kernel sees them: (K, B, V) logits and their fusion weights."""
        if self.fusion is Fusion.VOTE:
            return fusions.vote_dense(logits, self.temperature), None  # (1, B, V)
        w = fusions.weights_for(self.fusion, labels=labels, prior=self.weights, tau=self.tau, logits=logits,
                                entropies=entropies, segments=segments)
        return logits, w

    def values(self, student: Tensor, teachers: Tensor | None, targets: Tensor) -> Tensor:
        """Regression rows: (B, D) student outputs, (K, B, D) the teachers' stored values (None without a
        store) and (B, D) targets, NaN where unknown -> the batch's loss (see the module doc)."""
        s = student.float()
        targets = targets.float()
        known = ~torch.isnan(targets)  # (B, D)
        y = torch.where(known, targets, torch.zeros((), device=targets.device))  # no NaN reaches the graph
        own = self._elementwise(s, y) * known  # (B, D), 0 where unknown
        if not self.distil:
            return own.sum() / known.sum().clamp(min=1)
        rows = self.alpha * self._elementwise(s, fusions.fused_values(self.fusion, teachers, self.weights)).mean(dim=1)  # (B,)
        if self.alpha < 1.0:
            rows = rows + (1.0 - self.alpha) * own.sum(dim=1) / known.sum(dim=1).clamp(min=1)
        return rows.mean()

    def _elementwise(self, s: Tensor, t: Tensor) -> Tensor:
        """--loss of regression outputs, per element: (B, D)."""
        if self.loss is Loss.MSE:
            return (s - t).square()
        if self.loss is Loss.HUBER:
            return F.huber_loss(s, t, reduction="none", delta=1.0)
        if self.loss is Loss.L1:
            return (s - t).abs()
        raise ValueError(f"--loss {self.loss.value} is not a regression loss")

    def _mse(self, s: Tensor, z: Tensor, w: Tensor | None, y: Tensor, mask: Tensor | None = None) -> Tensor:
        t = self.temperature
        k = z.shape[0]
        w = torch.full((k,), 1.0 / k, device=z.device) if w is None else w / w.sum(dim=-1, keepdim=True)
        w = w.reshape(-1, k).T.unsqueeze(-1)  # (K, B or 1, 1)
        p = (torch.softmax(z.float() / t, dim=-1) * w).sum(dim=0)  # (B, V) fused teacher probabilities
        q = torch.softmax(s.float() / t, dim=-1)
        rows = self.alpha * (p - q).square().sum(dim=-1)
        if self.alpha < 1.0:
            ce = F.cross_entropy(s.float(), y, ignore_index=IGNORE_LABEL, reduction="none")  # 0 where unknown
            rows = rows + (1.0 - self.alpha) * ce
        if mask is not None:  # as the kernels' mask: masked rows neither contribute nor count
            return (rows * mask).sum() / mask.sum().clamp(min=1)
        return rows.mean()


__all__ = ["Objective"]
