"""Learned saliency for ``DACrop``: the map the search runs on, learned from labelled boxes.

Rooms, one concept each:

* :mod:`~dac.saliency.features` — ``saliency_features``: five numbers per pooling window.
* :mod:`~dac.saliency.net` — ``SaliencyNet``: a CNN gating the paper's max–min map.
* :mod:`~dac.saliency.persist` — ``save_saliency`` / ``load_saliency`` / ``load_dacrop``.
* :mod:`~dac.saliency.targets` — what a labelled region asks of the box (``aspect_box``).
* :mod:`~dac.saliency.scores` — ``localisation_scores``, ``labelled_fit``.
* :mod:`~dac.saliency.augment` — flips, stretches and shifts of labelled features.
* :mod:`~dac.saliency.fit` — ``fit_saliency`` through the box, its warm start and options.
* :mod:`~dac.saliency.regressor` — ``BoxRegressor``, the direct-regression baseline.

The ``dac fit-saliency`` command is :func:`dac.tasks.fit_saliency.train_saliency`.

Examples:
    >>> from dac import DACrop
    >>> from dac.data.phantoms import make_phantom
    >>> image = make_phantom(0, 96, 177).image[None]  # uint8 [1, 1, 96, 177]
    >>> DACrop(output_size=(20, 37), pool_size=4, saliency=SaliencyNet(4)).locate(image).shape
    torch.Size([1, 4])
"""
from .augment import film_border, flip_left_right, stretch_and_shift
from .features import FEATURES, check_features, saliency_features, standardize_features
from .fit import FIT_DEFAULTS, FitHistory, FitOptions, box_loss, fit_region_masks, fit_saliency, init_generator, random_stream
from .net import LEARNED_DEFAULTS, SaliencyNet, feature_trunk, trunk_map
from .persist import SHIPPED_STAGE, load_dacrop, load_saliency, save_saliency
from .regressor import BoxRegressor, fit_box_regressor
from .scores import labelled_fit, localisation_scores
from .targets import aspect_box, margin_target, minimum_width, region_masks

# The public path, which dac crop's settings key records for a DACrop using a stage: keys made
# before the split (dac.saliency.SaliencyNet) stay valid, so archives are not cropped again.
SaliencyNet.__module__ = __name__

__all__ = [
    "FEATURES", "FIT_DEFAULTS", "LEARNED_DEFAULTS", "SHIPPED_STAGE", "BoxRegressor", "FitHistory", "FitOptions", "SaliencyNet",
    "aspect_box", "box_loss", "check_features", "feature_trunk", "fit_box_regressor", "fit_region_masks", "fit_saliency",
    "film_border", "flip_left_right", "init_generator", "labelled_fit", "load_dacrop", "load_saliency", "localisation_scores",
    "margin_target", "minimum_width", "random_stream", "region_masks", "save_saliency", "saliency_features",
    "standardize_features", "stretch_and_shift", "trunk_map",
]
