"""Experiment configuration: what ``dac train`` and ``dac cv`` read from a YAML file.

A config has four sections and a seed; every key has a default (the paper's setup),
so a file names only what it changes. Every key's type and range is declared once, on
its field (its ``check``); unknown keys and bad values (a string where a number
belongs, a list where a mapping does) raise :class:`dac.DACInputError` naming the key
(``train.lr``, ``pipelines.dac.epochs``).

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

Examples:
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

from .._checks import DACInputError, check_angle, check_bool, check_choice, check_device, check_int, check_real
from ..layer import BACKWARD_MODES, SEARCHES

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

#: The input pipelines: resize whole image | DACrop | learned saliency -> DACrop | spatial transformer
#: | the true region (data that carries it).
PIPELINE_KINDS = ("resize", "dac", "dac_e2e", "stn", "oracle")
#: ``data.source`` values that name generated data (anything else is a folder or a CSV).
GENERATED = ("phantom", "distractors")
#: Augmentation presets (see :mod:`dac.train.augment`).
AUGMENTATIONS = ("none", "paper", "strong")
#: Classifier families (torchvision ResNets, 1-channel stem).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")
#: Raised when training changes what a config produces, so older results folders are not resumed.
TRAINING_REVISION = 3  # 3: the STN front resamples with crop_resize, as the DAC front does


#: What a drawn candidate's loss is compared with (``candidate_baseline``; :class:`dac.train.DACFront`).
CANDIDATE_BASELINES = ("batch", "best")


@dataclass
class DataConfig:
    """Where the images come from.

    Attributes:
        source: ``"phantom"`` (generated :class:`dac.data.datasets.PhantomDataset`),
            ``"distractors"`` (generated :class:`dac.data.datasets.DistractorDataset`) or a
            path: a folder with one sub-folder per class, or a CSV of ``path,label``.
        regions: for a folder or CSV source, a CSV of ``path,x1,y1,x2,y2``: every image's true
            region (the ``oracle`` pipeline crops it; :class:`dac.data.datasets.ImageFolderDataset`);
            None: not known. Generated data carries its own.
        length: number of generated images (phantom and distractors only).
        sizes: generated (H, W) sizes, cycled over items (paper: 1536 x 2836 / 2860).
        gray8: convert real images to 8-bit gray first (the paper's preprocessing).
        cache_images: keep every decoded raw image in memory for the run (needed to
            make generated phantoms fast; off for large real archives, whose files are
            then read batch by batch, each file's header checked before training).
        workers: DataLoader processes decoding / generating images.
    """

    source: str = field(default="phantom", metadata={"check": lambda v, n: _text(v, n)})
    regions: str | None = field(default=None, metadata={"check": lambda v, n: None if v is None else _text(v, n)})
    length: int = field(default=1000, metadata={"check": lambda v, n: check_int(v, n, 1)})
    sizes: tuple[tuple[int, int], ...] = field(default=((1536, 2836), (1536, 2860)), metadata={"check": lambda v, n: _sizes(v, n, 64)})
    gray8: bool = field(default=True, metadata={"check": lambda v, n: check_bool(v, n)})
    cache_images: bool = field(default=False, metadata={"check": lambda v, n: check_bool(v, n)})
    workers: int = field(default=0, metadata={"check": lambda v, n: check_int(v, n, 0)})


@dataclass
class ModelConfig:
    """The classifier: a torchvision ResNet with a 1-channel stem (paper section 3.3).

    Attributes:
        arch: one of :data:`ARCHS` (paper: resnet101).
        width: channels of the stem and first stage (torchvision: 64); stages double it.
    """

    arch: str = field(default="resnet101", metadata={"check": lambda v, n: check_choice(v, ARCHS, n)})
    width: int = field(default=64, metadata={"check": lambda v, n: check_int(v, n, 1)})


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

    lr: float = field(default=1e-3, metadata={"check": lambda v, n: _positive(v, n)})
    batch_size: int = field(default=24, metadata={"check": lambda v, n: check_int(v, n, 1)})
    folds: int = field(default=10, metadata={"check": lambda v, n: check_int(v, n, 2)})
    device: str = field(default="auto", metadata={"check": lambda v, n: _device(v, n)})
    eval_batch_size: int = field(default=32, metadata={"check": lambda v, n: check_int(v, n, 1)})
    threads: int | None = field(default=None, metadata={"check": lambda v, n: None if v is None else check_int(v, n, 1)})
    holdout: float = field(default=0.1, metadata={"check": lambda v, n: check_real(v, n, 0.0, 1.0, high_open=True)})
    recalibrate_bn: bool = field(default=True, metadata={"check": lambda v, n: check_bool(v, n)})


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
        saliency_members: gates of that net, averaged (``SaliencyNet``'s ``members``).
        saliency_init: a trained stage (``saliency.pt`` of ``dac fit-saliency``) the saliency
            net starts from instead of the paper's map: ``dac_e2e`` trains on from it,
            ``dac`` keeps it fixed (its crops cached). Its pool size, width and members must
            be the pipeline's (``pool_size``, ``saliency_width``, ``saliency_members``);
            the pipeline's own ``r_min_fraction``, ``sharpness_factor`` and ``search`` are
            used, not the stage's. None: the paper's map. The file is read when a run
            starts; a results folder records its digest and refuses a changed stage.
        localization_size: (H, W) the STN's localisation net sees.
        roi_rotate_degrees: DAC pipelines: rotate each crop about the centre of its
            box by up to this angle, sampled from the whole image (no black corners);
            0 disables. Replaces the preset's rotation.
        front_lr: learning rate of the front's own parameters (None: ``train.lr``).
        front_clip_norm: the front's gradient norm per step is scaled down to this where
            it is larger (None: no clip; a guard for ``candidates``' training, whose
            collapses start with the front's gradient norm jumping 30-100 fold).
        r_min_fraction: DAC pipelines: ``DACrop``'s minimum half-width as a fraction of
            the image width (paper: 1/3.5, boxes at least 0.57 of the width wide).
        sharpness_factor: DAC pipelines: the search's gamma multiplier per stage (paper's
            text: 2; Algorithm 1: 4).
        search: DAC pipelines: ``DACrop``'s search, ``"paper"`` (the staged ascent) or
            ``"global"`` (every feasible box scored, the best polished).
        edge_margin: DAC pipelines: train through a soft-edged crop
            (:func:`dac.functional.soft_crop`) with a band of this many output pixels
            around the box, so the box's gradient (``dac_e2e``) sees content outside it;
            0: the hard crop. Evaluation crops hard (the band stays, at zero). With
            ``dac`` (nothing to learn) it is the control: the same crops, a box that
            does not learn.
        edge_sharpness: with ``edge_margin``: the soft edge's sharpness per
            output pixel in the first and the last epoch (geometric in between).
        front_warmup: ``dac_e2e``: the first epochs train the classifier alone, on the
            crops of the untrained front (the paper's map: plain DAC crops, computed
            once); the rest of ``epochs`` train both. 0: both from the start.
        candidates: ``dac_e2e`` with ``search: global``: train on the crops of the K best
            maxima of each image's cost, weighted by ``f ** candidate_power``, the
            output their mixture (:class:`dac.train.pipelines.DACFront`); 1: one box.
        candidate_power: beta of those weights.
        candidate_sampling: with ``candidates``: train on one candidate per image, drawn
            by its weight (the expected loss, its weights' gradient a score-function
            estimate) instead of the mixture of all K: the classifier sees one crop per
            image.
        candidate_baseline: with ``candidate_sampling``: ``batch`` (the drawn crop's loss
            against the batch's other images') or ``best`` (against the loss of the same
            image's best candidate: one more forward pass of the classifier).
        learn_constants: ``dac_e2e``: the paper's constants trained with the front, at
            ``front_lr``, a subset of ``[r_min, sharpness]`` (``DACrop(learn=...)``:
            the minimum half-width and a factor on the search's sharpness, bounded).
    """

    kind: str = field(default="dac", metadata={"check": lambda v, n: check_choice(v, PIPELINE_KINDS, n)})
    epochs: int = field(default=144, metadata={"check": lambda v, n: check_int(v, n, 1)})
    input_size: tuple[int, int] = field(default=(200, 370), metadata={"check": lambda v, n: _pair(v, n, 8)})
    augment: str = field(default="paper", metadata={"check": lambda v, n: check_choice(v, AUGMENTATIONS, n)})
    pool_size: int = field(default=10, metadata={"check": lambda v, n: check_int(v, n, 1)})
    backward_mode: str = field(default="implicit", metadata={"check": lambda v, n: check_choice(v, BACKWARD_MODES, n)})
    saliency_width: int = field(default=16, metadata={"check": lambda v, n: check_int(v, n, 1)})
    saliency_members: int = field(default=1, metadata={"check": lambda v, n: check_int(v, n, 1)})
    saliency_init: str | None = field(default=None, metadata={"check": lambda v, n: None if v is None else _text(v, n)})
    localization_size: tuple[int, int] = field(default=(64, 118), metadata={"check": lambda v, n: _pair(v, n, 16)})
    roi_rotate_degrees: float = field(default=0.0, metadata={"check": lambda v, n: check_angle(v, n)})
    front_lr: float | None = field(default=None, metadata={"check": lambda v, n: None if v is None else _positive(v, n)})
    front_clip_norm: float | None = field(default=None, metadata={"check": lambda v, n: None if v is None else _positive(v, n)})
    r_min_fraction: float = field(default=1 / 3.5, metadata={"check": lambda v, n: check_real(v, n, 0.0, 0.5, low_open=True)})
    sharpness_factor: float = field(default=2.0, metadata={"check": lambda v, n: check_real(v, n, 1.0, 16.0)})
    search: str = field(default="paper", metadata={"check": lambda v, n: check_choice(v, SEARCHES, n)})
    edge_margin: int = field(default=0, metadata={"check": lambda v, n: check_int(v, n, 0)})
    edge_sharpness: tuple[float, float] = field(default=(0.25, 8.0), metadata={"check": lambda v, n: _positive_pair(v, n)})
    front_warmup: int = field(default=0, metadata={"check": lambda v, n: check_int(v, n, 0)})
    candidates: int = field(default=1, metadata={"check": lambda v, n: check_int(v, n, 1)})
    candidate_power: float = field(default=1.0, metadata={"check": lambda v, n: _positive(v, n)})
    candidate_sampling: bool = field(default=False, metadata={"check": lambda v, n: check_bool(v, n)})
    candidate_baseline: str = field(default="batch", metadata={"check": lambda v, n: check_choice(v, CANDIDATE_BASELINES, n)})
    learn_constants: tuple[str, ...] = field(default=(), metadata={"check": lambda v, n: _learnable(v, n)})


_PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "resize": {"epochs": 96, "input_size": (224, 224), "augment": "strong"},
    "dac": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},
    "dac_e2e": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},
    "stn": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},
    "oracle": {"epochs": 144, "input_size": (200, 370), "augment": "paper"},  # named in a config only: needs known regions
}


#: Pipeline settings added after TRAINING_REVISION 3, at their defaults (left out of the fingerprint).
_LATER_DEFAULTS = {"r_min_fraction": 1 / 3.5, "sharpness_factor": 2.0, "edge_margin": 0, "edge_sharpness": [0.25, 8.0], "front_warmup": 0,
                   "search": "paper", "candidates": 1, "candidate_power": 1.0, "front_clip_norm": None,
                   "candidate_sampling": False, "candidate_baseline": "batch", "saliency_members": 1, "saliency_init": None,
                   "learn_constants": []}


@dataclass
class ExperimentConfig:
    """The whole experiment: data, classifier, training and the pipelines to compare."""

    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipelines: dict[str, PipelineConfig] = field(
        default_factory=lambda: {k: PipelineConfig(kind=k, **v) for k, v in _PIPELINE_DEFAULTS.items() if k != "oracle"}
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
        if d["data"]["source"] not in GENERATED:
            d["data"]["source"] = "files"
        if d["data"]["regions"] is None:  # added later: counts only when set
            d["data"].pop("regions")
        else:
            d["data"]["regions"] = "files"  # what the table holds is in the data digest
        for p in d["pipelines"].values():  # settings added later count only when set, so older folders still match
            for key, default in _LATER_DEFAULTS.items():
                if p.get(key) == default:
                    p.pop(key)
            if "saliency_init" in p:  # the stage's path is not part of it; its content is checked by digest (run.json)
                p["saliency_init"] = "stage"
        d["revision"] = TRAINING_REVISION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | Path | None = None, *, data: str | None = None, regions: str | None = None,
                device: str | None = None) -> ExperimentConfig:
    """Read a YAML config (None: the defaults), then apply command-line overrides.

    Args:
        path: a ``.yaml`` file.
        data: overrides ``data.source``: a folder of class folders or a CSV of path,label.
        regions: overrides ``data.regions``: a CSV of path,x1,y1,x2,y2.
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
    if regions is not None:
        if not Path(regions).is_file():
            raise DACInputError(f"--regions: {regions!r} is not a file (expected a CSV of path,x1,y1,x2,y2)")
        cfg.data.regions = str(regions)
    if device is not None:
        cfg.train.device = _available_device(device, "--device")
    return cfg


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and check an :class:`ExperimentConfig` from nested dicts (a parsed YAML)."""
    if not isinstance(raw, Mapping):
        raise DACInputError(f"config: expected a mapping, got {type(raw).__name__}")
    _no_unknown(raw, ("seed", "data", "model", "train", "pipelines"), "config")
    cfg = ExperimentConfig()
    cfg.seed = check_int(raw.get("seed", cfg.seed), "seed", 0)
    cfg.data = _section(DataConfig, raw.get("data"), "data")
    cfg.model = _section(ModelConfig, raw.get("model"), "model")
    cfg.train = _section(TrainConfig, raw.get("train"), "train")
    if "pipelines" in raw:
        pipes = raw["pipelines"]
        if not isinstance(pipes, Mapping) or not pipes:
            raise DACInputError("pipelines: expected a non-empty mapping of name -> settings")
        cfg.pipelines = {}
        for name, settings in pipes.items():
            if settings is not None and not isinstance(settings, Mapping):
                raise DACInputError(f"pipelines.{name}: expected a mapping of settings, got {settings!r}")
            settings = dict(settings or {})
            kind = check_choice(settings.get("kind", name), PIPELINE_KINDS, f"pipelines.{name}.kind")
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
    """A config section from a mapping: unknown keys refused, each given value checked by its field."""
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise DACInputError(f"{name}: expected a mapping of settings, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _no_unknown(raw, fields, name)
    return cls(**{k: fields[k].metadata["check"](raw[k], f"{name}.{k}") for k in fields if k in raw})


def _no_unknown(raw: Mapping[str, Any], known, name: str) -> None:
    unknown = sorted(set(map(str, raw)) - set(known))
    if unknown:
        raise DACInputError(f"{name}: unknown key(s) {unknown}; expected some of {sorted(known)}")


def _check(cfg: ExperimentConfig) -> None:
    """What a single field's check cannot see: settings that only make sense together."""
    for name, p in cfg.pipelines.items():
        if p.front_warmup and p.kind != "dac_e2e":
            raise DACInputError(f"pipelines.{name}.front_warmup: only dac_e2e has a front to train (kind {p.kind!r})")
        if p.edge_margin and p.kind not in ("dac", "dac_e2e"):
            raise DACInputError(f"pipelines.{name}.edge_margin: only DAC pipelines have a box to soften (kind {p.kind!r})")
        if p.edge_margin and p.roi_rotate_degrees:
            raise DACInputError(f"pipelines.{name}.edge_margin: not with roi_rotate_degrees (a rotated crop has no soft edge)")
        if p.saliency_init is not None and p.kind not in ("dac", "dac_e2e"):
            raise DACInputError(f"pipelines.{name}.saliency_init: only DAC pipelines search a saliency map (kind {p.kind!r})")
        if p.front_warmup >= p.epochs:
            raise DACInputError(f"pipelines.{name}.front_warmup: {p.front_warmup} must be below epochs ({p.epochs})")
        if p.roi_rotate_degrees and p.kind not in ("dac", "dac_e2e"):
            raise DACInputError(f"pipelines.{name}.roi_rotate_degrees: only DAC pipelines have a box to rotate about (kind {p.kind!r})")
        if p.front_clip_norm is not None and p.kind not in ("dac_e2e", "stn"):
            raise DACInputError(f"pipelines.{name}.front_clip_norm: only dac_e2e and stn have a front to train (kind {p.kind!r})")
        if p.candidates > 1 and (p.kind != "dac_e2e" or p.search != "global"):
            raise DACInputError(f"pipelines.{name}.candidates: only dac_e2e with search: global learns which maximum to pick "
                                f"(kind {p.kind!r}, search {p.search!r})")
        if p.candidate_baseline != "batch" and not p.candidate_sampling:
            raise DACInputError(f"pipelines.{name}.candidate_baseline: only for candidate_sampling: true")
        if p.candidate_sampling and p.candidates < 2:
            raise DACInputError(f"pipelines.{name}.candidate_sampling: draws one of several candidates; set candidates > 1")
        if p.learn_constants and p.kind != "dac_e2e":
            raise DACInputError(f"pipelines.{name}.learn_constants: only dac_e2e trains its front (kind {p.kind!r})")
        if "r_min" in p.learn_constants and p.r_min_fraction >= 0.5:
            raise DACInputError(f"pipelines.{name}.learn_constants: a learned r_min starts below 0.5 (r_min_fraction {p.r_min_fraction})")
        if p.candidates > 1 and (p.edge_margin or p.roi_rotate_degrees):
            raise DACInputError(f"pipelines.{name}.candidates: not with edge_margin or roi_rotate_degrees (candidates are cropped hard)")


def _learnable(value: Any, name: str) -> tuple[str, ...]:
    from ..layer import LEARNABLE

    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise DACInputError(f"{name}: expected a list of names among {list(LEARNABLE)}, got {value!r}")
    for item in value:
        check_choice(item, LEARNABLE, name)
    if len(set(value)) != len(value):
        raise DACInputError(f"{name}: names repeated in {list(value)}")
    return tuple(item for item in LEARNABLE if item in value)


def _positive(value: Any, name: str) -> float:
    return check_real(value, name, 0.0, float("inf"), low_open=True, high_open=True)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise DACInputError(f"{name}: expected a non-empty text, got {value!r}")
    return value


def _pair(value: Any, name: str, low: int) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DACInputError(f"{name}: expected [height, width], got {value!r}")
    return (check_int(value[0], f"{name}[0]", low), check_int(value[1], f"{name}[1]", low))


def _positive_pair(value: Any, name: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DACInputError(f"{name}: expected [first, last], got {value!r}")
    return (_positive(value[0], f"{name}[0]"), _positive(value[1], f"{name}[1]"))


def _sizes(value: Any, name: str, low: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise DACInputError(f"{name}: expected a non-empty list of [height, width], got {value!r}")
    return tuple(_pair(s, f"{name}[{i}]", low) for i, s in enumerate(value))


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
