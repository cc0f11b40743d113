"""What a panoramic film's collimator border and noise look like, in [0, 1] intensities.

Shared by the phantom generator (:func:`dac.data.make_phantom`) and the border
augmentation of a saliency fit (:func:`dac.saliency.film_border`), so that the border a
fit learns to ignore is the one the phantoms have. Each range is drawn uniformly.
"""
from __future__ import annotations

#: Share of films whose collimator border is bright (the rest are dark).
BRIGHT_BORDER_SHARE = 0.3
#: Level of a dark and of a bright border.
DARK_BORDER = (0.0, 0.06)
BRIGHT_BORDER = (0.85, 1.0)
#: Standard deviation of the Gaussian read noise, and the factor of the signal-dependent
#: (Poisson-like) noise: a pixel of intensity ``v`` gets ``sqrt(read**2 + shot**2 * v)``.
READ_NOISE = (0.004, 0.012)
SHOT_NOISE = (0.01, 0.03)
