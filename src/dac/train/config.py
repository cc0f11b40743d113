"""Experiment configuration: what ``dac train`` and ``dac cv`` read from a YAML file.

A config has four sections and a seed; every key has a default (the paper's setup),
so a file names only what it changes. Unknown keys and bad values raise
:class:`dac.DACInputError` naming the key (``train.lr``, ``pipelines.dac.epochs``).

.. code-block:: yaml

    seed: 0
    data:      {source: phantom, length: 200, sizes: [[192, 354]], workers: 2}
    model:     {arch: resnet18, width: 16}
    train:     {lr: 1.0e-3, batch_size: 24, folds: 10, device: auto}
    pipelines:
      resize:  {epochs: 96, input_size: [224, 224], augment: strong}
      dac:     {epochs: 144, input_size: [200, 370], augment: paper}

A pipeline's ``kind`` defaults to its name, so ``resize``, ``dac``, ``dac_e2e`` and
``stn`` need no ``kind``; other names (``resize_48``) must give one.

Example:
    >>> cfg = config_from_dict({"train": {"folds": 3}, "pipelines": {"dac": {"epochs": 2}}})
    >>> cfg.train.folds, cfg.pipelines["dac"].kind, cfg.pipelines["dac"].input_size
    (3, 'dac', (200, 370))
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._checks import DACInputError, check_device

__all__ = [
    "ARCHS",
    "AUGMENTATIONS",
    "PIPELINE_KINDS",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "PipelineConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "load_config",
]

#: The four input pipelines: resize whole image | DACrop | learned saliency -> DACrop | spatial transformer.
PIPELINE_KINDS = ("resize", "dac", "dac_e2e", "stn")
#: Augmentation presets (see :mod:`dac.train.augment`).
AUGMENTATIONS = ("none", "paper", "strong")
#: Classifier families (torchvision ResNets, 1-channel stem).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: Raised when training changes what a config produces, so older results folders are not resumed.
TRAINING_REVISION = 2


@dataclass
class DataConfig:
    """Where the images come from.

    Attributes:
        source: ``"phantom"`` (generated :class:`dac.data.datasets.PhantomDataset`) or a path:
            a folder with one sub-folder per class, or a CSV of ``path,label``.
        length: number of phantoms (phantom source only).
        sizes: phantom (H, W) sizes, cycled over items (paper: 1536 x 2836 / 2860).
        gray8: convert real images to 8-bit gray first (the paper's preprocessing).
        cache_images: keep every decoded raw image in memory for the run (needed to
            make generated phantoms fast; off for large real archives).
        workers: DataLoader processes decoding / generating images.
    """

    source: str = "phantom"
    length: int = 1000
    sizes: tuple[tuple[int, int], ...] = ((1536, 2836), (1536, 2860))
    gray8: bool = True
    cache_images: bool = False
    workers: int = 0


@dataclass
class ModelConfig:
    """The classifier: a torchvision ResNet with a 1-channel stem (paper section 3.3).

    Attributes:
        arch: one of :data:`ARCHS` (paper: resnet101).
        width: channels of the stem and first stage (torchvision: 64); stages double it.
    """

    arch: str = "resnet101"
    width: int = 64


@dataclass
class TrainConfig:
    """Optimisation and evaluation (paper: Adam, lr 1e-3, batch 24, 10 folds).

    Attributes:
        lr: Adam learning rate.
        batch_size: images per optimiser step, over all processes together.
        folds: k of the stratified k-fold cross-validation.
        device: ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        eval_batch_size: images per batch when predicting.
        threads: CPU threads for torch (None: torch's default).
        holdout: fraction held out (stratified) by ``dac train`` for its test metrics;
            0 trains on everything.
        recalibrate_bn: after training, re-estimate BatchNorm's running statistics on
            the training images without augmentation, as evaluation sees them.
    """

    lr: float = 1e-3
    batch_size: int = 24
    folds: int = 10
    device: str = "auto"
    eval_batch_size: int = 32
    threads: int | None = None
    holdout: float = 0.1
    recalibrate_bn: bool = True


@dataclass
class PipelineConfig:
    """One input pipeline in front of the classifier.

    Attributes:
        kind: one of :data:`PIPELINE_KINDS`.
        epochs: training epochs (paper: 96 for resize, 144 for DAC).
        input_size: (H, W) the classifier sees (paper: 224 x 224 resize, 200 x 370 DAC).
        augment: preset of :data:`AUGMENTATIONS` applied to the pipeline's output
            during training (paper: ``"paper"`` for DAC, a stronger one for resize).
        pool_size: DACrop max-min pooling window (paper: 10).
        backward_mode: DACrop backward mode (``dac_e2e``): implicit | unroll | truncated | dlm.
        saliency_width: channels of the learned saliency net's hidden layers (``dac_e2e``,
            :class:`dac.saliency.SaliencyNet`).
        localization_size: (H, W) the STN's localisation net sees.
        roi_rotate_degrees: DAC pipelines: rotate each crop about the centre of its
            box by up to this angle, sampled from the whole image (no black corners);
            0 disables. Replaces the preset's rotation.
        front_lr: learning rate of the front's own parameters (None: ``train.lr``).
    """

    kind: str = "dac"
    epochs: int = 144
    input_size: tuple[int, int] = (200, 370)
    augment: str = "paper"
    pool_size: int = 10
    backward_mode: str = "implicit"
    saliency_width: int = 16
    localization_size: tuple[int, int] = (64, 118)
    roi_rotate_degrees: float = 0.0
    front_lr: float | None = None


_PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "resize": {"epochs": 96, "input_size": (224, 224), "augment": "strong"},
    "dac": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},
    "dac_e2e": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},
    "stn": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},
}


@dataclass
class ExperimentConfig:
    """The whole experiment: data, classifier, training and the pipelines to compare."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipelines: dict[str, PipelineConfig] = field(
        default_factory=lambda: {k: PipelineConfig(kind=k, **v) for k, v in _PIPELINE_DEFAULTS.items()}
    )

    def fingerprint(self) -> str:
        """A short hash of every setting that changes results (not device, threads or workers;
        ``eval_batch_size`` counts, since a DAC search's last bits depend on its batch).

        A data folder's path is not part of it (a copy elsewhere is the same data); what
        the data holds is checked separately (:func:`dac.train.folds.data_digest`).
        """
        d = config_to_dict(self)
        for key in ("device", "threads"):
            d["train"].pop(key)
        d["data"].pop("workers")
        d["data"].pop("cache_images")
        if d["data"]["source"] != "phantom":
            d["data"]["source"] = "files"
        d["revision"] = TRAINING_REVISION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, *, data: str | None = None, device: str | None = None) -> ExperimentConfig:
    """Read a YAML config (None: the defaults), then apply command-line overrides.

    Args:
        path: a ``.yaml`` file.
        data: overrides ``data.source``: a folder of class folders or a CSV of path,label.
        device: overrides ``train.device``.

    Raises:
        DACInputError: the file is missing or not valid YAML, or a key or value is bad.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            import yaml
        except ImportError:
            raise DACInputError("config: reading YAML needs PyYAML (pip install PyYAML)") from None

        p = Path(path)
        if not p.is_file():
            raise DACInputError(f"config: no such file {str(p)!r}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise DACInputError(f"config: {str(p)!r} is not valid YAML: {' '.join(str(exc).split())}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DACInputError(f"config: {str(p)!r} must hold a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    cfg = config_from_dict(raw)
    if data is not None:
        if not Path(data).exists():
            raise DACInputError(f"--data: {data!r} does not exist")
        cfg.data.source = str(data)
    if device is not None:
        cfg.train.device = _available_device(device, "--device")
    return cfg


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and check an :class:`ExperimentConfig` from nested dicts (a parsed YAML)."""
    if not isinstance(raw, Mapping):
        raise DACInputError(f"config: expected a mapping, got {type(raw).__name__}")
    _no_unknown(raw, ("seed", "data", "model", "train", "pipelines"), "config")
    cfg = ExperimentConfig()
    cfg.seed = _int(raw.get("seed", cfg.seed), "seed", 0)
    cfg.data = _section(DataConfig, raw.get("data"), "data")
    cfg.model = _section(ModelConfig, raw.get("model"), "model")
    cfg.train = _section(TrainConfig, raw.get("train"), "train")
    if "pipelines" in raw:
        pipes = raw["pipelines"]
        if not isinstance(pipes, Mapping) or not pipes:
            raise DACInputError("pipelines: expected a non-empty mapping of name -> settings")
        cfg.pipelines = {}
        for name, settings in pipes.items():
            settings = dict(settings or {})
            kind = settings.get("kind", name)
            if kind not in PIPELINE_KINDS:
                raise DACInputError(f"pipelines.{name}.kind: expected one of {PIPELINE_KINDS}, got {kind!r}")
            base = {"kind": kind, **_PIPELINE_DEFAULTS[kind]}
            cfg.pipelines[str(name)] = _section(PipelineConfig, {**base, **settings}, f"pipelines.{name}")
    _check(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """Plain nested dicts and lists (YAML/JSON ready) of ``cfg``."""
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists


# ----------------------------------------------------------------------------- checks


def _section(cls, raw: Any, name: str):
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise DACInputError(f"{name}: expected a mapping, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    _no_unknown(raw, names, name)
    return cls(**{k: raw[k] for k in names if k in raw})


def _no_unknown(raw: Mapping[str, Any], known, name: str) -> None:
    unknown = sorted(set(map(str, raw)) - set(known))
    if unknown:
        raise DACInputError(f"{name}: unknown key(s) {unknown}; expected some of {sorted(known)}")


def _check(cfg: ExperimentConfig) -> None:
    d = cfg.data
    d.source = str(d.source)
    d.length = _int(d.length, "data.length", 1)
    d.sizes = tuple(_pair(s, f"data.sizes[{i}]", 64) for i, s in enumerate(_list(d.sizes, "data.sizes")))
    d.gray8 = _bool(d.gray8, "data.gray8")
    d.cache_images = _bool(d.cache_images, "data.cache_images")
    d.workers = _int(d.workers, "data.workers", 0)

    m = cfg.model
    if m.arch not in ARCHS:
        raise DACInputError(f"model.arch: expected one of {ARCHS}, got {m.arch!r}")
    m.width = _int(m.width, "model.width", 1)

    t = cfg.train
    t.lr = _float(t.lr, "train.lr")
    t.batch_size = _int(t.batch_size, "train.batch_size", 1)
    t.folds = _int(t.folds, "train.folds", 2)
    t.device = _device(t.device, "train.device")
    t.eval_batch_size = _int(t.eval_batch_size, "train.eval_batch_size", 1)
    if t.threads is not None:
        t.threads = _int(t.threads, "train.threads", 1)
    t.recalibrate_bn = _bool(t.recalibrate_bn, "train.recalibrate_bn")
    t.holdout = float(t.holdout)
    if not 0 <= t.holdout < 1:
        raise DACInputError(f"train.holdout: expected a fraction in [0, 1), got {t.holdout!r}")

    from ..layer import BACKWARD_MODES

    for name, p in cfg.pipelines.items():
        key = f"pipelines.{name}"
        p.epochs = _int(p.epochs, f"{key}.epochs", 1)
        p.input_size = _pair(p.input_size, f"{key}.input_size", 8)
        if p.augment not in AUGMENTATIONS:
            raise DACInputError(f"{key}.augment: expected one of {AUGMENTATIONS}, got {p.augment!r}")
        p.pool_size = _int(p.pool_size, f"{key}.pool_size", 1)
        if p.backward_mode not in BACKWARD_MODES:
            raise DACInputError(f"{key}.backward_mode: expected one of {BACKWARD_MODES}, got {p.backward_mode!r}")
        p.saliency_width = _int(p.saliency_width, f"{key}.saliency_width", 1)
        p.localization_size = _pair(p.localization_size, f"{key}.localization_size", 16)
        p.roi_rotate_degrees = float(p.roi_rotate_degrees)
        if not 0 <= p.roi_rotate_degrees < 90:
            raise DACInputError(f"{key}.roi_rotate_degrees: expected an angle in [0, 90), got {p.roi_rotate_degrees!r}")
        if p.roi_rotate_degrees and p.kind not in ("dac", "dac_e2e"):
            raise DACInputError(f"{key}.roi_rotate_degrees: only DAC pipelines have a box to rotate about (kind {p.kind!r})")
        if p.front_lr is not None:
            p.front_lr = _float(p.front_lr, f"{key}.front_lr")


def _int(value: Any, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DACInputError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise DACInputError(f"{name}: expected a positive number, got {value!r}")
    return float(value)


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise DACInputError(f"{name}: expected true or false, got {value!r}")
    return value


def _list(value: Any, name: str) -> list:
    if not isinstance(value, (list, tuple)) or not value:
        raise DACInputError(f"{name}: expected a non-empty list, got {value!r}")
    return list(value)


def _pair(value: Any, name: str, low: int) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DACInputError(f"{name}: expected [height, width], got {value!r}")
    return (_int(value[0], f"{name}[0]", low), _int(value[1], f"{name}[1]", low))


def _device(value: Any, name: str) -> str:
    text = str(value)
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise DACInputError(f"{name}: expected auto, cpu, cuda or cuda:N, got {value!r}")


def _available_device(value: str, name: str) -> str:
    """``value`` (auto, cpu, cuda, cuda:N) if this machine has it."""
    text = _device(value, name)
    if text != "auto":
        check_device(text, name)
    return text
