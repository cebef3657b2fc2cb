"""The `reparam` command line: a thin click layer over `reparam_zoo` (installed as `reparam_cli`).

One module per command (convert, fuse, report/compare, train, ablate, zoo, demo) parses options, calls the
library and prints; common.py holds what they share, including the root group's one mapping from library
errors to exit codes (1; usage errors 2, with the library's keywords respelt as flags). Every command module
imports only click and the library's torch-free leaves at module level (lazy.py): the choices and defaults
its --help shows come from there, and the library proper (torch, timm) is imported inside the command body,
after the command line is known to be usable. So --help, --version and usage errors answer in a fraction of
a second (tests/test_cli_startup.py, benchmarks/cli_startup.py).
"""
import sys


def run() -> None:
    """The console script. A Ctrl-C while the commands load ends with the same one line as one during a
    command (the root group handles those), not a traceback."""
    try:
        from .main import main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(130) from None
    main()
