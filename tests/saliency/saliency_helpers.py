"""Small labelled phantom sets the saliency tests share (generated, nothing stored)."""
from __future__ import annotations

import torch

from dac.data.phantoms import make_phantom
from dac.saliency import saliency_features


def phantom_set(seeds, size=(192, 354), k=4):
    """Features (k = 4), regions Tensor[N, 4], sizes and per-tooth boxes of the phantoms of ``seeds``."""
    features, regions, sizes, teeth = [], [], [], []
    for s in seeds:
        p = make_phantom(s, *size)
        features.append(saliency_features(p.image[None], k)[0])
        regions.append(p.roi)
        sizes.append(size)
        teeth.append(p.teeth)
    return features, torch.stack(regions), sizes, teeth
