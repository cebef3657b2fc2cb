"""What the commands share: the root group's error handling, MODEL options, --input-size, output paths."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

import click

from .lazy import leaf

options = leaf("reparam_zoo.options")  # the library's choices and defaults, without importing torch (cli/lazy.py)
from reparam_zoo.options import (DEFAULT_CALIB_IMAGES, DEFAULT_HELD_OUT_IMAGES, DEFAULT_MAP_K,  # noqa: E402
                                 DEFAULT_MIN_AGREEMENT, DEFAULT_REPEATS, DEFAULT_WARMUP, EXPORT_FORMATS, FORMAT_NAMES,
                                 INITS, LATENCY_BATCH, REPORT_CALIB_IMAGES, REPORT_FORMATS, RUNTIMES, TRAIN_SCOPES,
                                 format_of_path)

__all__ = ["DEFAULT_MAP_K", "INITS", "TRAIN_SCOPES", "REPORT_FORMATS", "EXPORT_FORMATS", "FORMAT_NAMES", "format_of_path", "DEBUG_ENV",
           "ReparamGroup"]

DEBUG_ENV = "REPARAM_DEBUG"


# -- errors -------------------------------------------------------------------------------------------------

class ReparamGroup(click.Group):
    """The root group, and the one mapping from library errors to exit codes: every failure becomes one line
    on stderr, exit 1, and a library usage error (`ArgumentConflictError`, e.g. contradicting arguments or a
    training setting out of range) exit 2 with the flag names in its message; --debug / REPARAM_DEBUG=1 asks
    for the traceback instead."""

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        with warnings.catch_warnings(), _quiet_hub_retries(debug):
            _quiet_warnings(debug)
            try:
                return super().invoke(ctx)
            except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except KeyboardInterrupt:  # (click's own handler would print an empty line first)
                if debug:
                    raise
                click.echo("error: interrupted", err=True)
                raise click.exceptions.Exit(130) from None
            except Exception as e:
                if debug:
                    raise
                from reparam_zoo.errors import ArgumentConflictError

                if isinstance(e, ArgumentConflictError):
                    error = click.UsageError(_one_line(_with_flags(e)))
                    error.command_path = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
                    raise error from None
                raise click.ClickException(_failure_message(e)) from None

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:  # embedding callers handle exceptions themselves
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            path = e.ctx.command_path if e.ctx is not None else getattr(e, "command_path", None)
            hint = f" (see '{path} --help')" if path else ""
            _fail(f"{_one_line(e.format_message())}{hint}", e.exit_code)
        except click.exceptions.ClickException as e:
            _fail(_one_line(e.format_message()), e.exit_code)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _fail("interrupted", 130)
        sys.exit(result if isinstance(result, int) else 0)


def _fail(message: str, code: int):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def flag_name(keyword: str) -> str:
    """How the command line spells a library keyword: `warmup_epochs` -> `--warmup-epochs`."""
    return {"model": "MODEL", "data_dir": "--data", "output": "-o/--output", "lr_text": "--lr", "lr_grid_text": "--lr-grid",
            "lr_grid": "--lr-grid"}.get(keyword, "--" + keyword.replace("_", "-"))


def _with_flags(e: BaseException) -> str:
    """A library message that names settings by keyword, respelt with the flags (`SettingError.render`)."""
    render = getattr(e, "render", None)
    return render(flag_name) if callable(render) else str(e)


def _failure_message(e: BaseException) -> str:
    from reparam_zoo.errors import ReparamError

    if isinstance(e, ReparamError):
        return _one_line(str(e))
    if isinstance(e, OSError):  # disk full, permissions: the user's to fix, not a bug
        cause = e.strerror or str(e)
        return _one_line(f"{e.filename}: {cause}" if e.filename else cause)
    return (f"internal error: {type(e).__name__}: {_one_line(str(e))} "
            f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)")


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).strip().splitlines() if part.strip()) or "failed"


@contextlib.contextmanager
def _quiet_hub_retries(debug: bool):
    """The hub client logs every retry of a failed download; the command's own error says it in one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    if not debug:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quiet_warnings(debug: bool) -> None:
    """Warnings as one line each; library deprecation chatter only with --debug."""
    if debug:
        return
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.simplefilter("ignore", category)

    def show(message, category, filename, lineno, file=None, line=None):
        echo(f"warning: {_one_line(str(message))}", err=True)

    warnings.showwarning = show


# -- options ------------------------------------------------------------------------------------------------

def model_options(f=None, *, num_classes: bool = True):
    """--arch, --checkpoint, --num-classes, --pretrained, --trust-pickle: how MODEL becomes a model
    (`num_classes=False` for a command whose --num-classes means something else)."""
    if f is None:
        return lambda g: model_options(g, num_classes=num_classes)
    options = [
        click.option("--arch", metavar="NAME",
                     help="Architecture (timm or zoo name, or torchvision:NAME) of a MODEL checkpoint file that does not "
                          "say its own."),
        click.option("--checkpoint", metavar="PATH",
                     help="Weights for a MODEL given as an architecture name (safetensors or a state_dict file, "
                          "read without unpickling code; official RevCol/ReXNet layouts are adapted)."),
        click.option("--num-classes", type=click.IntRange(min=0), metavar="N",
                     help="Head size of the model (default: the checkpoint's, else the architecture's); weights "
                          "with another head are refused (reparam train --num-classes replaces and trains a head)."),
        click.option("--pretrained", is_flag=True,
                     help="Download the architecture's pretrained weights (needs internet; else use --checkpoint)."),
        click.option("--trust-pickle", is_flag=True,
                     help="Allow MODEL to be a whole pickled nn.Module (torch.save(model)). Unpickling runs code "
                          "from the file: only for files you trust."),
    ]
    if not num_classes:
        del options[2]
    for option in reversed(options):
        f = option(f)
    return f


def input_size_option(help_text: str):
    return click.option("--input-size", callback=_parse_input_size, metavar="C,H,W",
                        help=help_text + " One sample's shape without the batch, e.g. 3,224,224 (or 224 for 3,224,224); "
                             "for a detector the image size (it resizes images itself, to its min_size/max_size).")


def output_option(help_text: str):
    return click.option("-o", "--output", "output", type=click.Path(dir_okay=True), metavar="PATH", help=help_text,
                        callback=_nonempty_path)


def _nonempty_path(ctx, param, value: Optional[str]) -> Optional[str]:
    if value is not None and not value.strip():
        raise click.BadParameter("the path is empty")
    return value


def tolerance_option(name: str, default: float, help_text: str):
    """--rtol / --atol: a finite number >= 0 (NaN would fail every comparison, inf pass any)."""
    return click.option(f"--{name}", type=float, default=default, show_default=True, callback=_check_tolerance,
                        metavar="X", help=help_text)


def _check_tolerance(ctx, param, value: float) -> float:
    import math

    if not math.isfinite(value) or value < 0:
        raise click.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


def report_format_option():
    return click.option("--format", "fmt", type=click.Choice(REPORT_FORMATS), default="table", show_default=True,
                        help="Output format.")


def _parse_input_size(ctx, param, value) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    try:
        size = tuple(int(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        size = ()
    if len(size) == 1:
        size = (3, size[0], size[0])
    if len(size) != 3 or not all(s > 0 for s in size):
        raise click.BadParameter(f"expected C,H,W as three positive integers (e.g. 3,224,224) or one size N for "
                                 f"3,N,N; got '{value}'")
    return size


def library_check(check, keyword: str):
    """A click callback that runs the library's own check of a value (`options.check_map_k`): the library's
    message names the keyword ("map_k must be ..."), click's names the flag ("Invalid value for '--map-k':
    must be ...")."""
    def callback(ctx, param, value):
        if value is None:
            return value
        from reparam_zoo.errors import ReparamError

        try:
            check(value)
        except ReparamError as e:
            raise click.BadParameter(without_keyword(str(e), keyword)) from None
        return value

    return callback


def without_keyword(message: str, keyword: str) -> str:
    """A library message about `keyword` ("map_k must be odd") as click's text after the flag ("must be odd")."""
    return message[len(keyword) + 1:] if message.startswith(keyword + " ") else message


check_map_k = library_check(options.check_map_k, "map_k")


# -- models and files ---------------------------------------------------------------------------------------

def resolve(spec: str, *, arch=None, checkpoint=None, num_classes=None, pretrained=False, trust_pickle=False,
            quiet: bool = False, weights_matter: bool = False):
    """The model a MODEL argument names, announced on stderr (stdout stays the command's output).
    `weights_matter`: warn when an architecture name comes without weights (a random-init model)."""
    from reparam_zoo.resolve import resolve_model

    resolved = resolve_model(spec, arch=arch, checkpoint=checkpoint, num_classes=num_classes,
                             pretrained=pretrained, trust_pickle=trust_pickle)  # conflicts: usage errors (root group)
    if not quiet:
        echo(f"model: {resolved.description}", err=True)
        for note in resolved.notes:
            echo(f"  - {note}", err=True)
    if weights_matter and resolved.kind == "architecture" and checkpoint is None and not pretrained:
        echo(f"warning: {spec} has random weights: pass --checkpoint FILE (or --pretrained) for trained ones",
             err=True)
    return resolved


def wrote(path: str, existed: bool) -> str:
    """The line saying a file was written, and that it replaced one when it did."""
    return f"wrote {path}" + (" (replaced the existing file)" if existed else "")


def input_paths(*specs: Optional[str]) -> List[str]:
    return [s for s in specs if s and os.path.isfile(s)]


def check_output(path: str, inputs: Sequence[str], option: str = "-o/--output") -> str:
    """A usage error, before any work, when the output cannot be written or would overwrite an input."""
    from reparam_zoo.errors import ReparamError

    try:
        leaf("reparam_zoo.fileio").check_output_path(path, inputs)
    except ReparamError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    return path




def settle_model_output(output: str, *, explicit: bool, has_architecture: bool, pickle_default: str,
                        inputs: Sequence[str]) -> str:
    """The model file to write, once loading has told whether the model has an architecture: a model
    without one (a trusted pickle) and no explicit -o goes to `pickle_default`; the name is checked."""
    if not has_architecture and not explicit:
        output = pickle_default
        check_output(output, inputs)
    check_model_file_name(output, has_architecture)
    return output


def check_model_file_name(path: str, has_architecture: bool, option: str = "-o/--output") -> None:
    """The library's naming rule (`model_file_name_problem`) as a usage error, checked before any work."""
    problem = leaf("reparam_zoo.fileio").model_file_name_problem(path, has_architecture)
    if problem:
        raise click.BadParameter(f"'{path}': {problem}", param_hint=option)


def default_output(spec: str, suffix: str, strip: Sequence[str] = ()) -> str:
    """`<stem><suffix>` next to an input file, or in the current folder for an architecture name."""
    if os.path.isfile(spec):
        folder, name = os.path.split(spec)
        stem = os.path.splitext(name)[0]
    else:
        folder, stem = "", options.split_torchvision_name(spec) or spec
    for tail in strip:
        if stem.endswith(tail) and len(stem) > len(tail):
            stem = stem[: -len(tail)]
    return os.path.join(folder, stem + suffix)


def known_input_size(model, input_size: Optional[Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
    from reparam_zoo.model_info import cfg_input_size

    return tuple(input_size) if input_size is not None else cfg_input_size(model)


@contextlib.contextmanager
def steps(desc: str, total: int):
    """A step counter on stderr for the slow commands (hidden when stderr is not a terminal):
    `with steps("fuse", 3) as step: step("loading"); ...`. Print through `echo` meanwhile, which lifts
    the counter off the terminal line first."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False,
               bar_format="{desc}: step {n_fmt}/{total_fmt}{postfix}")

    def step(what: str) -> None:
        bar.update(1)  # counts the step now starting: 1/3 while the first runs
        bar.set_postfix_str(what)

    try:
        yield step
    finally:
        bar.close()


def echo(message: str = "", err: bool = False) -> None:
    """`click.echo` that first clears any progress bar from the terminal line (and redraws it after)."""
    from tqdm import tqdm

    try:
        with tqdm.external_write_mode(file=sys.stderr):
            click.echo(message, err=err)
    except OSError as e:  # e.g. `reparam report ... > file` on a full disk
        from reparam_zoo.errors import OutputError

        stream = "standard error" if err else "standard output"
        raise OutputError(f"cannot write to {stream}: {e.strerror or e}") from None


def echo_lines(text: str) -> None:
    echo(text.rstrip("\n"))

