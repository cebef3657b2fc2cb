"""The settings of a training run and every rule about them, in one place.

Imports no torch (only the standard library and `reparam_zoo.errors`): the command line reads its defaults
and choices from here for `--help`, and checks a command line against these rules before anything heavy is
loaded. Error messages name settings by their keyword; `SettingError.render` respells them (the CLI passes
its flag names, e.g. `--warmup-epochs` for `warmup_epochs`).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, Iterable, Mapping, Optional

from ..errors import ArgumentConflictError, ReparamError, first_line
from ..options import DEFAULT_MAP_K, TRAIN_SCOPES  # DEFAULT_MAP_K: a model converted here without map_k

__all__ = ["TrainConfig", "TrainError", "RunStopped", "SettingError", "OPTIMIZERS", "MODEL_FILES", "PLAIN_SCOPE",
           "RESUMABLE_OVERRIDES", "PERMISSIONS", "DEFAULT_MAP_K", "SGD_MOMENTUM", "default_warmup_epochs", "check_warmup",
           "check_momentum",
           "check_resume_overrides", "keyword_name"]

OPTIMIZERS = {"sgd": "momentum", "adamw": "adamw"}  # our name -> timm's (timm's "sgd" is Nesterov)
SGD_MOMENTUM = 0.9  # the RefConv recipe's
# how model files are written: reparam safetensors, or whole-module pickles for a trusted pickled MODEL (no
# safetensors file could say what to rebuild)
MODEL_FILES = ("safetensors", "pickle")
# Settings a resumed run may change: none changes what it computes (workers, fuse), the change is the point
# (more epochs), or it follows the same images to a new place (data_dir).
RESUMABLE_OVERRIDES = ("epochs", "workers", "fuse", "data_dir")
# Permissions rather than settings: given by the caller every time, never taken from a run folder (a run
# folder is data; what it says cannot grant itself the right to be unpickled).
PERMISSIONS = ("trust_pickle",)
# The training scope of ordinary training: a plain model (no RefConv layers, none made), every weight trains.
# The baseline refocusing is compared with (`reparam ablate`'s finetune and continue arms).
PLAIN_SCOPE = "all"
_NAME = re.compile(r"<(\w+)>")


class TrainError(ReparamError):
    """Training cannot start or go on (bad settings, head/data mismatch, output folder in use, ...)."""


class RunStopped(TrainError):
    """A stop signal arrived before the run could make its first checkpoint: nothing was kept."""


class SettingError(TrainError, ArgumentConflictError):
    """A setting out of range or contradicting another (a usage error on the command line).

    `template` marks setting names as `<keyword>`; `str()` spells them as keywords with dashes (the library's
    convention: "warmup-epochs"), `render(name)` as the caller wants. `setting` is the one at fault.
    """

    def __init__(self, setting: str, template: str, problem: Optional[str] = None):
        self.setting, self.template, self._problem = setting, template, problem
        super().__init__(self.render(keyword_name))

    def render(self, name: Callable[[str], str]) -> str:
        return _NAME.sub(lambda m: name(m[1]), self.template)

    def problem(self, name: Callable[[str], str]) -> str:
        """What is wrong with `setting`, without naming it (for "Invalid value for '--flag': ..." messages)."""
        subject = f"<{self.setting}> "
        text = self._problem or (self.template[len(subject):] if self.template.startswith(subject) else self.template)
        return _NAME.sub(lambda m: name(m[1]), text)


def read_settings_file(path: str, from_dict: Callable[[Dict[str, Any]], Any], error: type, what: str) -> Any:
    """`from_dict` of the JSON object in `path` (a run or ablation folder is data: only plain JSON is read);
    anything else is one `error` naming the file and `what` it should hold."""
    try:
        from ..fileio import open_regular_file  # a FIFO in place of the file must not block

        with open_regular_file(path) as f:
            raw = json.load(f)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return from_dict(raw)
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise error(f"{path}: unreadable {what} ({first_line(e)})") from None


def keyword_name(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything that decides what a run computes; saved as OUTDIR/config.json and reused by `resume`."""

    model: str  # the MODEL argument, or "<in-memory ClassName>"
    data_dir: str
    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = SGD_MOMENTUM
    weight_decay: float = 4e-5
    warmup_epochs: int = 1  # `train` defaults it to 1 with at least 2 epochs, else 0
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    train_scope: Optional[str] = None  # None until the run starts: the model's own (converted), else transforms
    map_k: Optional[int] = None  # None until the run starts: the model's own (converted), else DEFAULT_MAP_K
    amp: bool = False
    channels_last: bool = False
    workers: int = 2
    seed: int = 0
    fuse: bool = False
    arch: Optional[str] = None
    checkpoint: Optional[str] = None
    pretrained: bool = False
    trust_pickle: bool = False
    world_size: int = 1
    model_files: str = "safetensors"  # set when the run starts: "pickle" for a model without an architecture
    task: str = "classification"  # `train` infers it from the model when not given (tasks.infer_task)
    ignore_index: int = 255  # segmentation: the mask value that counts neither in the loss nor in the metrics

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TrainConfig":
        """From config.json: unknown keys (a newer version's) are ignored; a missing required one is a TypeError."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def check(self) -> None:
        """Every setting on its own, and against the others."""
        for name in ("epochs", "batch_size"):
            _positive_int(name, getattr(self, name))
        for name in ("input_size", "num_classes", "map_k"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if not (_is_int(self.workers) and self.workers >= 0):
            raise SettingError("workers", f"<workers> must be >= 0, got {self.workers!r}")
        check_warmup(self.warmup_epochs, self.epochs)
        if not (_is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise SettingError("lr", f"<lr> must be a positive number, got {self.lr!r}")
        if not (_is_number(self.momentum) and 0 <= self.momentum <= 1):
            raise SettingError("momentum", f"<momentum> must be in [0, 1], got {self.momentum!r}")
        if not (_is_number(self.weight_decay) and math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise SettingError("weight_decay", f"<weight_decay> must be >= 0, got {self.weight_decay!r}")
        _one_of("optimizer", self.optimizer, OPTIMIZERS)
        if self.train_scope is not None:
            _one_of("train_scope", self.train_scope, (*TRAIN_SCOPES, PLAIN_SCOPE))
            if self.train_scope == PLAIN_SCOPE and self.map_k is not None:
                raise SettingError("map_k", f"<map_k> applies to RefConv training, not <train_scope> {PLAIN_SCOPE}")
        _one_of("model_files", self.model_files, MODEL_FILES)
        from .tasks import TASKS

        _one_of("task", self.task, TASKS)
        if not (_is_int(self.ignore_index) and 0 <= self.ignore_index <= 65535):
            raise SettingError("ignore_index", f"<ignore_index> must be an integer in [0, 65535], got {self.ignore_index!r}")


def default_warmup_epochs(epochs: Any) -> int:
    """The warmup when none is given: 1 epoch when there are at least 2, else none."""
    return 1 if _is_int(epochs) and epochs >= 2 else 0


def check_warmup(warmup_epochs: Any, epochs: Any) -> None:
    """Warmup takes whole epochs before the cosine decay, which needs at least one epoch of its own."""
    if not (_is_int(warmup_epochs) and 0 <= warmup_epochs < epochs):
        too_long = _is_int(warmup_epochs) and warmup_epochs >= epochs
        raise SettingError("warmup_epochs", f"<warmup_epochs> must be in [0, <epochs>={epochs}), got {warmup_epochs!r}",
                           f"must be less than <epochs> ({epochs}), got {warmup_epochs}" if too_long else None)


def check_momentum(optimizer: str, momentum: Optional[float]) -> float:
    """The momentum to use: given only with sgd (adamw has none); None means the recipe's."""
    if momentum is None:
        return SGD_MOMENTUM
    if optimizer != "sgd":
        raise SettingError("momentum", f"<momentum> applies to <optimizer> sgd, not {optimizer}")
    return momentum


def check_resume_overrides(saved: TrainConfig, requested: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """The settings given to continue a run, checked against the run's (`source`: its config.json): only
    RESUMABLE_OVERRIDES may differ (a path naming the same file counts as the same), and PERMISSIONS are the
    caller's. Returns the overrides."""
    current = saved.as_dict()
    for name in sorted(requested):
        if name in RESUMABLE_OVERRIDES or name in PERMISSIONS:
            continue
        value, before = requested[name], current.get(name)
        if value != before and not _same_path(value, before):
            allowed = ", ".join(f"<{n}>" for n in RESUMABLE_OVERRIDES)
            raise SettingError(name, f"<{name}> {value} differs from the run's {before} ({source}); "
                                     f"only {allowed} may change")
    return {name: requested[name] for name in RESUMABLE_OVERRIDES if name in requested}


# -- helpers ---------------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value: Any) -> None:
    if not (_is_int(value) and value >= 1):
        raise SettingError(name, f"<{name}> must be a positive integer, got {value!r}")


def _one_of(name: str, value: Any, choices: Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise SettingError(name, f"unknown <{name}> '{value}', expected one of {', '.join(choices)}")


def _same_path(a: Any, b: Any) -> bool:
    """Whether two strings name the same existing file or folder (or the same path)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)
