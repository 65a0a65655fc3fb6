"""Triton kernels for multi-teacher knowledge distillation (never imports mtkd.pipeline or zarr).

    fused_kd_loss       the SPEC's KD loss: Triton on CUDA (or under TRITON_INTERPRET=1), else the
                        reference
    kd_loss_ref         the same loss in plain PyTorch: the CPU path and the tests' yardstick
    confidence_weights  CA-MKD style per-sample teacher weights for `weights=`
"""

from mtkd.kernels.reference import kd_loss_ref
from mtkd.kernels.weights import confidence_weights

try:
    from mtkd.kernels.kd_loss import fused_kd_loss
except ModuleNotFoundError as error:  # triton is Linux-only (pyproject); the reference still works
    if error.name != "triton":
        raise
    fused_kd_loss = kd_loss_ref

__all__ = ["fused_kd_loss", "kd_loss_ref", "confidence_weights"]
