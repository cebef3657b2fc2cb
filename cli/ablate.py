"""`reparam ablate`: refocusing against fine-tuning (and more arms) on the user's data (reparam_zoo.ablate)."""
from __future__ import annotations

import click

from .lazy import leaf

_config = leaf("reparam_zoo.train.config")  # torch-free: the defaults and choices below are the library's
OPTIMIZERS, SGD_MOMENTUM, TrainConfig = _config.OPTIMIZERS, _config.SGD_MOMENTUM, _config.TrainConfig

from .common import DEFAULT_MAP_K, flag_name, TRAIN_SCOPES, check_map_k, input_size_option, model_options, output_option

DEFAULTS = TrainConfig(model="", data_dir="")  # the training defaults are train's
_ablation = leaf("reparam_zoo.ablate_config")
ARM_NAMES = ", ".join(_ablation.ARMS)


@click.command("ablate")
@click.argument("model", metavar="MODEL", required=False)
@click.option("--data", "data_dir", type=click.Path(), metavar="DIR",
              help="Image folders DIR/train/<class>/* and DIR/val/<class>/*.")
@output_option("Ablation folder, new or empty (required).")
@click.option("--arms", default=",".join(_ablation.DEFAULT_ARMS), show_default=True, metavar="LIST",
              help=f"Comma-separated arms ({ARM_NAMES}); finetune (the baseline) and one more.")
@click.option("--lr", "lr_text", metavar="RATES",
              help=f"One rate for every arm but continue, or ARM=RATE pairs (refocus=5e-4,finetune=1e-3); continue "
                   "defaults to the pretraining rate the model file records.  [default: {DEFAULTS.lr}, or the --lr-grid "
                   "choice]")
@click.option("--lr-grid", "lr_grid_text", metavar="RATES",
              help="Rates tried per arm without a given --lr (continue excepted) on the validation split; the best "
                   "one trains the arm.")
@click.option("--grid-epochs", type=click.IntRange(min=1), metavar="N",
              help="Epochs of each --lr-grid trial.  [default: a third of --epochs, at least 1]")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Runs per arm (run seeds --seed, --seed+1, ...); the table pairs the arms seed by seed.")
@click.option("--epochs", type=click.IntRange(min=1), default=DEFAULTS.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULTS.batch_size, show_default=True,
              help="Per process.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default=DEFAULTS.optimizer, show_default=True)
@click.option("--momentum", type=click.FloatRange(min=0, max=1),
              help=f"SGD momentum (--optimizer sgd only).  [default: {SGD_MOMENTUM}]")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=DEFAULTS.weight_decay, show_default=True)
@click.option("--warmup-epochs", type=click.IntRange(min=0),
              help="Epochs of linear warmup, then cosine decay (every arm the same).  [default: 1, or 0 with "
                   "--epochs 1]")
@input_size_option("Training crop size (default: the model's timm config; needed when the model has none).")
@click.option("--num-classes", type=click.IntRange(min=1), metavar="N",
              help="Replace the classifier head for N classes in every arm (it trains too).")
@click.option("--train-scope", type=click.Choice(TRAIN_SCOPES), default="transforms", show_default=True,
              help="What trains in the RefConv arms (refocus, random-base).")
@click.option("--map-k", type=int, callback=check_map_k,
              help=f"Transform kernel size of the RefConv arms.  [default: {DEFAULT_MAP_K}]")
@click.option("--amp", is_flag=True, help="Mixed precision (bfloat16 on CPU, float16 with loss scaling on GPU).")
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--workers", type=click.IntRange(min=0), default=DEFAULTS.workers, show_default=True,
              help="Data loading processes per training process.")
@click.option("--seed", type=int, default=DEFAULTS.seed, show_default=True, help="The first run seed.")
@click.option("--resume", metavar="OUTDIR", type=click.Path(),
              help="Continue the ablation in OUTDIR with its saved settings: finished runs are read back, an "
                   "interrupted run resumes exactly (only --workers may change).")
@model_options(num_classes=False)
@click.option("--device", metavar="DEV", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK if available, else cpu).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or log lines (the run folders have them).")
def ablate_command(model, data_dir, output, arms, lr_text, lr_grid_text, resume, device, quiet, input_size,
                   **settings):
    """Refocus or fine-tune? Train arms of MODEL on DIR with the same data, order, augmentation, epochs and
    schedule, repeated over seeds, and compare them seed by seed.

    \b
    Arms: refocus   RefConv, only --train-scope trains (over the pretrained, frozen base)
          finetune  the plain model, every weight (the baseline)
          continue  the plain model at the pretraining learning rate
          random-base  RefConv over a re-initialised frozen base (does the pretrained base matter?)

    Writes OUTDIR/ablation.md (the table: mean ± std over seeds, the paired difference to finetune and the
    seeds each arm wins, training time, peak memory, deployed cost), ablation.json, ablation.png (the
    validation metric per epoch per arm) and OUTDIR/<arm>/seed<k>/ (each run, with its verified deploy
    model). Ctrl-C stops with a checkpoint; continue with --resume OUTDIR. Runs under torchrun as `reparam
    train` does.
    """
    # the rules about settings first, torch-free (usage errors come back at once); then the library
    parse_arms, parse_lr_grid, parse_lrs, read_ablation_config = (
        _ablation.parse_arms, _ablation.parse_lr_grid, _ablation.parse_lrs, _ablation.read_ablation_config)
    check_momentum, check_warmup = _config.check_momentum, _config.check_warmup
    ctx = click.get_current_context()
    arm_list = lrs = grid = None
    # a SettingError raised here is a usage error of the root group, which names the flags (common.flag_name)
    if resume:
        given = [name for name in ("model", "data_dir", "output", "lr_text", "lr_grid_text", "input_size",
                                   *settings) if name != "workers" and _given(ctx, name)]
        if given:
            raise click.UsageError(f"--resume OUTDIR continues with the ablation's saved settings; leave out "
                                   f"{flag_name(given[0])} (only --workers may change)")
        read_ablation_config(resume)
    else:
        if not model:
            raise click.UsageError("missing MODEL (or --resume OUTDIR)")
        if not data_dir:
            raise click.UsageError("missing --data DIR")
        if not output:
            raise click.UsageError("missing -o/--output OUTDIR")
        arm_list = parse_arms(arms)
        lrs = parse_lrs(lr_text, arm_list) if lr_text else None
        grid = parse_lr_grid(lr_grid_text) if lr_grid_text else None
        if settings["grid_epochs"] is not None and grid is None:
            raise click.UsageError("--grid-epochs applies with --lr-grid")
        check_momentum(settings["optimizer"], settings["momentum"])
        if settings["warmup_epochs"] is not None:
            check_warmup(settings["warmup_epochs"], settings["epochs"])
        if input_size is not None:
            if input_size[0] != 3 or input_size[1] != input_size[2]:
                raise click.BadParameter("training takes square RGB crops: give N or 3,N,N",
                                         param_hint="--input-size")
            input_size = input_size[1]

    from reparam_zoo.ablate import ablate, resume_ablation
    from reparam_zoo.processes import keep_freed_memory

    keep_freed_memory()

    if resume:
        result = resume_ablation(resume, workers=settings["workers"] if _given(ctx, "workers") else None,
                                 device=device, verbose=not quiet)
    else:
        result = ablate(model, data_dir, output, arms=arm_list, lr=lrs, lr_grid=grid, input_size=input_size,
                        device=device, verbose=not quiet, **settings)
    if result.interrupted:
        if quiet:
            click.echo(f"interrupted; continue with: reparam ablate --resume {result.output_dir}", err=True)
        raise click.exceptions.Exit(130)
    if quiet and result.files:
        for path in result.files.values():
            click.echo(f"wrote {path}")


def _given(ctx: click.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source != click.core.ParameterSource.DEFAULT
