"""Study files (`studies/<name>.toml`) -> a validated, frozen `StudyConfig`.

Every problem in a file is reported at once (`ConfigError`), before anything touches the storage.
A study file is data: the search space, the data split, training, sampler, pruner and budget.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hpsearch.errors import ConfigError

def _shipped_dir() -> Path:
    """The shipped study files: inside the installed package (a wheel or an image, where
    pyproject.toml force-includes them), else `<repo>/studies` in a source checkout."""
    packaged = Path(str(importlib.resources.files("hpsearch") / "studies"))
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "studies"


# A user's own study files can be anywhere (`--study path.toml`).
STUDIES_DIR = _shipped_dir()


class _Frozen(BaseModel):
    # allow_inf_nan=False: `inf` and `nan` are valid TOML floats, and valid nowhere in a study.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# Upper bounds, each with the reason the message gives. They are far above any sensible value for
# these small CNNs on 28x28..32x32 images, and below what would crash or never finish.
MAX_LR = 10.0  # a step this large overflows the weights within an epoch
MAX_WEIGHT_DECAY = 1.0  # a decay above 1 outweighs the loss: the weights are driven to zero
MAX_DROPOUT = 0.9  # beyond it too few activations reach the classifier for it to learn
MAX_CHANNELS = 2048  # wider, one batch's activations need gigabytes (64x the seed CNN's 32/64)
MIN_BATCH, MAX_BATCH = 8, 8192  # below 8 per-step overhead and gradient noise dominate; above,
#   one batch is most of a dataset's training split
MAX_EPOCHS = 1000  # a trial longer than this would run for days; the budget counts trials
MAX_SECONDS = 86_400  # a day: for heartbeats, grace periods and reconnect waits
MIN_HISTORY = 250  # TPE's good group is the best 25 trials from 250 on (window.py)


def _check_bounds(info: ValidationInfo, what: str, span: tuple[float, float], low: float, high: float,
                  reason: str) -> None:
    """Refuse a knob whose span (a fixed value: (v, v)) leaves [low, high], giving the reason.

    A config read back from a study (finalize: `context={"recorded": True}`) skips these bounds:
    a study made before a bound existed must still be finalized as it ran.
    """
    lo, hi = span
    if info.context and info.context.get("recorded"):
        return
    if lo < low or hi > high:
        got = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise ValueError(f"{what} must lie in [{low:g}, {high:g}], but got {got} ({reason})")


def _span(v: Any) -> tuple[float, float]:
    if isinstance(v, (FloatRange, IntRange)):
        return v.low, v.high
    if isinstance(v, (BatchChoice,)):
        return min(v.choices), max(v.choices)
    return v, v


# --- search space -------------------------------------------------------------------------------


class FloatRange(_Frozen):
    """A float suggested in [low, high]; `log = true` samples on a log scale."""

    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "FloatRange":
        if not self.low < self.high:
            raise ValueError(f"low must be below high, but got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, but got low={self.low}")
        return self


class IntRange(_Frozen):
    """An integer suggested in [low, high]; `log = true` samples on a log scale."""

    low: int
    high: int
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> "IntRange":
        if not self.low < self.high:
            raise ValueError(f"low must be below high, but got low={self.low}, high={self.high}")
        if self.low < 1:
            raise ValueError(f"low must be at least 1, but got low={self.low}")
        return self


class Choice(_Frozen):
    """One of a list of values."""

    choices: tuple[Any, ...] = Field(min_length=1)


Optimizer = Literal["adam", "adamw", "sgd"]


class OptimizerChoice(_Frozen):
    choices: tuple[Optimizer, ...] = Field(min_length=1)


class BatchChoice(_Frozen):
    choices: tuple[Annotated[int, Field(ge=1)], ...] = Field(min_length=1)


def _knob(searched: Any, fixed: Any) -> Any:
    """A knob is either searched (a table: range or choices) or fixed (a plain value).

    The discriminator picks the branch from the value's shape, so an error names one problem
    instead of "not a table, and not a number either".
    """
    return Annotated[
        Union[Annotated[searched, Tag("searched")], Annotated[fixed, Tag("fixed")]],
        Discriminator(lambda v: "searched" if isinstance(v, (dict, BaseModel)) else "fixed"),
    ]


FloatKnob = _knob(FloatRange, float)
ChannelKnob = _knob(IntRange, Annotated[int, Field(ge=1)])


class SearchSpace(_Frozen):
    """What the trial chooses. Each entry is a range/choices (searched) or a plain value (fixed)."""

    lr: FloatKnob
    weight_decay: FloatKnob = 0.0
    optimizer: _knob(OptimizerChoice, Optimizer) = "adam"
    momentum: FloatKnob = 0.9  # used by SGD only
    conv1_channels: ChannelKnob = 32
    conv2_channels: ChannelKnob = 64
    dropout: FloatKnob = 0.0
    batch_size: _knob(BatchChoice, Annotated[int, Field(ge=1)]) = 128

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, v: FloatKnob, info: ValidationInfo) -> FloatKnob:
        low, high = _span(v)
        if low <= 0:
            raise ValueError(f"the learning rate must be > 0, but got {low}")
        _check_bounds(info, "the learning rate", (low, high), 0, MAX_LR,
                      "a step this large overflows the weights within an epoch")
        return v

    @field_validator("weight_decay")
    @classmethod
    def _non_negative(cls, v: FloatKnob, info: ValidationInfo) -> FloatKnob:
        low, high = _span(v)
        if low < 0:
            raise ValueError(f"must be >= 0, but got {low}")
        _check_bounds(info, "weight decay", (low, high), 0, MAX_WEIGHT_DECAY,
                      "a decay above 1 outweighs the loss and drives the weights to zero")
        return v

    @field_validator("dropout", "momentum")
    @classmethod
    def _unit_interval(cls, v: FloatKnob) -> FloatKnob:
        lo, hi = _span(v)
        if not (0.0 <= lo and hi < 1.0):
            raise ValueError(f"must lie in [0, 1), but got {lo}..{hi}")
        return v

    @field_validator("dropout")
    @classmethod
    def _dropout_cap(cls, v: FloatKnob, info: ValidationInfo) -> FloatKnob:
        _check_bounds(info, "dropout", _span(v), 0.0, MAX_DROPOUT,
                      "beyond it too few activations reach the classifier for it to learn")
        return v

    @field_validator("conv1_channels", "conv2_channels")
    @classmethod
    def _channel_cap(cls, v: Any, info: ValidationInfo) -> Any:
        _check_bounds(info, "channel counts", _span(v), 1, MAX_CHANNELS,
                      "wider, one batch's activations need gigabytes; the seed CNN uses 32 and 64")
        return v

    @model_validator(mode="after")
    def _sgd_momentum(self) -> "SearchSpace":
        choices = self.optimizer.choices if isinstance(self.optimizer, OptimizerChoice) else (self.optimizer,)
        sgd = "sgd" in choices
        if sgd and _span(self.momentum)[0] <= 0:
            raise ValueError(
                f"momentum must be > 0 when the optimizer may be sgd (hpsearch's SGD uses Nesterov "
                f"momentum, which needs it), but got {_span(self.momentum)[0]}; raise it or drop sgd"
            )
        return self

    @field_validator("batch_size")
    @classmethod
    def _batch_bounds(cls, v: Any, info: ValidationInfo) -> Any:
        _check_bounds(info, "batch sizes", _span(v), MIN_BATCH, MAX_BATCH,
                      f"below {MIN_BATCH} per-step overhead and gradient noise swamp training; "
                      f"above {MAX_BATCH} one batch is most of a training split")
        return v


# --- the rest of the file -----------------------------------------------------------------------

Dataset = Literal["mnist", "fashion-mnist", "kmnist", "cifar10", "idx", "folder"]
Side = Annotated[int, Field(ge=1)]

# Keys added to [data] after studies were already stored: left out of the fingerprint while at
# their defaults, so a study made before they existed is still joined by the same file.
_NEW_DATA_KEYS = {"layout": "auto", "image_size": None, "channels": None}


class DataConfig(_Frozen):
    dataset: Dataset
    root: str = "data"
    parts: tuple[Literal["train", "test"], ...] = ("train", "test")
    images: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    split: tuple[float, float, float] = (0.70, 0.15, 0.15)
    split_seed: int = Field(default=0, ge=-(2**63), lt=2**63)  # a 64-bit salt (data.content_keys)
    # idx: where the channels are in 4-dim image files ("auto": inferred where unambiguous).
    layout: Literal["auto", "nhwc", "nchw"] = "auto"
    # folder: every image resized to [height, width] (unset: all must share one size), and
    # 1 (greyscale) or 3 (RGB) channels (unset: 1 when every image is grey, else 3).
    image_size: tuple[Side, Side] | None = None
    channels: Literal[1, 3] | None = None

    @field_validator("split")
    @classmethod
    def _split(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"train/val/test fractions must be > 0 and sum to 1, but got {list(v)}")
        return v

    @model_validator(mode="after")
    def _idx_files(self) -> "DataConfig":
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"images and labels must name the same number of files, "
                f"but got {len(self.images)} and {len(self.labels)}"
            )
        if self.dataset != "idx" and self.images:
            raise ValueError(f"images/labels are for dataset = 'idx', not {self.dataset!r}")
        if self.dataset != "idx" and self.layout != "auto":
            raise ValueError(f"layout is for dataset = 'idx', not {self.dataset!r}")
        if self.dataset != "folder" and (self.image_size is not None or self.channels is not None):
            raise ValueError(f"image_size/channels are for dataset = 'folder', not {self.dataset!r}")
        if not self.parts:
            raise ValueError("parts must name at least one of 'train', 'test'")
        return self


class TrainingConfig(_Frozen):
    max_epochs: int = Field(gt=0, le=MAX_EPOCHS)
    patience: int = Field(default=3, gt=0, le=MAX_EPOCHS)
    eval_batch_size: int = Field(default=2048, gt=0, le=65_536)
    crop_margin: int = Field(default=4, ge=0, le=1024)
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    plateau_patience: int = Field(default=1, ge=0, le=MAX_EPOCHS)
    channels_last: bool = True
    bf16: Literal["auto", "on", "off"] = "auto"


class SamplerConfig(_Frozen):
    type: Literal["tpe", "random"] = "tpe"
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    n_startup_trials: int = Field(default=8, ge=0, le=1_000_000)
    multivariate: bool = True
    constant_liar: bool = True
    # TPE models at most this many finished trials (window.py); 0: all of them.
    history: int = Field(default=1000, ge=0, le=1_000_000)
    # From this many finished trials on, a worker samples its next trial while the current one
    # trains (window.py, "Sampling ahead"); 0: never.
    sample_ahead_from: int = Field(default=1000, ge=0, le=1_000_000_000)

    @model_validator(mode="after")
    def _history(self) -> "SamplerConfig":
        if 0 < self.history < MIN_HISTORY:
            raise ValueError(
                f"history = {self.history} is too small: TPE's good group is the best 25 of >= 250 "
                f"trials, so use history >= {MIN_HISTORY}, or 0 to model every trial"
            )
        return self


class PrunerConfig(_Frozen):
    type: Literal["median", "hyperband", "none"] = "median"
    n_startup_trials: int = Field(default=4, ge=0, le=1_000_000)
    n_warmup_steps: int = Field(default=2, ge=0, le=MAX_EPOCHS)
    min_resource: int = Field(default=1, ge=1, le=MAX_EPOCHS)
    reduction_factor: int = Field(default=3, ge=2, le=100)


class BudgetConfig(_Frozen):
    n_trials: int = Field(gt=0, le=1_000_000)
    timeout_minutes: float | None = Field(default=None, gt=0, le=525_600)  # a year


class StorageConfig(_Frozen):
    heartbeat_interval: int = Field(default=10, gt=0, le=MAX_SECONDS)
    grace_period: int = Field(default=60, gt=0, le=MAX_SECONDS)
    max_retry: int = Field(default=3, ge=0, le=100)
    reconnect_timeout: float = Field(default=600.0, gt=0, le=MAX_SECONDS)

    @model_validator(mode="after")
    def _grace(self) -> "StorageConfig":
        if self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                f"grace_period must exceed heartbeat_interval, but got "
                f"grace_period={self.grace_period}, heartbeat_interval={self.heartbeat_interval}"
            )
        return self


class StudySection(_Frozen):
    name: str = Field(min_length=1, max_length=512)  # Optuna's study_name column holds 512
    description: str = ""


class StudyConfig(_Frozen):
    study: StudySection
    data: DataConfig
    search: SearchSpace
    training: TrainingConfig
    sampler: SamplerConfig = SamplerConfig()
    pruner: PrunerConfig = PrunerConfig()
    budget: BudgetConfig
    storage: StorageConfig = StorageConfig()

    # Not part of the file: where it came from, for messages and the report.
    source: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _pruner_fits_epochs(self, info: ValidationInfo) -> "StudyConfig":
        if info.context and info.context.get("recorded"):
            return self  # made by an earlier version: finalize it as it ran
        p, epochs = self.pruner, self.training.max_epochs
        if p.type == "hyperband" and p.min_resource > epochs:
            raise ValueError(
                f"pruner.min_resource={p.min_resource} exceeds training.max_epochs={epochs}: hyperband "
                f"would never prune (lower min_resource or raise max_epochs)"
            )
        # Only a warm-up the file sets: the default (2 epochs) on a 2-epoch study is no mistake of
        # the user's, it just leaves such short trials unpruned.
        if (p.type == "median" and epochs > 1 and p.n_warmup_steps >= epochs
                and "n_warmup_steps" in p.model_fields_set):
            raise ValueError(
                f"pruner.n_warmup_steps={p.n_warmup_steps} must be below training.max_epochs={epochs}, "
                f"or the median pruner never prunes (lower n_warmup_steps, or type = \"none\")"
            )
        return self

    def fingerprint(self) -> str:
        """Hash of what defines the search (data, space, training). Budget may change freely."""
        keep = self.model_dump(mode="json", include={"data", "search", "training"})
        keep["data"].pop("root", None)  # where the files are is per machine, not per search
        for key, default in _NEW_DATA_KEYS.items():
            if keep["data"].get(key, default) == default:
                keep["data"].pop(key, None)
        blob = json.dumps(keep, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def resolve_study_path(study: str) -> Path:
    """`--study` takes a name from `studies/` or a path to a `.toml` file."""
    p = Path(study)
    if p.suffix == ".toml" or "/" in study or p.exists():
        if not p.is_file():
            raise ConfigError(str(p), [f"no such study file; shipped studies: {', '.join(shipped_studies())}"])
        return p
    for base in (Path.cwd() / "studies", STUDIES_DIR):
        candidate = base / f"{study}.toml"
        if candidate.is_file():
            return candidate
    raise ConfigError(
        study,
        [f"no study named {study!r}; pass a path to a .toml file or one of: {', '.join(shipped_studies())}"],
    )


def study_name_of(arg: str) -> tuple[str, "StudyConfig | None"]:
    """`--study` of the commands that read a study (`status`, `finalize`): a study file (a name in
    studies/ or a path), loaded and checked, or else the name of a study in the storage (no file
    needed: the study records the config it was made from)."""
    is_file = Path(arg).suffix == ".toml" or "/" in arg or any(
        (base / f"{arg}.toml").is_file() for base in (Path.cwd() / "studies", STUDIES_DIR)
    )
    if is_file:
        cfg = load_config(arg)
        return cfg.study.name, cfg
    return arg, None


def shipped_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.toml"))


# Why each upper bound is where it is: added to pydantic's "less than or equal to N".
_WHY_BOUND = {
    "max_epochs": "a longer trial would run for days; the budget counts trials",
    "patience": "counted in epochs, which are bounded alike",
    "plateau_patience": "counted in epochs, which are bounded alike",
    "n_warmup_steps": "counted in epochs, which are bounded alike",
    "min_resource": "counted in epochs, which are bounded alike",
    "eval_batch_size": "a larger evaluation batch only needs more memory",
    "crop_margin": "no supported image is that large",
    "n_startup_trials": "random trials beyond a million say nothing new",
    "reduction_factor": "hyperband would keep a single trial per rung",
    "n_trials": "more trials than this would outgrow the storage long before ending",
    "timeout_minutes": "a year",
    "heartbeat_interval": "a day; a stale trial must be noticed within that",
    "grace_period": "a day; a stale trial must be noticed within that",
    "reconnect_timeout": "a day; a worker waiting longer for its database is lost",
    "max_retry": "a trial failing this often will not succeed",
    "seed": "a 64-bit integer",
    "split_seed": "a 64-bit integer",
    "name": "Optuna stores at most 512 characters",
}


def _format_error(err: dict[str, Any]) -> str:
    # pydantic's loc names union members ("FloatRange", "float"); keep only the user's field path.
    loc = ".".join(
        str(part)
        for part in err["loc"]
        if part not in {"searched", "fixed"} and not str(part).startswith(("function-", "constrained-"))
    )
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling against studies/cnn.toml)"
    elif err["type"] == "missing":
        msg = "missing required field"
    elif "input" in err and err["type"] not in {"value_error"} and not isinstance(err["input"], dict):
        msg = f"{msg}, but got {err['input']!r}"
        why = _WHY_BOUND.get(str(err["loc"][-1]) if err["loc"] else "")
        if why and err["type"] in {"less_than_equal", "less_than", "too_long", "greater_than_equal"}:
            msg = f"{msg} ({why})"
    return f"{loc}: {msg}" if loc else msg


def load_config(study: str | Path) -> StudyConfig:
    """Read and validate a study file. Raises `ConfigError` listing every problem."""
    path = resolve_study_path(str(study))
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a leading BOM is fine
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), [f"not valid TOML ({e})"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), [f"cannot read the file ({e})"]) from None
    section = raw.setdefault("study", {})
    if isinstance(section, dict):  # anything else is reported by the validation below
        section.setdefault("name", path.stem)
    try:
        cfg = StudyConfig.model_validate(raw)
    except ValidationError as e:
        problems: list[str] = []
        for err in e.errors():
            text = _format_error(err)
            if text not in problems:
                problems.append(text)
        raise ConfigError(str(path), problems) from None
    return cfg.model_copy(update={"source": str(path)})
