"""Training with DAC as the first layer: pipelines, k-fold cross-validation, the paper's metrics.

The same torchvision ResNet (1-channel stem) is trained behind four input pipelines —
``resize`` (whole image to 224 x 224, the paper's baseline), ``dac`` (``DACrop`` to
200 x 370), ``dac_e2e`` (a learned saliency upstream of ``DACrop``, trained through the
box) and ``stn`` (a spatial transformer predicting a box of the same aspect), each
image standardised before the classifier — under stratified k-fold cross-validation,
with accuracy, confusion matrices, one-vs-rest ROC, per-class and macro AUC, and
figures like the paper's Figs. 8-11. Runs resume after an
interruption and scale out under ``torchrun`` (DistributedDataParallel with BatchNorm
statistics over the whole batch: N processes train what one process trains). After
training, BatchNorm statistics are re-estimated on the clean training images, and a
network whose eval-mode accuracy on them falls far below its training accuracy is
reported (:class:`EvalModeGapWarning`).

Modules: :mod:`~dac.train.config` (YAML), :mod:`~dac.train.models` (ResNets),
:mod:`~dac.train.pipelines` (fronts), :mod:`~dac.train.augment`,
:mod:`~dac.train.metrics`, :mod:`~dac.train.folds`, :mod:`~dac.train.engine`
(:class:`Engine`: fit / predict / checkpoints), :mod:`~dac.train.distributed`, :mod:`~dac.train.cv`
(``dac cv`` / ``dac train``), :mod:`~dac.train.report` (summary and figures).

Examples:
    >>> from dac.train import PipelineConfig, build_pipeline
    >>> net = build_pipeline(PipelineConfig(kind="resize", input_size=(32, 32)), arch="resnet18", width=4)
    >>> net(torch.zeros(2, 1, 64, 118, dtype=torch.uint8)).shape
    torch.Size([2, 5])
"""
import torch  # noqa: F401  (doctest namespace)

from .augment import AffineRanges, BatchAugment, augmentation, max_inside_rotation, random_affine, roi_rotation_crop
from .config import ExperimentConfig, PipelineConfig, config_from_dict, load_config
from .cv import load_pipeline, run_cv, train_pipeline
from .distributed import Runtime, init_runtime
from .engine import Engine, EvalModeGapWarning, load_checkpoint, save_checkpoint
from .metrics import classification_metrics, roc_curve, summarize_folds
from .models import resnet
from .pipelines import (
    DACFront,
    FrontOutput,
    Pipeline,
    ResizeFront,
    SpatialTransformerCrop,
    Standardize,
    build_pipeline,
    standardize,
)

__all__ = [
    "AffineRanges",
    "BatchAugment",
    "DACFront",
    "Engine",
    "EvalModeGapWarning",
    "FrontOutput",
    "ExperimentConfig",
    "Pipeline",
    "PipelineConfig",
    "ResizeFront",
    "Runtime",
    "SpatialTransformerCrop",
    "Standardize",
    "augmentation",
    "build_pipeline",
    "classification_metrics",
    "config_from_dict",
    "init_runtime",
    "load_checkpoint",
    "load_config",
    "load_pipeline",
    "max_inside_rotation",
    "random_affine",
    "resnet",
    "roc_curve",
    "roi_rotation_crop",
    "run_cv",
    "save_checkpoint",
    "standardize",
    "summarize_folds",
    "train_pipeline",
]
