"""The settings of an ablation (`reparam_zoo.ablate`) and every rule about them: the arms, learning rates per
arm or a grid, seeds. No torch at import (the command line checks a command against these rules before
anything heavy is loaded); messages name settings as `<keyword>` (`SettingError.render` respells them)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .train.config import SGD_MOMENTUM, SettingError, TrainError, _positive_int, read_settings_file

__all__ = ["ARMS", "DEFAULT_ARMS", "BASELINE", "REFCONV_ARMS", "CONFIG_FILE", "AblationConfig", "AblationError",
           "parse_arms", "parse_lrs", "parse_lr_grid", "read_ablation_config"]

ARMS = ("refocus", "finetune", "continue", "random-base")
DEFAULT_ARMS = ("refocus", "finetune")
BASELINE = "finetune"  # every arm is compared with it, seed by seed
REFCONV_ARMS = ("refocus", "random-base")
CONFIG_FILE = "ablation_config.json"


class AblationError(TrainError):
    """The arms cannot be compared, or the ablation cannot start or go on."""


@dataclass
class AblationConfig:
    """Everything that decides what an ablation computes; saved as OUT/ablation_config.json."""

    model: str
    data_dir: str
    arms: List[str] = field(default_factory=lambda: list(DEFAULT_ARMS))
    lrs: Dict[str, float] = field(default_factory=dict)  # given per arm
    lr_grid: List[float] = field(default_factory=list)  # tried for the arms without a given lr (not continue)
    grid_epochs: Optional[int] = None
    seeds: int = 1
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = SGD_MOMENTUM
    weight_decay: float = 4e-5
    warmup_epochs: Optional[int] = None
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    train_scope: str = "transforms"
    map_k: Optional[int] = None
    amp: bool = False
    channels_last: bool = False
    workers: int = 2
    seed: int = 0
    arch: Optional[str] = None
    checkpoint: Optional[str] = None
    pretrained: bool = False
    trust_pickle: bool = False
    default_lr: float = 0.01  # arms with neither a given lr nor a grid

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "AblationConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def check(self) -> None:
        """The settings on their own and together; the training settings by train's own rules."""
        from .options import TRAIN_SCOPES
        from .train.config import TrainConfig

        parse_arms(",".join(self.arms))
        for arm, lr in self.lrs.items():
            if arm not in self.arms:
                raise SettingError("lr", f"<lr> names the arm {arm}, which is not in <arms> ({','.join(self.arms)})")
            _positive_lr("lr", lr)
        for lr in self.lr_grid:
            _positive_lr("lr_grid", lr)
        if self.train_scope not in TRAIN_SCOPES:
            raise SettingError("train_scope", f"<train_scope> of the RefConv arms must be one of "
                                              f"{', '.join(TRAIN_SCOPES)}, got {self.train_scope!r}")
        for name in ("seeds", "grid_epochs"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.grid_epochs is not None and not self.lr_grid:
            raise SettingError("grid_epochs", "<grid_epochs> applies with <lr_grid>")
        TrainConfig(model=self.model, data_dir=self.data_dir, epochs=self.epochs, batch_size=self.batch_size,
                    lr=self.default_lr, optimizer=self.optimizer, momentum=self.momentum,
                    weight_decay=self.weight_decay, warmup_epochs=self.warmup_epochs, input_size=self.input_size,
                    num_classes=self.num_classes, map_k=self.map_k, workers=self.workers).check()

    def run_settings(self) -> Dict[str, Any]:
        """What every run of every arm shares (train's keywords)."""
        return dict(batch_size=self.batch_size, optimizer=self.optimizer, momentum=self.momentum,
                    weight_decay=self.weight_decay, input_size=self.input_size, num_classes=self.num_classes,
                    amp=self.amp, channels_last=self.channels_last, workers=self.workers)


# -- parsing (the command line's and the library's) ------------------------------------------------------------

def parse_arms(text: str) -> List[str]:
    arms = [a.strip() for a in text.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SettingError("arms", f"unknown arm '{unknown[0]}' in <arms>, expected some of {', '.join(ARMS)}")
    if len(set(arms)) != len(arms):
        raise SettingError("arms", f"<arms> names an arm twice: {text}")
    if BASELINE not in arms or len(arms) < 2:
        raise SettingError("arms", f"<arms> must include {BASELINE} (the baseline every arm is compared with, seed "
                                   f"by seed) and at least one other arm, got {text or 'none'}")
    return arms


def parse_lrs(text: str, arms: Sequence[str]) -> Dict[str, float]:
    """`refocus=5e-4,finetune=1e-3`, or one value for every arm but continue (its rate is the pretraining one)."""
    text = text.strip()
    if "=" not in text:
        lr = _number("lr", text)
        return {arm: lr for arm in arms if arm != "continue"}
    lrs: Dict[str, float] = {}
    for part in text.split(","):
        arm, sep, value = part.partition("=")
        arm = arm.strip()
        if not sep or arm not in ARMS:
            raise SettingError("lr", f"<lr> takes ARM=RATE pairs (arms: {', '.join(ARMS)}) or one rate, got {part!r}")
        if arm in lrs:
            raise SettingError("lr", f"<lr> gives the arm {arm} twice")
        lrs[arm] = _number("lr", value)
    return lrs


def parse_lr_grid(text: str) -> List[float]:
    grid = [_number("lr_grid", v) for v in text.split(",") if v.strip()]
    if not grid:
        raise SettingError("lr_grid", "<lr_grid> needs at least one rate")
    return sorted(set(grid))


def _number(setting: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SettingError(setting, f"<{setting}>: {text.strip()!r} is not a number") from None
    _positive_lr(setting, value)
    return value


def _positive_lr(setting: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise SettingError(setting, f"<{setting}> rates must be positive numbers, got {value!r}")


def read_ablation_config(output_dir: str) -> AblationConfig:
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isdir(output_dir):
        raise AblationError(f"{output_dir}: no such ablation folder")
    if not os.path.exists(path):
        raise AblationError(f"{output_dir}: not an ablation folder ({CONFIG_FILE} missing)")
    return read_settings_file(path, AblationConfig.from_dict, AblationError, "ablation settings")
