"""Pure tensor math of DAC (no Theseus): pooling, soft rectangle, cost, crop.

Convention: search parameters ``theta`` = (x_c, y_c, r) live in saliency-pixel
coordinates (pooled pixel ``j`` at coordinate ``j``); boxes handed to users are xyxy
in input pixels (torchvision's convention, the whole image is ``(0, 0, W, H)``).
"""
from .boxes import box_inside, fit_r_min, initial_theta, theta_to_boxes
from .cost import dac_cost, dac_cost_derivatives
from .crop import CropResize, crop_resize
from .pooling import MaxMinPool, max_min_pool, to_unit_range
from .rectangle import box_edges, soft_rectangle
from .stationarity import Stationarity, shift_into_image, stationarity_residual

__all__ = [
    "CropResize",
    "box_inside",
    "MaxMinPool",
    "Stationarity",
    "box_edges",
    "crop_resize",
    "dac_cost",
    "dac_cost_derivatives",
    "fit_r_min",
    "initial_theta",
    "max_min_pool",
    "shift_into_image",
    "soft_rectangle",
    "stationarity_residual",
    "theta_to_boxes",
    "to_unit_range",
]
