"""scikit-learn's bundled 8x8 digits (1797 images, pixel values 0..16): no download."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import Tensor

__all__ = ["digits", "DIGITS_LEVELS", "DIGITS_SCALE", "DIGITS_DIM"]

#: Pixel values are integers 0..16, so 17 levels.
DIGITS_LEVELS = 17
#: Factor applied to dequantised pixels for flows: ``x = (pixel + u) * DIGITS_SCALE`` in [0, 1).
DIGITS_SCALE = 1.0 / DIGITS_LEVELS
#: Dimensions of one image.
DIGITS_DIM = 64


def digits(flow: bool = False, seed: int = 0, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1797 digits from scikit-learn's bundled copy.

    Args:
        flow: ``False``: the plain pixel values 0..16 (for classification). ``True``: dequantised
            and scaled for density estimation, ``(pixel + u) / 17`` with ``u ~ U[0, 1)`` drawn
            with ``seed``, so values lie in [0, 1). NLL in bits/dim on the pixel scale is then
            ``(nll + 64 * log(17)) / (64 * log 2)`` (``evaluate(..., dims=64, scale=DIGITS_SCALE)``).
        seed: seed of the dequantisation noise.
        dtype: floating dtype of X.

    Returns: ``X (1797, 64)`` of ``dtype`` and labels ``y (1797,)`` int64 in 0..9.
    """
    bunch = load_digits()
    x = bunch.data.astype(np.float64)
    if flow:
        x = (x + np.random.default_rng(seed).random(x.shape)) * DIGITS_SCALE
    return torch.as_tensor(x, dtype=dtype), torch.as_tensor(bunch.target, dtype=torch.int64)
