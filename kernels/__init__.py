"""Triton kernels for multi-teacher knowledge distillation (never imports mtkd.pipeline or zarr)."""
