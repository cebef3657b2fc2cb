"""A model file's metadata, parsed and checked: the file is data, never instructions.

Every metadata field that `load` turns into behaviour is checked here before anything is built from it:
the architecture's name and constructor arguments (an allow-list per source, with types and ranges; any
argument that loads, fetches, trusts or names a file is refused), the RefConv settings, the fuse structure
and the `extra` fields the package reads back (`train`, `classes`). Each refusal is one line naming the
field. Trusted Python code can widen the allow-list for its own registered models with
`register_architecture_kwargs`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Optional

from .deploy import STAGES, FuseReport
from .errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "ModelFileInfo", "parse_metadata", "fuse_to_json", "register_architecture_kwargs", "check_architecture", "check_refconv", "check_fuse", "check_extra",
           "loads_metadata", "MAX_CLASSES", "MAX_CHANNELS", "MAX_NAMES", "MAX_DEPTH"]

FORMAT = "reparam-zoo"
FORMAT_VERSION = 1

MAX_CLASSES = 1_000_000  # a head beyond this is no classifier anyone trains; bounds what a file can ask to build
MAX_CHANNELS = 65_536
MAX_IMAGE_SIZE = 16_384
MAX_NAMES = 100_000  # entries of a list of layer names (or class names)
MAX_NAME_LENGTH = 1_000
MAX_DEPTH = 32  # nesting of the caller's `extra` JSON

# constructor arguments that would make the model load, fetch or trust something, or name a path: named as such
_LOADING_KEYS = {
    "checkpoint", "checkpoint_path", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict",
    "trust_pickle", "file", "url", "cache_dir", "weights", "weights_path", "hf_hub_id", "hf_hub_filename",
    "state_dict", "features_only", "model_args", "path", "local_dir", "progress",
}

Check = Callable[[Any], bool]


def _int(lo: int, hi: int) -> Check:
    check = lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi  # noqa: E731
    check.what = f"an integer in [{lo}, {hi}]"
    return check


def _float(lo: float, hi: float, *, hi_open: bool = False) -> Check:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        return lo <= v < hi if hi_open else lo <= v <= hi
    check.what = f"a number in [{lo:g}, {hi:g}{')' if hi_open else ']'}"
    return check


def _bool() -> Check:
    check = lambda v: isinstance(v, bool)  # noqa: E731
    check.what = "true or false"
    return check


def _choice(*options: str) -> Check:
    check = lambda v: isinstance(v, str) and v in options  # noqa: E731
    check.what = "one of " + ", ".join(repr(o) for o in options)
    return check


def _int_list(lo: int, hi: int, max_len: int = 16) -> Check:
    item = _int(lo, hi)
    check = lambda v: isinstance(v, list) and 0 < len(v) <= max_len and all(item(i) for i in v)  # noqa: E731
    check.what = f"a list of at most {max_len} integers in [{lo}, {hi}]"
    return check


def _size() -> Check:
    one, two = _int(1, MAX_IMAGE_SIZE), _int_list(1, MAX_IMAGE_SIZE, max_len=2)
    check = lambda v: one(v) or (two(v) and len(v) == 2)  # noqa: E731
    check.what = f"an image size (an integer or two in [1, {MAX_IMAGE_SIZE}])"
    return check


_RATE = _float(0.0, 1.0, hi_open=True)
_POOLS = ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax",
          "token", "map", "avg_max")

def _optional(check: Check) -> Check:
    optional = lambda v: v is None or check(v)  # noqa: E731
    optional.what = check.what + " (or null)"
    return optional


_COMMON = {
    "num_classes": _optional(_int(0, MAX_CLASSES)),  # 0: timm's headless feature model; null: its default
    "in_chans": _int(1, MAX_CHANNELS),
    "drop_rate": _RATE,
    "drop_path_rate": _RATE,
    "global_pool": _choice(*_POOLS),
}
_ALLOWED: Dict[str, Dict[str, Check]] = {
    "timm": {
        **_COMMON,
        "proj_drop_rate": _RATE, "attn_drop_rate": _RATE, "pos_drop_rate": _RATE, "patch_drop_rate": _RATE,
        "drop_block_rate": _RATE, "img_size": _size(), "output_stride": _int(8, 32),
        "scriptable": _bool(), "exportable": _bool(), "no_jit": _bool(),
    },
    "zoo": {
        **_COMMON,
        # ReXNetV1
        "width_mult": _float(0.05, 8.0), "depth_mult": _float(0.05, 4.0), "input_ch": _int(1, MAX_CHANNELS),
        "final_ch": _int(1, MAX_CHANNELS), "use_se": _bool(), "se_ratio": _int(1, 1024),
        # RevCol
        "channels": _int_list(1, 8192, max_len=4), "layers": _int_list(0, 64, max_len=4),
        "num_columns": _int(1, 64), "kernel_size": _int(1, 31),
        "save_memory": _bool(), "inter_supv": _bool(), "head_init_scale": _float(0.0, 1000.0),
        "top_to_bottom_fusion": _bool(),
    },
    # the zoo as detector / segmenter backbones (models/dense.py)
    "zoo-dense": {
        "num_classes": _int(1, MAX_CLASSES), "trainable_layers": _int(0, 5),
        "min_size": _int(1, MAX_IMAGE_SIZE), "max_size": _int(1, MAX_IMAGE_SIZE),
    },
    "torchvision": {
        "num_classes": _int(1, MAX_CLASSES), "aux_logits": _bool(), "transform_input": _bool(),
        "init_weights": _bool(), "dropout": _RATE, "attention_dropout": _RATE, "stochastic_depth_prob": _RATE,
        "image_size": _int(1, MAX_IMAGE_SIZE),
        # detectors and segmenters
        "frozen_batchnorm": _bool(), "min_size": _int(1, MAX_IMAGE_SIZE), "max_size": _int(1, MAX_IMAGE_SIZE),
        "aux_loss": _bool(), "num_keypoints": _int(1, 1000), "trainable_backbone_layers": _int(0, 6),
    },
}
# per model name: what trusted code registered for its own models
_REGISTERED: Dict[str, Dict[str, Check]] = {}
_NAME = re.compile(r"^(torchvision:)?[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")


def register_architecture_kwargs(model_name: str, **checks: Check) -> None:
    """Accept more constructor arguments from files for the model `model_name` (e.g. a model your code
    registers with timm): `register_architecture_kwargs("my_net", width=lambda v: isinstance(v, int) and
    0 < v <= 4096)`. Each check gets the file's value and returns whether it is acceptable. Arguments that load
    or fetch (`checkpoint`, `pretrained`, ...) cannot be registered."""
    loading = sorted(set(checks) & _LOADING_KEYS)
    if loading:
        raise ValueError(f"{', '.join(loading)}: arguments that load or fetch are never accepted from a file")
    for key, check in checks.items():
        if not callable(check):
            raise ValueError(f"the check for '{key}' must be callable")
    _REGISTERED.setdefault(model_name, {}).update(checks)


def check_architecture(arch: Any, source: str, *, actual_source: Optional[Callable[[str], str]] = None) -> None:
    """Refuse an architecture entry that is malformed or asks for anything beyond shaping the network."""
    if not isinstance(arch, dict):
        raise _malformed(source, "architecture", "not a JSON object")
    _no_unknown(arch, {"name", "source", "kwargs"}, source, "architecture")
    name, claimed, kwargs = arch.get("name"), arch.get("source", "timm"), arch.get("kwargs", {})
    if not isinstance(name, str) or not _NAME.match(name):
        raise _malformed(source, "architecture name", f"{_short(name)} is not a model name")
    if claimed not in _ALLOWED:
        raise _malformed(source, "architecture source", f"{_short(claimed)}, expected one of {', '.join(_ALLOWED)}")
    if (claimed == "torchvision") != name.startswith("torchvision:"):
        raise _malformed(source, "architecture source", f"'{claimed}' does not go with the name '{name}'")
    if not isinstance(kwargs, dict):
        raise _malformed(source, "architecture kwargs", "not a JSON object")
    allowed = {**_ALLOWED[claimed], **_REGISTERED.get(name.split(".")[0], {})}
    for key, value in kwargs.items():
        if key in _LOADING_KEYS:
            raise CheckpointError(f"{source}: the architecture argument '{key}' would load, fetch or trust something "
                                  "named by the file; refused (a model file is data)")
        check = allowed.get(key)
        if check is None:
            raise CheckpointError(f"{source}: the architecture argument '{key}' is not one reparam accepts from a "
                                  f"file for a {claimed} model; refused (a model file is data)")
        if not check(value):
            what = getattr(check, "what", "an accepted value")
            raise CheckpointError(f"{source}: architecture argument '{key}' = {_short(value)} is not {what}")
    _check_size(name, kwargs, source)


MAX_REVCOL_BLOCKS = 256  # twice the largest variant's (revcol_base: 7 blocks x 16 columns)


def _check_size(name: str, kwargs: Dict[str, Any], source: str) -> None:
    """Bounds that span arguments: a file must not make even the weightless skeleton take minutes to build
    (every block is a module to construct)."""
    from .models.revcol import REVCOL_VARIANTS

    variant = REVCOL_VARIANTS.get(name.split(".")[0])
    if variant is None:
        return
    blocks = sum(kwargs.get("layers", variant["layers"])) * kwargs.get("num_columns", variant["num_columns"])
    if blocks > MAX_REVCOL_BLOCKS:
        raise CheckpointError(f"{source}: architecture arguments ask for {blocks} RevCol blocks (layers x columns), "
                              f"more than {MAX_REVCOL_BLOCKS}; refused")


def check_refconv(refconv: Any, source: str) -> None:
    from .options import INITS, TRAIN_SCOPES

    if not isinstance(refconv, dict):
        raise _malformed(source, "refconv", "not a JSON object")
    _no_unknown(refconv, {"map_k", "init", "train_scope", "converted"}, source, "refconv")
    missing = {"map_k", "init", "train_scope", "converted"} - set(refconv)
    if missing:
        raise _malformed(source, "refconv", f"missing {', '.join(sorted(missing))}")
    map_k = refconv["map_k"]
    if not _int(1, 31)(map_k) or map_k % 2 == 0:
        raise _malformed(source, "refconv map_k", f"{_short(map_k)} is not an odd integer in [1, 31]")
    for key, options in (("init", INITS), ("train_scope", TRAIN_SCOPES)):
        if refconv[key] not in options:
            raise _malformed(source, f"refconv {key}", f"{_short(refconv[key])}, expected one of {', '.join(options)}")
    _names(refconv["converted"], source, "refconv converted")


def check_fuse(data: Any, source: str) -> None:
    if not isinstance(data, dict):
        raise _malformed(source, "fuse", "not a JSON object")
    fields = {"folded", "fused", "reparameterized", "left_alone", "verified", "max_abs_error", "max_rel_error", "rtol",
              "atol", "input_shapes", "fold_only", "modules_verified", "compared_outputs"}
    _no_unknown(data, fields, source, "fuse")
    for key in ("folded", "reparameterized"):
        _names(data.get(key, []), source, f"fuse {key}")
    for key in ("fused", "left_alone"):
        pairs = data.get(key, [])
        _names(pairs, source, f"fuse {key}", pairs=True)
    _names(data.get("compared_outputs", []), source, "fuse compared_outputs")
    if "modules_verified" in data and not _int(0, 10**7)(data["modules_verified"]):
        raise _malformed(source, "fuse modules_verified", f"{_short(data['modules_verified'])} is not a count")
    for key in ("verified", "fold_only"):
        if key in data and not isinstance(data[key], bool):
            raise _malformed(source, f"fuse {key}", f"{_short(data[key])} is not true or false")
    for key in ("max_abs_error", "max_rel_error", "rtol", "atol"):
        value = data.get(key)
        if value is None and key.startswith("max_"):
            continue
        if key in data and not _float(0.0, math.inf)(value):
            raise _malformed(source, f"fuse {key}", f"{_short(value)} is not a finite non-negative number")
    shapes = data.get("input_shapes", [])
    shape = _int_list(1, MAX_IMAGE_SIZE, max_len=8)
    if not isinstance(shapes, list) or len(shapes) > 64 or not all(shape(s) for s in shapes):
        raise _malformed(source, "fuse input_shapes", "not a list of shapes of positive integers")


def check_extra(extra: Any, source: str) -> None:
    """The caller's `extra` object is kept as data; the fields the package reads back are checked."""
    if not isinstance(extra, dict):
        raise _malformed(source, "extra", "not a JSON object")
    if _depth(extra) > MAX_DEPTH:
        raise _malformed(source, "extra", f"nested deeper than {MAX_DEPTH} levels")
    if "classes" in extra:
        _names(extra["classes"], source, "extra classes")
    if "train" in extra:
        _check_train_tag(extra["train"], source)
    if "label_to_category_id" in extra:
        ids = extra["label_to_category_id"]
        category = _optional(_int(0, 2**53))
        if not isinstance(ids, list) or len(ids) > MAX_CLASSES + 1 or not all(category(i) for i in ids):
            raise _malformed(source, "extra label_to_category_id", "not a list of COCO category ids (integers >= 0 "
                             "or null)")
        if "classes" in extra and isinstance(extra["classes"], list) and len(ids) != len(extra["classes"]):
            raise _malformed(source, "extra label_to_category_id",
                             f"{len(ids)} entries for {len(extra['classes'])} classes")


# the training tag (`extra.train`) of a run's model files: its position and, on a best/deploy model, the metrics
_TRAIN_COUNTERS = ("epoch", "step", "global_step")
MAX_TRAIN_FIELDS = 256


def _check_train_tag(tag: Any, source: str) -> None:
    """Counters are integers >= 0 (a resume compares `global_step`), metrics finite numbers or null, a per-class
    metric an object of class name -> number or null; nothing else."""
    counter, number = _int(0, 2**53), _optional(_float(-math.inf, math.inf))
    if not isinstance(tag, dict) or len(tag) > MAX_TRAIN_FIELDS:
        raise _malformed(source, "extra train", f"not an object of at most {MAX_TRAIN_FIELDS} fields")
    for key, value in tag.items():
        name = f"extra train {key[:60]!r}" if isinstance(key, str) else "extra train"
        if not isinstance(key, str) or len(key) > MAX_NAME_LENGTH:
            raise _malformed(source, name, "field name too long")
        if key in _TRAIN_COUNTERS or key.endswith("_images"):
            if not counter(value):
                raise _malformed(source, name, f"{_short(value)} is not a non-negative integer count")
        elif isinstance(value, dict):
            if len(value) > MAX_NAMES or not all(isinstance(k, str) and len(k) <= MAX_NAME_LENGTH and number(v)
                                                 for k, v in value.items()):
                raise _malformed(source, name, "not an object of class name -> finite number or null")
        elif not number(value):
            raise _malformed(source, name, f"{_short(value)} is not a finite number or null")


def loads_metadata(text: str, key: str, source: str) -> Any:
    """One JSON metadata field, with a precise error for nesting too deep to parse."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise _malformed(source, key, "JSON nested too deeply") from None
    except ValueError:
        raise _malformed(source, key, "not valid JSON") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _names(value: Any, source: str, what: str, pairs: bool = False) -> None:
    ok = isinstance(value, list) and len(value) <= MAX_NAMES
    if ok:
        for item in value:
            items = item if pairs else [item]
            if pairs and not (isinstance(item, list) and len(item) == 2):
                ok = False
                break
            if not all(isinstance(s, str) and len(s) <= MAX_NAME_LENGTH for s in items):
                ok = False
                break
    if not ok:
        expected = "a list of [name, name] pairs" if pairs else "a list of names"
        raise _malformed(source, what, f"not {expected}")


def _depth(value: Any) -> int:
    """Nesting depth without recursion (a hostile object is as deep as the JSON parser allowed)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            break
        children: Iterable = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def _no_unknown(obj: Dict[str, Any], known: set, source: str, what: str) -> None:
    unknown = sorted(str(k) for k in obj if k not in known)
    if unknown:
        raise CheckpointError(f"{source}: unknown {what} metadata field {unknown[0][:60]!r}; refused")


def _malformed(source: str, what: str, why: str) -> CheckpointError:
    return CheckpointError(f"{source}: malformed reparam metadata ({what}: {why})")


def _short(value: Any, n: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= n else text[: n - 3] + "..."


# -- the parsed metadata ---------------------------------------------------------------------------------------

@dataclass
class ModelFileInfo:
    """The parsed metadata of a reparam model file."""

    stage: str
    architecture: Dict[str, Any]
    format_version: int
    reparam_version: str
    torch_version: str = ""
    refconv: Optional[Dict[str, Any]] = None
    fuse: Optional[FuseReport] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> Optional[int]:
        return self.architecture.get("kwargs", {}).get("num_classes")

    def describe(self) -> str:
        arch = self.architecture
        text = f"{arch['name']} ({arch.get('source', 'timm')}), stage {self.stage}"
        if self.refconv:
            text += (f", {len(self.refconv['converted'])} RefConv layers (map_k={self.refconv['map_k']}, "
                     f"train_scope={self.refconv['train_scope']})")
        if self.fuse is not None and self.stage == "fused":
            text += f", {len(self.fuse.fused)} fused conv+norm pairs"
        return text


def parse_metadata(meta: Dict[str, str], source: str = "<metadata>") -> Optional[ModelFileInfo]:
    """The `ModelFileInfo` in safetensors metadata, or None when it is not a reparam file."""
    if meta.get("format") != FORMAT:
        return None
    _no_unknown_fields(meta, source)
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise CheckpointError(f"{source}: malformed reparam metadata (format_version)") from None
    if version < 1:
        raise CheckpointError(f"{source}: malformed reparam metadata (format_version {version}; versions start at 1)")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: written in reparam file format {version}, this reparam-zoo reads up to {FORMAT_VERSION}; "
            "upgrade reparam-zoo"
        )
    stage = meta.get("stage")
    if stage not in STAGES:
        raise CheckpointError(f"{source}: malformed reparam metadata (stage {str(stage)[:40]!r})")
    arch = _loads(meta, "architecture", source)
    check_architecture(arch, source)
    refconv = _loads(meta, "refconv", source) if "refconv" in meta else None
    if refconv is not None:
        check_refconv(refconv, source)
    if (stage == "refconv") != (refconv is not None):
        raise CheckpointError(f"{source}: malformed reparam metadata (stage {stage} vs refconv settings)")
    fuse = None
    if "fuse" in meta:
        fuse_json = _loads(meta, "fuse", source)
        check_fuse(fuse_json, source)
        fuse = _fuse_from_json(fuse_json, source)
    if stage == "fused" and fuse is None:
        raise CheckpointError(f"{source}: malformed reparam metadata (fused stage without fuse structure)")
    extra = _loads(meta, "extra", source) if "extra" in meta else {}
    check_extra(extra, source)
    return ModelFileInfo(
        stage=stage, architecture=arch, format_version=version, reparam_version=meta.get("reparam_version", ""),
        torch_version=meta.get("torch_version", ""), refconv=refconv, fuse=fuse, extra=extra,
    )


_FIELDS = ("format", "format_version", "reparam_version", "torch_version", "stage", "architecture", "refconv", "fuse",
           "extra")


def _no_unknown_fields(meta: Dict[str, str], source: str) -> None:
    unknown = [k for k in meta if k not in _FIELDS]
    if unknown:
        raise CheckpointError(f"{source}: unknown reparam metadata field {unknown[0][:60]!r}; refused (a model file "
                              "is data: fields this version does not know are not guessed at)")
    for key in ("reparam_version", "torch_version"):
        if len(meta.get(key, "")) > 100:
            raise CheckpointError(f"{source}: malformed reparam metadata ({key} longer than 100 characters)")


def fuse_to_json(report: FuseReport) -> Dict[str, Any]:
    return {
        "folded": list(report.folded),
        "fused": [list(p) for p in report.fused],
        "reparameterized": list(report.reparameterized),
        "left_alone": [list(p) for p in report.left_alone],
        "verified": bool(report.verified),
        "max_abs_error": report.max_abs_error,
        "max_rel_error": report.max_rel_error,
        "rtol": report.rtol,
        "atol": report.atol,
        "input_shapes": [list(s) for s in report.input_shapes],
        "fold_only": bool(report.fold_only),
        "modules_verified": int(report.modules_verified),
        "compared_outputs": list(report.compared_outputs),
    }


def _fuse_from_json(data: Any, source: str) -> FuseReport:
    try:
        return FuseReport(
            folded=[str(n) for n in data.get("folded", [])],
            fused=[(str(c), str(b)) for c, b in data.get("fused", [])],
            reparameterized=[str(n) for n in data.get("reparameterized", [])],
            left_alone=[(str(n), str(why)) for n, why in data.get("left_alone", [])],
            verified=bool(data.get("verified", False)),
            max_abs_error=data.get("max_abs_error"),
            max_rel_error=data.get("max_rel_error"),
            rtol=float(data.get("rtol", 1e-4)),
            atol=float(data.get("atol", 0.0)),
            input_shapes=[list(s) for s in data.get("input_shapes", [])],
            fold_only=bool(data.get("fold_only", False)),
            modules_verified=int(data.get("modules_verified", 0)),
            compared_outputs=[str(n) for n in data.get("compared_outputs", [])],
        )
    except (AttributeError, TypeError, ValueError):
        raise CheckpointError(f"{source}: malformed reparam metadata (fuse)") from None


def _loads(meta: Dict[str, str], key: str, source: str) -> Any:
    if key not in meta:
        raise CheckpointError(f"{source}: malformed reparam metadata ({key} missing)")
    return loads_metadata(meta[key], key, source)
