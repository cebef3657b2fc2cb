"""The `reparam` command line: a thin click layer over `reparam_zoo` (installed as `reparam_cli`)."""
import sys


def run() -> None:
    """The console script. Importing the commands imports torch and timm (seconds): a Ctrl-C meanwhile
    ends with the same one line as one during a command, not a traceback."""
    try:
        from .main import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    main()
