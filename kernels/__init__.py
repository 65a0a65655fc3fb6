"""Triton kernels for multi-teacher knowledge distillation (never imports mtkd.pipeline or zarr).

    fused_kd_loss                 the SPEC's dense KD loss: Triton on CUDA (or under
                                  TRITON_INTERPRET=1), else the same loss and gradient in
                                  PyTorch ops (dense_cpu.py)
    fused_sparse_kd_loss          the sparse (top-k teachers) KD loss: Triton on CUDA, else the
                                  same loss and gradient in PyTorch ops (sparse_cpu.py)
    fused_linear_sparse_kd_loss   the sparse loss on hidden @ weight.T (+ bias), in row chunks
    kd_loss_ref                   the dense loss in plain PyTorch through autograd: the yardstick
    kd_sparse_loss_ref            the sparse loss in plain PyTorch through autograd: the yardstick
    confidence_weights            CA-MKD per-sample teacher weights for `weights=`
"""

from mtkd.kernels.dense_cpu import kd_loss_cpu
from mtkd.kernels.fused_linear import fused_linear_sparse_kd_loss
from mtkd.kernels.reference import kd_loss_ref, kd_sparse_loss_ref
from mtkd.kernels.sparse_cpu import sparse_kd_loss_cpu
from mtkd.kernels.weights import confidence_weights

try:
    from mtkd.kernels.kd_loss import fused_kd_loss
    from mtkd.kernels.sparse_kd_loss import fused_sparse_kd_loss
except ModuleNotFoundError as error:  # triton is Linux-only (pyproject); the reference still works
    if error.name != "triton":
        raise
    fused_kd_loss = kd_loss_cpu
    fused_sparse_kd_loss = sparse_kd_loss_cpu

__all__ = [
    "fused_kd_loss",
    "fused_sparse_kd_loss",
    "fused_linear_sparse_kd_loss",
    "kd_loss_ref",
    "kd_sparse_loss_ref",
    "confidence_weights",
]
