"""What a panoramic film's collimator border and noise look like, in [0, 1] intensities.

Shared by the phantom generator (:func:`dac.data.make_phantom`) and the border
augmentation of a saliency fit (:func:`dac.saliency.film_border`), so that the border a
fit learns to ignore is the one the phantoms have. Each range is drawn uniformly.
"""
from __future__ import annotations

import numpy as np

#: Share of films whose collimator border is bright (the rest are dark).
BRIGHT_BORDER_SHARE = 0.3
#: Level of a dark and of a bright border.
DARK_BORDER = (0.0, 0.06)
BRIGHT_BORDER = (0.85, 1.0)
#: Standard deviation of the Gaussian read noise, and the factor of the signal-dependent
#: (Poisson-like) noise: a pixel of intensity ``v`` gets ``sqrt(read**2 + shot**2 * v)``.
READ_NOISE = (0.004, 0.012)
SHOT_NOISE = (0.01, 0.03)


def border_level(rng: np.random.Generator) -> float:
    """A collimator border's level: bright (:data:`BRIGHT_BORDER`) in :data:`BRIGHT_BORDER_SHARE`
    of films, else dark (:data:`DARK_BORDER`). Draws two numbers from ``rng``."""
    bright = rng.random() < BRIGHT_BORDER_SHARE
    return float(rng.uniform(*BRIGHT_BORDER) if bright else rng.uniform(*DARK_BORDER))


def noise_levels(rng: np.random.Generator) -> tuple[float, float]:
    """A film's (read, shot) noise (:data:`READ_NOISE`, :data:`SHOT_NOISE`). Draws two numbers from ``rng``."""
    return float(rng.uniform(*READ_NOISE)), float(rng.uniform(*SHOT_NOISE))
