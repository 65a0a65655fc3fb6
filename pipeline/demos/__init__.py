"""The embedded demos behind `mtkd demo`: rows.py (MNIST-1D classification), lm.py (language models);
plot.py draws the rows demo's figure."""
