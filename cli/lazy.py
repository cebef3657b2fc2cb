"""Loading the library's torch-free leaf modules without importing the library.

`import reparam_zoo` must register the zoo with timm (the README promises `import reparam_zoo;
timm.create_model("rexnetv1_100")`), so the package's __init__ imports torch and timm: seconds. `reparam
--help`, `reparam CMD --help`, `--version` and every usage error must not wait for that, yet the choices and
defaults they show must come from the library (one source). The library keeps those in leaf modules that
import only the standard library and each other (`reparam_zoo.errors`, `.options`, `.version`, `.fileio`,
`.train.config`, `.train.run_dir`, `.train.tasks`, `.ablate_config`); `leaf()` executes one of them from its file, without running the
__init__ of the packages above it, and registers it in `sys.modules` under its real dotted name. When a
command's body later imports the real package, Python finds the module there and reuses the same object:
one `TrainConfig` class, one `SettingError`.

A leaf's own relative imports (`from ..errors import ...`) resolve through `sys.modules` too, so `LEAVES`
lists each leaf after the leaves it imports, and `leaf(name)` loads those first. Why not a stdlib-only
top-level module of the distribution instead? The constants belong to the library's modules (the heavy
modules import them from the leaves), and a second top-level package would split one library in two for
the sake of its command line. The test that keeps this honest: tests/test_cli_startup.py.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

__all__ = ["LEAVES", "leaf"]

# every torch-free leaf, each after the leaves it imports at module level
LEAVES = ("reparam_zoo.errors", "reparam_zoo.version", "reparam_zoo.options", "reparam_zoo.fileio", "reparam_zoo.train.config",
          "reparam_zoo.train.run_dir", "reparam_zoo.train.tasks", "reparam_zoo.ablate_config")
_PACKAGES = {"reparam_zoo.train.tasks"}  # leaves that are packages (their submodules import torch)
_ROOT = os.path.dirname(os.path.abspath(importlib.util.find_spec("reparam_zoo").origin)) \
    if "reparam_zoo" not in sys.modules else os.path.dirname(os.path.abspath(sys.modules["reparam_zoo"].__file__))


def leaf(name: str) -> ModuleType:
    """The module `name` (one of LEAVES), from sys.modules when anything imported it already, else executed
    from its file without importing the packages above it."""
    if name not in LEAVES:
        raise ValueError(f"{name} is not a torch-free leaf of reparam_zoo (cli/lazy.py LEAVES)")
    if name in sys.modules:
        return sys.modules[name]
    for dependency in LEAVES[:LEAVES.index(name)]:
        if dependency not in sys.modules:
            _load(dependency)
    return _load(name)


def _load(name: str) -> ModuleType:
    parts = name.split(".")[1:]
    if name in _PACKAGES:
        path = os.path.join(_ROOT, *parts, "__init__.py")
        spec = importlib.util.spec_from_file_location(name, path,
                                                      submodule_search_locations=[os.path.dirname(path)])
    else:
        spec = importlib.util.spec_from_file_location(name, os.path.join(_ROOT, *parts) + ".py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
