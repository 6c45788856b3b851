"""Typed configuration: dataclasses loaded from YAML, with ``key=value`` overrides.

Every number the paper or a user might change is a field here, with the reference value of
METHOD.md (PASCAL VOC, ResNet-101) as its default. An experiment's YAML names only what differs.

    cfg = load_config("configs/digits.yaml", overrides=["dssn.temperature=0.2", "epochs=3"])

An override may name a field by its full dotted path (``dssn.temperature``) or, when the name is
unique across sections, by the field alone (``temperature``). Unknown keys and wrong types raise
:class:`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

IGNORE_INDEX = 255  # masks: uint8 class ids, 255 = ignore
UNLABELED_PAD = 254  # geometric augmentation pads unlabeled masks with this; becomes ignore


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an invalid value."""


@dataclass
class ModelConfig:
    # tiny | resnet18 | resnet34 | resnet50 | resnet101 | resnet50_deep | resnet101_deep
    backbone: str = "resnet101_deep"
    num_classes: int = 21
    output_stride: int = 16  # 16 (reference) or 8
    width: int = 64  # base width of the ``tiny`` backbone (ResNet uses 64)
    # None (random init), a local file path, or "imagenet" (torchvision weights; needs internet
    # or a populated torch hub cache)
    pretrained: str | None = None
    # start the student and the teacher from a trained network: a checkpoint or run directory
    # (its teacher) or a reference .pth (its EMA teacher, else its student), e.g. a supervised
    # run; the optimizer, schedule and epochs start afresh (a resumed run restores its own)
    init: str | None = None
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18])
    dropout: float = 0.5  # feature perturbation: Dropout2d probability


@dataclass
class DSSNConfig:
    """The method's knobs (METHOD.md steps 5-9 and 'What this project adds')."""

    variant: str = "voc"  # voc | cityscapes (loss layout, warm-up rule)
    labeled_loss: str = "ce"  # ce | ohem
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000
    # pseudo-label selection: dssn | topk | threshold | none
    selection: str = "dssn"
    select_ratio: float = 0.96  # dssn: per-class threshold = ratio * max confidence ...
    select_floor: float = 0.92  # ... when the max confidence exceeds this floor
    topk_ratio: float = 0.5  # topk: fraction of each class's argmax pixels kept
    threshold: float = 0.95  # threshold: one global confidence threshold (UniMatch)
    # Siamese consistency: mse (reference) | infonce
    consistency: str = "mse"
    temperature: float = 0.1  # infonce temperature
    infonce_pixels: int = 256  # pixels sampled per image for infonce
    w_strong: float = 0.25
    w_fp: float = 0.25
    w_consistency: float = 0.01
    # cityscapes: consistency added outside the 1/2 (L = 1/2(...) + w_c (Limg + Lfeat))
    consistency_outside_half: bool = False
    strong_warmup_epochs: int = 0  # Ls1, Ls2 left out for these epochs (cityscapes: 5)
    # labeled-only burn-in (Unbiased Teacher): the first epochs train on the labeled stream
    # alone (no unlabeled reads, supervised-cost steps); the EMA teacher follows as usual
    burn_in_epochs: int = 0
    ema: float = 0.996
    # shortcuts METHOD.md allows (True = do less work; False = exact reference structure)
    teacher_single_pass: bool = True
    fp_unlabeled_only: bool = True
    fused_ema: bool = True


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd (reference) | adamw
    lr: float = 0.002  # backbone lr; other parameters lr * lr_multi
    lr_multi: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9


@dataclass
class DataConfig:
    root: str = "shards/voc-92"  # Parquet shards (local path or s3:// / gs:// URI)
    crop_size: int = 513
    batch_size: int = 2  # per worker, for each of labeled / unlabeled / mix
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cutmix_p: float = 0.5
    cutmix_area: list[float] = field(default_factory=lambda: [0.02, 0.4])
    cutmix_aspect: float = 0.3  # aspect ratio drawn from U[a, 1/a]
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    eval_mode: str = "original"  # original | center_crop | sliding_window
    eval_crop: int | None = None  # defaults to crop_size
    eval_stride: float = 2 / 3  # sliding window: stride = int(window * this) (reference 2/3)
    # test-time augmentation: the class probabilities at each scale (and mirrored, with
    # eval_flip) are added; the reference evaluates at [1.0] without flips
    eval_scales: list[float] = field(default_factory=lambda: [1.0])
    eval_flip: bool = False
    # local shuffle buffer (rows) per worker and stream, across the row groups of a stream;
    # each epoch's first batch waits until 1.5x this + a batch have arrived (Ray's
    # ShufflingBatcher): at 64, 4 row groups of every stream on every worker
    shuffle_buffer: int = 16
    seed: int = 0
    # augmentation (METHOD.md "Augmentations"); reference values
    hflip_p: float = 0.5
    jitter_p: float = 0.8  # strong view: ColorJitter with this probability ...
    jitter: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5, 0.25])  # b, c, s, hue
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    strong_ops_max: int = 3  # then n ~ U{1..this} random ops, drawn with replacement
    enhance_range: list[float] = field(default_factory=lambda: [0.05, 0.95])  # contrast, ...
    posterize_bits: list[int] = field(default_factory=lambda: [4, 8])
    solarize_range: list[int] = field(default_factory=lambda: [1, 256])
    hue_shift_max: float = 0.5  # random op "hue": shift by +-U[0, this] of the colour circle
    # rows per decode batch of build_datasets' "val" (a training stream's task: see below)
    map_batch_rows: int = 16
    # row groups (32 rows each) one read / augment task of a training stream takes: Ray's cost
    # per task (~25 ms of CPU across its processes here) is most of a small image's; 2 cut the
    # digits' CPU a row by ~21% (README "Scaling"); 1 starts a small part on more CPUs at once
    row_groups_per_task: int = 1


@dataclass
class TrainConfig:
    epochs: int = 100  # epoch = one pass over the unlabeled set
    iters_per_epoch: int | None = None  # None: unlabeled rows / (batch * workers)
    eval_every: int = 1
    log_every: int = 20
    seed: int = 0
    # none | bf16 (CUDA; CPUs with AVX512-BF16/AMX) | fp16 (CUDA, with a GradScaler: GPUs
    # without bf16, e.g. V100, T4)
    amp: str = "none"
    channels_last: bool = False
    tensorboard: bool = True  # rank 0 writes <run_dir>/tensorboard/ (local storage)
    board_images: int = 4  # val images whose teacher prediction TensorBoard shows each eval
    sync_bn: bool = True  # SyncBatchNorm when more than one worker
    # micro-batches a step: each worker sums the gradients of this many batches of
    # data.batch_size before one optimizer step and one EMA update, so the global batch is
    # batch_size x workers x accumulate on fewer or smaller GPUs (BatchNorm still sees one
    # micro-batch at a time)
    accumulate: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 0
    nan_policy: str = "error"  # error | skip
    workers: int = 1
    gpus_per_worker: float = 0
    cpus_per_worker: float = 1
    threads_per_worker: int | None = None  # torch threads in each worker (None: cpus_per_worker)
    storage: str = "runs"
    name: str | None = None
    # test-only fault injection: rank 1 (or 0 with one worker) dies once at this global iteration
    fail_at_iter: int | None = None
    # test-only: the loss of this global iteration becomes NaN on every worker (nan_policy)
    nan_at_iter: int | None = None


@dataclass
class TuneConfig:
    num_samples: int = 20
    max_epochs: int | None = None  # None: train.epochs
    grace_period: int = 1  # ASHA: epochs before a trial may be stopped (raised past a burn-in)
    reduction_factor: int = 3  # ASHA's eta: the top 1/3 go on (the ASHA paper's choice)
    asha: bool = True
    metric: str = "teacher_miou"
    seed: int = 0
    max_concurrent_trials: int | None = None  # None: derived from cluster resources
    # search space overrides: name -> spec, e.g. {"temperature": {"loguniform": [0.02, 1.0]}}
    space: dict[str, Any] = field(default_factory=dict)
    # optional parameters to add to the default space (lr, ema, selection, consistency)
    extra: list[str] = field(default_factory=list)
    name: str | None = None  # experiment name (None: "<name>-tune")
    # where experiments go (None: train.storage); a path, or a URI pyarrow reads (s3://, gs://)
    storage_path: str | None = None
    # CPUs kept free per running trial for its Ray Data read/augment tasks (none: they starve)
    data_cpus: float = 1.0
    trial_cpus: float = 0.5  # the trial's own function: builds the TorchTrainer, then waits
    # Tune restarts a failed trial this many times; its Train run continues from its last
    # checkpoint (train.max_failures covers worker failures inside one run)
    trial_retries: int = 0


@dataclass
class Config:
    name: str = "dssn"
    method: str = "dssn"  # dssn | supervised (labeled loss only: the baseline)
    model: ModelConfig = field(default_factory=ModelConfig)
    dssn: DSSNConfig = field(default_factory=DSSNConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def labeled_only(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) trains on labeled batches alone: the supervised
        baseline, or the first ``dssn.burn_in_epochs`` epochs of a DSSN run."""
        return self.method == "supervised" or epoch < self.dssn.burn_in_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


CHOICES: dict[str, tuple[str, ...]] = {
    "method": ("dssn", "supervised"),
    "model.backbone": (
        "tiny",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet50_deep",
        "resnet101_deep",
    ),
    "model.output_stride": (8, 16),
    "dssn.variant": ("voc", "cityscapes"),
    "dssn.labeled_loss": ("ce", "ohem"),
    "dssn.selection": ("dssn", "topk", "threshold", "none"),
    "dssn.consistency": ("mse", "infonce"),
    "optim.optimizer": ("sgd", "adamw"),
    "data.eval_mode": ("original", "center_crop", "sliding_window"),
    "train.amp": ("none", "bf16", "fp16"),
    "train.nan_policy": ("error", "skip"),
}


# ----------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[-1]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, key, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: '{key}' has unsupported type {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            close = [k for k in fields if k.startswith(str(key)[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{full}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, full + ".", where)
        else:
            kwargs[key] = _coerce(value, tp, full, where)
    return cls(**kwargs)


def validate(cfg: Config, where: str = "config") -> Config:
    """Check enumerations and ranges; raise ConfigError naming the key."""
    for key, allowed in CHOICES.items():
        value = get_path(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{where}: '{key}' is {value!r}; expected one of {list(allowed)}")
    checks = [
        ("data.crop_size", cfg.data.crop_size > 0, "must be positive"),
        ("data.batch_size", cfg.data.batch_size > 0, "must be positive"),
        (
            "data.eval_scales",
            bool(cfg.data.eval_scales) and all(x > 0 for x in cfg.data.eval_scales),
            "must be a non-empty list of positive scales",
        ),
        ("data.row_groups_per_task", cfg.data.row_groups_per_task > 0, "must be positive"),
        ("data.scale_range", len(cfg.data.scale_range) == 2, "needs [low, high]"),
        ("data.cutmix_area", len(cfg.data.cutmix_area) == 2, "needs [low, high]"),
        ("dssn.ema", 0.0 <= cfg.dssn.ema < 1.0, "must be in [0, 1)"),
        ("dssn.temperature", cfg.dssn.temperature > 0, "must be positive"),
        ("dssn.topk_ratio", 0.0 < cfg.dssn.topk_ratio <= 1.0, "must be in (0, 1]"),
        ("train.epochs", cfg.train.epochs > 0, "must be positive"),
        ("train.accumulate", cfg.train.accumulate > 0, "must be positive"),
        (
            "dssn.burn_in_epochs",
            0 <= cfg.dssn.burn_in_epochs < cfg.train.epochs or cfg.method == "supervised",
            f"must be in [0, train.epochs={cfg.train.epochs})",
        ),
        ("train.workers", cfg.train.workers > 0, "must be positive"),
        ("model.num_classes", cfg.model.num_classes > 1, "must be at least 2"),
    ]
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"{where}: '{key}' {msg} (got {get_path(cfg, key)!r})")
    return cfg


def from_dict(data: dict[str, Any] | None, where: str = "config") -> Config:
    """Build a validated Config from a nested mapping."""
    return validate(_build(Config, data or {}, "", where), where)


# ----------------------------------------------------------------------------- paths


def get_path(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def leaf_paths(cls: type = Config, prefix: str = "") -> list[str]:
    """All dotted field paths of the config tree (sections expanded)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaf_paths(hints[f.name], prefix + f.name + ".")
        else:
            out.append(prefix + f.name)
    return out


def resolve_key(key: str) -> str:
    """A full dotted path for ``key``: itself if it is one, else the unique field of that name."""
    paths = leaf_paths()
    if key in paths:
        return key
    matches = [p for p in paths if p.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"override '{key}' is ambiguous: use one of {matches}")
    raise ConfigError(f"override: unknown key '{key}'")


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` strings (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, raw = item.split("=", 1)
        path = resolve_key(key.strip())
        value = yaml.safe_load(raw) if raw.strip() else None
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{p}' is not a section")
        node[leaf] = value
    return data


def set_values(cfg: Config, values: dict[str, Any], where: str = "overrides") -> Config:
    """A new Config with ``{dotted_or_leaf_key: value}`` applied (used by the tuner)."""
    data = cfg.to_dict()
    for key, value in values.items():
        path = resolve_key(key)
        node = data
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_dict(data, where)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (``safe_load``), apply overrides, validate."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    if overrides:
        where = f"{where} (with overrides {overrides})"
        data = apply_overrides(data, overrides)
    return from_dict(data, where)
