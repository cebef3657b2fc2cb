"""The run folder: its file names, the log, metrics.jsonl, the plot, config.json, and what a failed start
leaves behind (nothing).

Imports no torch: writing goes through `reparam_zoo.fileio.atomic_write`, imported when a file is written.
Only rank 0 writes; the caller decides who calls.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import first_line, preview
from .config import TrainConfig, TrainError, read_settings_file

__all__ = ["CONFIG_FILE", "STATE_FILE", "LAST_FILE", "BEST_FILE", "DEPLOY_FILE", "PICKLE_FILES", "METRICS_FILE",
           "PLOT_FILE", "LOG_FILE", "RunDir", "Log", "read_config", "default_output_dir", "sig3", "write_json"]

CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
LAST_FILE = "last.safetensors"
BEST_FILE = "best.safetensors"
DEPLOY_FILE = "deploy.safetensors"
# A model without a rebuildable architecture (a trusted pickle) is written as whole-module pickles instead:
# no safetensors file could say what to rebuild.
PICKLE_FILES = {LAST_FILE: "last.pt", BEST_FILE: "best.pt", DEPLOY_FILE: "deploy.pt"}
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "metrics.png"
LOG_FILE = "train.log"
# what TrainResult.files calls each file, in the order they are listed
RESULT_FILES = (("config", CONFIG_FILE), ("log", LOG_FILE), ("metrics", METRICS_FILE), ("plot", PLOT_FILE),
                ("last", LAST_FILE), ("best", BEST_FILE), ("state", STATE_FILE), ("deploy", DEPLOY_FILE))


def read_config(output_dir: str) -> TrainConfig:
    """The settings of the run in `output_dir` (a run folder is data: only plain JSON is read)."""
    output_dir = os.fspath(output_dir)
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isdir(output_dir):
        raise TrainError(f"{output_dir}: no such run folder")
    if not os.path.exists(os.path.join(output_dir, STATE_FILE)) or not os.path.exists(path):
        raise TrainError(f"{output_dir}: no checkpoint to resume from ({STATE_FILE} / {CONFIG_FILE} missing)")
    return read_settings_file(path, TrainConfig.from_dict, TrainError, "run settings")


def default_output_dir(model: str) -> str:
    """runs/<model name>-<time>, the model named as the MODEL argument or the in-memory class names it."""
    from .. import torchvision_models

    spec = model.strip("<>").split()[-1]
    spec = torchvision_models.split_name(spec) or spec
    name = os.path.splitext(os.path.basename(spec))[0] or "model"
    return os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


class RunDir:
    """The run folder of one run, as this process sees it: where each file goes, and which files this run
    wrote (a fresh run that fails before its first checkpoint removes exactly those)."""

    def __init__(self, path: str, *, model_files: str = "safetensors", resuming: bool = False):
        self.path = path
        self.model_files = model_files
        self.resuming = resuming
        self.written: List[str] = []
        self.made_dirs: List[str] = []  # the folder and the parents it needed, deepest first
        self.checkpointed = False  # train_state.pt written: from then on the folder can be resumed
        self.lock_fd: Optional[int] = None  # held while this run uses the folder (see `lock`)

    def lock(self) -> None:
        """Claim the folder for this run: an exclusive flock on the folder itself, so a second run into it
        (a fresh one or a resume) is refused at once instead of interleaving its files with this one's. The
        lock lives as long as this process holds it open (`unlock`, or its death: nothing stale after a
        crash), and leaves no file behind."""
        if self.lock_fd is not None or not os.path.isdir(self.path):
            return
        from ..fileio import FolderBusy, lock_folder

        try:
            self.lock_fd = lock_folder(self.path)
        except FolderBusy:
            raise TrainError(f"{self.path}: another run is using this folder (a reparam train still running?); wait "
                             "for it to end, or choose another folder") from None

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    def file(self, name: str) -> str:
        """The run's file `name`, as this run writes it (model files: safetensors or pickles)."""
        if self.model_files == "pickle":
            name = PICKLE_FILES.get(name, name)
        return os.path.join(self.path, name)

    def resume_command(self) -> str:
        """The command that continues this run (a pickle run's files are read only with --trust-pickle)."""
        return f"reparam train --resume {self.path}" + (" --trust-pickle" if self.model_files == "pickle" else "")

    def writes(self, path: str) -> str:
        """`path`, noted as written by this run (see `remove_unresumable`)."""
        if path not in self.written:
            self.written.append(path)
        return path

    def check_new(self) -> None:
        """A fresh run's folder must be new or empty: checked first, created only once the run can start."""
        out = self.path
        if os.path.exists(out) and not os.path.isdir(out):
            raise TrainError(f"{out}: is a file, expected an output folder")
        if os.path.isdir(out) and os.listdir(out):
            raise TrainError(
                f"{out}: output folder is not empty ({preview(sorted(os.listdir(out)), 4)}); choose a new one, or "
                "continue the run in it with --resume / reparam_zoo.resume()"
            )

    def create(self, config: TrainConfig) -> None:
        """Make the folder (and its missing parents) and write config.json, on resume too: the overrides
        (epochs, ...) are part of the run from now on."""
        missing, folder = [], os.path.abspath(self.path)
        while not os.path.exists(folder):
            missing.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise TrainError(f"{self.path}: cannot create output folder ({first_line(e)})") from None
        self.lock()  # before claiming the folders made: a folder another run holds is not this run's to remove
        self.made_dirs = missing
        if not self.resuming:
            self.check_new()  # another run may have made the folder its own since this run checked it
        write_json(self.writes(os.path.join(self.path, CONFIG_FILE)), config.as_dict())

    def remove_unresumable(self) -> None:
        """A fresh run that failed before its first checkpoint: remove exactly the files it wrote and the
        folders it made. Nothing there could be resumed, and a non-empty folder would block the corrected
        command (no command leaves files behind when it fails)."""
        if self.resuming or self.checkpointed:
            return
        for path in reversed(self.written):
            with contextlib.suppress(OSError):  # the run's own error matters more than a file left behind
                os.remove(path)
        for folder in self.made_dirs:
            with contextlib.suppress(OSError):  # not empty: someone else put files there, keep them
                os.rmdir(folder)

    def write_metrics(self, history: Sequence[Dict[str, Any]]) -> None:
        text = "".join(json.dumps(row) + "\n" for row in history)
        _atomic_text(self.writes(os.path.join(self.path, METRICS_FILE)), text)

    def existing_files(self) -> Dict[str, str]:
        files = {}
        for key, name in RESULT_FILES:
            path = self.file(name)
            if os.path.exists(path):
                files[key] = path
        return files

    def plot(self, history: Sequence[Dict[str, Any]], panels: Sequence[Tuple[str, str, float]], title: str,
             log: "Log") -> None:
        """metrics.png: one panel per (metric, label, scale), train and val curves over the epochs."""
        try:
            # the Figure API, not pyplot: no global backend or figure state changes under a notebook's feet
            from matplotlib.figure import Figure
        except ImportError:
            log("note: matplotlib is not installed (pip install 'reparam-zoo[plot]'); no metrics.png")
            return
        trained = [r for r in history if "train_loss" in r]
        fig = Figure(figsize=(5 * len(panels), 4))
        axes = fig.subplots(1, len(panels))
        for ax, (metric, label, scale) in zip(axes if len(panels) > 1 else [axes], panels):
            # a task may score a metric on one split only (a detector's loss in training, its mAP in validation)
            for split, rows, marker in (("train", trained, "o-"), ("val", history, "s-")):
                rows = [r for r in rows if r.get(f"{split}_{metric}") is not None]
                if rows:
                    ax.plot([r["epoch"] for r in rows], [scale * r[f"{split}_{metric}"] for r in rows], marker,
                            label=split)
            ax.set_xlabel("epoch (0 = before training)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        from ..fileio import atomic_write

        atomic_write(self.writes(os.path.join(self.path, PLOT_FILE)), lambda tmp: fig.savefig(tmp, format="png", dpi=100))


class Log:
    """Log lines to the console (when `verbose`) and the run's train.log; lines before the folder exists are
    kept and written once it does. `enabled=False` (ranks other than 0): nothing at all."""

    def __init__(self, *, enabled: bool, verbose: bool, echo: Optional[Callable[[str], None]] = None):
        self.enabled, self.verbose = enabled, verbose
        self.path: Optional[str] = None
        self.pending: List[str] = []
        if echo is None:
            from tqdm import tqdm

            echo = tqdm.write  # lifts a progress bar off the terminal line first
        self.echo = echo

    def open(self, path: str) -> None:
        self.path = path
        for line in self.pending:
            self._write(line)
        self.pending = []

    def close(self) -> None:
        """Nothing more goes to the file (it is being removed)."""
        self.path = None

    def __call__(self, message: str, console: bool = True) -> None:
        """`console=False`: train.log only (a line too long for a terminal, e.g. a thousand class names)."""
        if not self.enabled:
            return
        if self.verbose and console:
            self.echo(message)
        if self.path is None:
            self.pending.append(message)
        else:
            self._write(message)

    def _write(self, message: str) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a") as f:
            f.write(f"{stamp} {message}\n")


def sig3(value: float) -> str:
    """3 significant digits without an exponent (0.36, 12.3, 491; large numbers keep all their digits)."""
    if not math.isfinite(value) or value <= 0:
        return f"{value:.0f}" if math.isfinite(value) else str(value)
    return f"{value:.{max(0, 2 - math.floor(math.log10(value)))}f}"


def write_json(path: str, value: Any) -> None:
    _atomic_text(path, json.dumps(value, indent=2) + "\n")


def _atomic_text(path: str, text: str) -> None:
    from ..fileio import atomic_write

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
