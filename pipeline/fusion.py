"""Fusion: with which weights the kernels mix the K teachers of each row (SPEC "Fusion").

    w = fusion_weights(Fusion.POSTERIOR, scores=scores, entropies=None, labelled=labelled, prior=pi, tau=1.0)  # (N, K)

Every fusion is a small function from what the store holds to the weights the kernels take
(`weights=` of fused_kd_loss / fused_sparse_kd_loss: None, (K,) or (N, K), normalised per row), the
same for rows and tokens (a position is a row), dense and sparse stores:

    mean        None: the kernels' own 1/K
    weighted    pi (K,), --teacher-weights (the kernels normalise it)
    confidence  CA-MKD, mtkd.kernels.confidence_weights: w_nk = (1 - softmax_k(CE_nk)) / (K - 1)
    vote        not weights: one pseudo-teacher whose distribution is the fraction of teachers
                voting each class (vote_dense, vote_sparse)
    posterior   w_nk = pi_k exp(score_nk / tau) / sum_j pi_j exp(score_nj / tau)
    best        w_nk = 1 for the k of largest pi_k exp(score_nk / tau), the lowest k on ties; 0 else
                (with the default uniform pi: the teacher of highest score)
    entropy     w_nk = pi_k exp(-H_nk / tau) / sum_j pi_j exp(-H_nj / tau)      (label-free)

score_nk = log p_k(y_n) at T = 1, the stored `label_logprob` (top-k teachers) or log softmax of the
stored logits (dense: `label_scores`); H_nk the stored exact entropy at T = 1 (`entropy` array); pi
the normalised --teacher-weights (uniform without); tau --fusion-temperature. Everything is held
teachers-first, (K, N), as the loader stacks the teachers' rows; weights come out (N, K).

A row without a label (or whose score is not stored) has no score: under posterior and best it takes
the entropy weights where the store holds entropies, the prior pi otherwise (the posterior given no
evidence; uniform unless --teacher-weights). `fallback_rows` counts those rows for config.json.

Scope `sequence` (tokens): `segments` (N,) says which sequence of the batch each position belongs
to; score and H are summed over the sequence's labelled positions (over all of its positions when
it has none) before the weights are formed, and every position takes its sequence's weights. A
sequence with no labelled position is the unlabelled case above. (FuseLLM's MinCE is `best` with
`sequence`, its AvgCE `posterior`.)

Regression teachers (v3, layout "values") are fused into one target per row and output, not weights
(`fused_values`): mean (1/K sum_k v_k), weighted (sum_k pi_k v_k, pi normalised), median (per row
and output the median over the K teachers; for even K the mean of the two middle values, as numpy's).
The median ignores one teacher gone wild when K >= 3.

Weights are computed in float32 from log-weights (log pi + score / tau, normalised by logsumexp), so
no exp overflows whatever the scores; a teacher with pi_k = 0 gets weight 0 and is never `best`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtkd.kernels import confidence_weights
from mtkd.pipeline.config import SELECTING, Fusion, FusionScope
from mtkd.pipeline.data import IGNORE_LABEL

# Distinct ids past every vocabulary for listing nothing (ids >= V count as tail, here with p = 0);
# the same as loader.TeacherRows.PAD_ID.
PAD_ID = 2**31 - 1


# -- the stored values -------------------------------------------------------------------------------


def label_scores(logits: Tensor, labels: Tensor) -> Tensor:
    """(K, N, V) dense logits and (N,) labels -> (K, N) float32 log softmax(z_kn)[y_n] at T = 1, NaN
    where the row has no label. One teacher at a time: one (N, V) float32 temporary."""
    has = labels != IGNORE_LABEL
    y = torch.where(has, labels, 0).long()[:, None]  # (N, 1)
    out = torch.empty(logits.shape[:2], dtype=torch.float32, device=logits.device)
    for k in range(logits.shape[0]):
        z = logits[k].float()
        out[k] = (z.gather(1, y) - torch.logsumexp(z, dim=1, keepdim=True)).squeeze(1)
    return out.masked_fill_(~has[None, :], math.nan)


def log_prior(prior: Tensor | None, k: int, device: torch.device) -> Tensor:
    """(K, 1) log pi, pi normalised (None: uniform, log 1/K)."""
    if prior is None:
        return torch.full((k, 1), -math.log(k), device=device)
    pi = prior.to(device=device, dtype=torch.float32)
    return (pi / pi.sum()).log()[:, None]


# -- the fusions that select -------------------------------------------------------------------------


def posterior(scores: Tensor, log_pi: Tensor, tau: float) -> Tensor:
    """(K, N) scores, (K, 1) log pi -> (N, K): the posterior that teacher k produced the label."""
    return torch.softmax(log_pi + scores / tau, dim=0).T


def best(scores: Tensor, log_pi: Tensor, tau: float) -> Tensor:
    """(K, N) scores, (K, 1) log pi -> (N, K) one-hot: the most probable teacher under `posterior`
    (argmax returns the first maximum: the lowest k on ties)."""
    k = scores.shape[0]
    return F.one_hot((log_pi + scores / tau).argmax(dim=0), k).float()


def entropy(entropies: Tensor, log_pi: Tensor, tau: float) -> Tensor:
    """(K, N) entropies at T = 1, (K, 1) log pi -> (N, K): the most certain teachers weigh most."""
    return torch.softmax(log_pi - entropies.float() / tau, dim=0).T


def per_sequence(values: Tensor, segments: Tensor, counted: Tensor, num: int) -> Tensor:
    """(K, N) values, (N,) sequence of each position (< num), (N,) bool -> (K, num): each sequence's
    sum of `values` over its counted positions."""
    picked = torch.where(counted[None, :], values.float(), torch.zeros((), device=values.device))
    sums = torch.zeros((values.shape[0], num), dtype=torch.float32, device=values.device)
    return sums.index_add_(1, segments, picked)


def fusion_weights(
    fusion: Fusion,
    *,
    scores: Tensor | None,
    entropies: Tensor | None,
    labelled: Tensor,
    prior: Tensor | None = None,
    tau: float = 1.0,
    segments: Tensor | None = None,
) -> Tensor:
    """(N, K) weights of posterior, best or entropy (see the module doc).

    scores (K, N) log p_k(y_n) (needed by posterior and best; read where `labelled`), entropies
    (K, N) or None, labelled (N,) bool: the rows that have a score, prior (K,) pi or None (uniform),
    segments (N,) int64 for scope `sequence` (None: each row on its own).
    """
    if fusion not in SELECTING:
        raise ValueError(f"fusion {fusion.value!r} does not select")
    if (entropies if fusion is Fusion.ENTROPY else scores) is None:
        raise ValueError(f"--fusion {fusion.value} needs the teachers' {'entropies' if fusion is Fusion.ENTROPY else 'label scores'}")
    if segments is not None:
        # Weights per sequence (K, S), then each position takes its sequence's (the very same numbers).
        num = int(segments.max()) + 1 if len(segments) else 0
        has = torch.zeros(num, dtype=torch.int64, device=labelled.device).index_add_(0, segments, labelled.long()) > 0
        counted = labelled | ~has[segments]  # a sequence's labelled positions, or all when it has none
        w = fusion_weights(
            fusion,
            scores=None if scores is None else per_sequence(scores, segments, labelled, num),
            entropies=None if entropies is None else per_sequence(entropies, segments, counted, num),
            labelled=has, prior=prior, tau=tau,
        )
        return w[segments]  # (N, K)
    values = scores if scores is not None else entropies
    k, device = values.shape[0], values.device
    log_pi = log_prior(prior, k, device)
    if fusion is Fusion.ENTROPY:
        return entropy(entropies, log_pi, tau)
    known = torch.where(labelled[None, :], scores, torch.zeros((), device=device))  # no NaN reaches the exp
    chosen = posterior(known, log_pi, tau) if fusion is Fusion.POSTERIOR else best(known, log_pi, tau)
    if entropies is not None:
        fallback = entropy(entropies, log_pi, tau)
    else:
        fallback = log_pi.exp().T.expand(len(labelled), k)
    return torch.where(labelled[:, None], chosen, fallback)


def labelled_rows(scores: Tensor, labels: Tensor) -> Tensor:
    """(N,) bool: the rows with a label whose every teacher's score is stored (finite)."""
    return (labels != IGNORE_LABEL) & torch.isfinite(scores).all(dim=0)


def fallback_rows(labels: np.ndarray, offsets: np.ndarray | None, scope: FusionScope) -> int:
    """How many rows (positions) of a data set posterior and best weigh without a label: unlabelled
    rows, or with scope `sequence` the positions of sequences without a labelled position."""
    unlabelled = labels == IGNORE_LABEL
    if scope is FusionScope.ROW or offsets is None:
        return int(unlabelled.sum())
    lengths = np.diff(offsets)
    labelled_per_seq = np.add.reduceat(~unlabelled, offsets[:-1]) if len(lengths) else np.zeros(0, dtype=np.int64)
    return int(lengths[labelled_per_seq == 0].sum())


# -- vote: a pseudo-teacher, not weights -------------------------------------------------------------


def vote_dense(logits: Tensor, temperature: float) -> Tensor:
    """(K, N, V) logits -> (1, N, V) pseudo-teacher logits T log(votes): its tempered softmax is
    exactly the fraction of teachers whose argmax each class is (log 0 = -inf)."""
    k, _, v = logits.shape
    votes = F.one_hot(logits.argmax(dim=-1), v).sum(dim=0).float() / k  # (N, V)
    return (temperature * votes.log()).unsqueeze(0)


def vote_sparse(ids: Tensor, logprobs: Tensor, top1: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(K, P, k) top-k teachers -> (1, P, K) pseudo-teacher ids and log-probabilities: each teacher's
    top-1 id with its vote fraction. A class voted by several teachers is listed once; the repeats
    become distinct ids past every vocabulary with probability 0, which the kernel counts as nothing.
    `top1` (K, P): each teacher's top-1 where the listed log-probabilities do not say it (sampled
    tails: from the exact head, not from the tail's estimates)."""
    k = ids.shape[0]
    if top1 is not None:
        top1 = top1.T  # (P, K)
    else:
        top1 = ids.gather(2, logprobs.argmax(dim=2, keepdim=True)).squeeze(2).T  # (P, K)
    same = top1[:, :, None] == top1[:, None, :]  # (P, K, K)
    votes = same.sum(dim=2).float() / k  # (P, K): the fraction of teachers voting each listed id
    first = ~torch.tril(same, diagonal=-1).any(dim=2)  # the first teacher to name an id lists it
    pad = PAD_ID - torch.arange(k, device=ids.device)
    pseudo_ids = torch.where(first, top1, pad)
    pseudo_logprobs = torch.where(first, votes.log(), -math.inf)
    return pseudo_ids.unsqueeze(0), pseudo_logprobs.unsqueeze(0)


# -- one entry for the objective ---------------------------------------------------------------------


def weights_for(
    fusion: Fusion,
    *,
    labels: Tensor,
    prior: Tensor | None,
    tau: float = 1.0,
    logits: Tensor | None = None,
    label_logprob: Tensor | None = None,
    entropies: Tensor | None = None,
    segments: Tensor | None = None,
) -> Tensor | None:
    """The kernels' `weights` for a batch under `fusion` (not vote: see vote_dense / vote_sparse).

    labels (N,); dense: logits (K, N, V); sparse: label_logprob (K, N) (NaN without label);
    entropies (K, N) where stored; segments (N,) for scope `sequence`; prior (K,) --teacher-weights.
    """
    if fusion is Fusion.MEAN:
        return None
    if fusion is Fusion.WEIGHTED:
        return prior
    if fusion is Fusion.CONFIDENCE:
        if label_logprob is not None:
            return confidence_weights(label_logprobs=label_logprob, labels=labels, ignore_index=IGNORE_LABEL)  # (N, K)
        return confidence_weights(logits, labels, ignore_index=IGNORE_LABEL)
    if fusion not in SELECTING:
        raise ValueError(f"fusion {fusion.value!r} gives no weights")
    scores, labelled = None, labels != IGNORE_LABEL  # entropy: the labelled rows are what a sequence sums over
    if fusion is not Fusion.ENTROPY:
        scores = label_logprob.float() if label_logprob is not None else label_scores(logits, labels)
        labelled = labelled_rows(scores, labels)
    return fusion_weights(fusion, scores=scores, entropies=entropies, labelled=labelled, prior=prior, tau=tau,
                          segments=segments)


def fused_values(fusion: Fusion, values: Tensor, prior: Tensor | None = None) -> Tensor:
    """(K, N, D) regression teachers' outputs -> (N, D) the fused target, in float32 (see the module
    doc): mean, weighted (prior (K,), normalised) or median over the K teachers."""
    v = values.float()
    k = v.shape[0]
    if fusion is Fusion.MEAN:
        return v.mean(dim=0)
    if fusion is Fusion.WEIGHTED:
        if prior is None:
            raise ValueError("--fusion weighted needs --teacher-weights")
        pi = prior.to(device=v.device, dtype=torch.float32)
        return ((pi / pi.sum())[:, None, None] * v).sum(dim=0)
    if fusion is Fusion.MEDIAN:
        ordered = v.sort(dim=0).values  # (K, N, D), per row and output
        if k % 2:
            return ordered[k // 2]
        return 0.5 * (ordered[k // 2 - 1] + ordered[k // 2])
    raise ValueError(f"fusion {fusion.value!r} does not fuse regression teachers")


def prior_tensor(weights: Mapping[str, float] | None, device: torch.device) -> Tensor | None:
    """--teacher-weights as a (K,) float32 tensor in the chosen teachers' order (None: none given)."""
    return None if not weights else torch.tensor(list(weights.values()), dtype=torch.float32, device=device)


__all__ = [
    "best", "entropy", "fallback_rows", "fused_values", "fusion_weights", "label_scores", "labelled_rows", "log_prior",
    "per_sequence", "posterior", "prior_tensor", "vote_dense", "vote_sparse", "weights_for",
]
