"""The `reparam` command line: click commands over the reparam_zoo library, one module per command."""
from __future__ import annotations

import click

from .lazy import leaf

from .ablate import ablate_command
from .common import DEBUG_ENV, ReparamGroup
from .convert import convert_command
from .demo import demo_command
from .fuse import fuse_command
from .report import compare_command, report_command
from .train import train_command
from .zoo import zoo_group


@click.group(cls=ReparamGroup, context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
@click.version_option(leaf("reparam_zoo.version").__version__, "--version", prog_name="reparam", message="%(prog)s %(version)s")
@click.option("--debug", is_flag=True, envvar=DEBUG_ENV,
              help=f"Show full tracebacks instead of one-line errors (also {DEBUG_ENV}=1).")
def main(debug):
    """reparam: structural re-parameterization of vision models.

    \b
    Typical flow:
      reparam convert resnet18 --checkpoint resnet18.pth --refconv -o r18.refconv.safetensors
      reparam train r18.refconv.safetensors --data DIR -o runs/r18 --fuse
      reparam fuse runs/r18/best.safetensors -o r18.fused.safetensors   (what --fuse also writes)
      reparam compare runs/r18/best.safetensors r18.fused.safetensors

    Errors are one line on stderr: exit status 1 for failures, 2 for usage errors.
    """


main.add_command(convert_command)
main.add_command(fuse_command)
main.add_command(report_command)
main.add_command(compare_command)
main.add_command(zoo_group)
main.add_command(demo_command)
main.add_command(train_command)
main.add_command(ablate_command)


if __name__ == "__main__":
    main()
