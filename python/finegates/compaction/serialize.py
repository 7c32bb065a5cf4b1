"""``save_compact`` / ``load_compact``: a compacted model as a directory anyone can load.

Layout of the directory::

    model.safetensors          the compact state dict (index lists of GatheredLinear included)
    finegates_compact.json     format, model class, dtype, every resized Linear / GatheredLinear
                               with its shape, attention attributes changed by compact(), the files
                               it wrote, and the sha256 of model.safetensors, config.json and of
                               the manifest itself
    config.json, generation_config.json, tokenizer files   (Hugging Face models, when present)

``load_compact`` builds the stock transformers class from ``config.json``, swaps in Linears of the
recorded shapes, sets the recorded attributes and loads the weights strictly, so no training code
runs. Writes go to a temporary sibling directory that is renamed into place at the end: an
interrupted save leaves the previous model (or nothing), never a half-written directory; files in
the directory that save_compact did not write are kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from .attention import COMPACT_ATTRS
from .modules import GatheredLinear
from .folding import COMPACTED
from ..layers import GatedLinear, set_submodule
from ..files import follow_umask
from ..pooling import CONFIG_KEY, use_mean_pooling
from ..sparsify import RECORD_ATTR, check_sparsify_record, sparsify_record

__all__ = ["save_compact", "load_compact", "MANIFEST_NAME", "WEIGHTS_NAME"]

FORMAT = "finegates-compact"
FORMAT_VERSION = 1
MANIFEST_NAME = "finegates_compact.json"
WEIGHTS_NAME = "model.safetensors"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)

PathLike = Union[str, os.PathLike]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _layer_specs(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    specs = {}
    for name, m in model.named_modules():
        if isinstance(m, GatheredLinear):
            specs[name] = dict(
                kind="gathered",
                in_features=m.in_features,
                out_features=m.out_features,
                active_out=int(m.weight.shape[0]),
                active_in=int(m.weight.shape[1]),
                bias=m.bias is not None,
                scatter_rows=m.row_idx is not None,
                gather_cols=m.col_idx is not None,
            )
        elif isinstance(m, nn.Linear) and getattr(m, COMPACTED, False):
            specs[name] = dict(kind="linear", in_features=m.in_features, out_features=m.out_features, bias=m.bias is not None)
    return specs


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "save_pretrained") and hasattr(model, "can_generate")


def _copy_tokenizer_files(src: str, dst: Path) -> None:
    if not src or not os.path.isdir(src):
        return
    for fname in _TOKENIZER_FILES:
        f = os.path.join(src, fname)
        if os.path.isfile(f):
            shutil.copy2(f, dst / fname)


def _ours(manifest_path: Path) -> set:
    """Names of the files an earlier save_compact wrote into a directory (its manifest's list)."""
    try:
        listed = json.loads(manifest_path.read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if isinstance(listed, list):
        return set(listed)
    return {MANIFEST_NAME, WEIGHTS_NAME, "config.json", "generation_config.json", *_TOKENIZER_FILES}


def _replace_dir(tmp: Path, path: Path) -> None:
    """Moves the finished ``tmp`` to ``path``; an existing ``path`` must be a finegates compact
    model directory or empty (never silently delete a user's unrelated files). Files of an existing
    compact directory that save_compact did not write are hard-linked into ``tmp`` first, so the swap
    keeps them and stays one rename."""
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"save_compact: path {str(path)!r} exists and is not a directory")
        if any(path.iterdir()) and not (path / MANIFEST_NAME).is_file():
            raise FileExistsError(
                f"save_compact: directory {str(path)!r} is not empty and holds no {MANIFEST_NAME}; "
                "choose a new path or remove it"
            )
        ours = _ours(path / MANIFEST_NAME)
        for entry in path.iterdir():
            if entry.name in ours or (tmp / entry.name).exists():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=os.link)
            else:
                os.link(entry, tmp / entry.name, follow_symlinks=False)
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _link_target(path: Path) -> Path:
    """Where a save to ``path`` goes: through a symlink, into its target, so the link stays a link
    to the new model (replacing the link itself would leave its target holding the old one)."""
    return path.resolve() if path.is_symlink() else path


def _manifest_digest(manifest: Dict[str, Any]) -> str:
    """sha256 of the manifest itself (every field but this digest): head counts and layer shapes
    shape the model as much as the weights do."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save_compact(model: nn.Module, path: PathLike, *, tokenizer=None) -> Path:
    """Writes a :func:`finegates.compact` model to directory ``path`` (atomically) and returns it.

    Hugging Face models also get ``config.json`` (and ``generation_config.json``); tokenizer files
    come from ``tokenizer.save_pretrained`` or, if no tokenizer is given, are copied from the local
    directory the model was loaded from (``config._name_or_path``) when it has them. A ``path``
    that is a symlink stays one: the model is written into its target.
    """
    if any(isinstance(m, GatedLinear) for m in model.modules()):
        raise ValueError("save_compact: the model still has GatedLinear layers; call finegates.compact(model) first")
    from safetensors.torch import save_model

    path = Path(path)
    target = _link_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        hf = _is_hf(model)
        if hf:
            model.config.save_pretrained(tmp)
            gen = getattr(model, "generation_config", None)
            if gen is not None and model.can_generate():
                gen.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            else:
                _copy_tokenizer_files(getattr(model.config, "_name_or_path", ""), tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        follow_umask(tmp)  # safetensors creates the weights 0600; copied tokenizer files keep their source's mode
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        manifest = dict(
            format=FORMAT,
            format_version=FORMAT_VERSION,
            model_class=f"{type(model).__module__}.{type(model).__qualname__}",
            transformers_class=type(model).__name__ if hf else None,
            dtype=str(floats[0]).replace("torch.", "") if floats else None,
            parameters=sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
            layers=_layer_specs(model),
            attributes={n: dict(getattr(m, COMPACT_ATTRS)) for n, m in model.named_modules() if hasattr(m, COMPACT_ATTRS)},
            weights_sha256=_sha256(tmp / WEIGHTS_NAME),
            config_sha256=_sha256(tmp / "config.json") if (tmp / "config.json").is_file() else None,
            training=_training_record(model),
        )
        manifest["files"] = sorted([p.name for p in tmp.iterdir()] + [MANIFEST_NAME])
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        with open(tmp / MANIFEST_NAME, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _training_record(model: nn.Module) -> Optional[Dict[str, Any]]:
    """How the model was trained to this size: what :func:`finegates.sparsify` was given and where
    (``sparsify_record``) and the sparsity engine's options, when the model carries them."""
    record = sparsify_record(model)
    if not record:
        return None
    return dict(sparsify=record, train_options=getattr(model, "finegates_train_options", None))


def _restore_training_record(model: nn.Module, training: Optional[Dict[str, Any]]) -> None:
    """The loaded model carries its training record again (``finegates.sparsify_record(model)``)."""
    if not training:
        return
    record = training.get("sparsify") or []
    check_sparsify_record(record, f"load_compact: {MANIFEST_NAME}'s training.sparsify")
    object.__setattr__(model, RECORD_ATTR, record)
    if training.get("train_options") is not None:
        object.__setattr__(model, "finegates_train_options", training["train_options"])


# The types save_compact writes each manifest field with (None: null), and each layer kind's spec.
_FIELDS = dict(format_version=(int,), model_class=(str,), transformers_class=(str, None), dtype=(str, None), parameters=(int,),
               layers=(dict,), attributes=(dict,), weights_sha256=(str,), config_sha256=(str, None),
               files=(list,), manifest_sha256=(str,), training=(dict, None))
_SPEC_FIELDS = dict(
    linear=dict(in_features=int, out_features=int, bias=bool),
    gathered=dict(in_features=int, out_features=int, active_out=int, active_in=int, bias=bool,
                  scatter_rows=bool, gather_cols=bool),
)
_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", list: "a list", None: "null"}


def _is(value, kinds) -> bool:
    """isinstance with None for null, and no bool passing as an int (JSON true is not 1)."""
    return any(value is None if k is None else isinstance(value, k) and (k is bool or not isinstance(value, bool))
               for k in kinds)


def _field_error(path: Path, field: str, expected: str, value) -> ValueError:
    return ValueError(f"load_compact: {MANIFEST_NAME} in {str(path)!r}: field {field!r} must be {expected}, "
                      f"not {json.dumps(value)[:60]}; re-save the model")


def _check_fields(manifest: Dict[str, Any], path: Path) -> None:
    """Every field has the type save_compact writes: a hand-edited manifest fails here, by name,
    instead of deep in the model build."""
    for key, kinds in _FIELDS.items():
        if key in manifest and not _is(manifest[key], kinds):
            raise _field_error(path, key, " or ".join(_KIND_NAMES[k] for k in kinds), manifest[key])
    if manifest.get("dtype") is not None and not isinstance(getattr(torch, manifest["dtype"], None), torch.dtype):
        raise _field_error(path, "dtype", "a torch dtype name", manifest["dtype"])
    for name, spec in manifest["layers"].items():
        _check_layer_spec(path, name, spec)
    for name, attrs in manifest["attributes"].items():
        if not isinstance(attrs, dict):
            raise _field_error(path, f"attributes.{name}", "an object of attribute values", attrs)


def _check_layer_spec(path: Path, name: str, spec) -> None:
    fields = _SPEC_FIELDS.get(spec.get("kind")) if isinstance(spec, dict) else None
    if fields is None:
        raise _field_error(path, f"layers.{name}", 'a layer spec of kind "linear" or "gathered"', spec)
    for f, kind in fields.items():
        if not _is(spec.get(f), (kind,)):
            raise _field_error(path, f"layers.{name}.{f}", _KIND_NAMES[kind], spec.get(f))


def _read_manifest(path: Path) -> Dict[str, Any]:
    if not path.is_dir():
        raise FileNotFoundError(f"load_compact: {str(path)!r} is not a directory (expected a save_compact output)")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise FileNotFoundError(f"load_compact: {str(path)!r} has no {MANIFEST_NAME}; was it written by finegates.save_compact?")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_compact: {MANIFEST_NAME} in {str(path)!r} is corrupt ({e}); re-save the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"load_compact: {MANIFEST_NAME} in {str(path)!r} is not a finegates compact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"load_compact: format_version {manifest.get('format_version')!r} is not supported by this "
            f"finegates (expects {FORMAT_VERSION}); upgrade finegates or re-save the model"
        )
    for key in ("layers", "attributes", "weights_sha256", "manifest_sha256"):
        if key not in manifest:
            raise ValueError(f"load_compact: {MANIFEST_NAME} in {str(path)!r} lacks {key!r}; re-save the model")
    _check_fields(manifest, path)
    if manifest["manifest_sha256"] != _manifest_digest(manifest):
        raise ValueError(f"load_compact: {MANIFEST_NAME} in {str(path)!r} was modified after saving (its checksum "
                         "does not match); re-save the model")
    config = path / "config.json"
    if manifest.get("config_sha256") and (not config.is_file() or _sha256(config) != manifest["config_sha256"]):
        raise ValueError(f"load_compact: config.json in {str(path)!r} is missing or does not match the checksum in "
                         f"{MANIFEST_NAME} (modified after saving); re-save the model")
    return manifest


def _expected_shapes(name: str, spec: Dict[str, Any]) -> Dict[str, tuple]:
    """The tensors a layer spec puts into the weights file, with their shapes."""
    if spec["kind"] == "linear":
        rows, cols = spec["out_features"], spec["in_features"]
        shapes = {f"{name}.weight": (rows, cols)}
    else:
        rows, cols = spec["active_out"], spec["active_in"]
        shapes = {f"{name}.weight": (rows, cols)}
        if spec["scatter_rows"]:
            shapes[f"{name}.row_idx"] = (rows,)
        if spec["gather_cols"]:
            shapes[f"{name}.col_idx"] = (cols,)
    if spec["bias"]:
        shapes[f"{name}.bias"] = (rows,)
    return shapes


def _check_specs_against_weights(manifest: Dict[str, Any], wpath: Path, path: Path) -> None:
    """Every layer spec's sizes are non-negative, its active sizes within its full ones, and each
    tensor it describes lies in the weights file with that shape: checked from the file's header
    before anything is allocated (a manifest that claims 2**40 features allocates nothing)."""
    from safetensors import safe_open

    with safe_open(str(wpath), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for name, spec in manifest["layers"].items():
        sizes = {k: spec[k] for k in ("in_features", "out_features", "active_out", "active_in") if k in spec}
        bad = {k: v for k, v in sizes.items() if v < 0}
        if spec["kind"] == "gathered" and not bad:
            bad = {k: sizes[k] for k, full in (("active_out", "out_features"), ("active_in", "in_features"))
                   if sizes[k] > sizes[full]}
        if bad:
            raise ValueError(f"load_compact: layers.{name} in {MANIFEST_NAME} has impossible sizes {bad} "
                             "(negative, or more active than in all); re-save the model")
        for key, shape in _expected_shapes(name, spec).items():
            if stored.get(key) != shape:
                raise ValueError(f"load_compact: layers.{name} in {MANIFEST_NAME} expects {key} of shape {list(shape)}, "
                                 f"the weights file has {list(stored[key]) if key in stored else 'none'}; re-save "
                                 "the model")


def _check_attributes(manifest: Dict[str, Any], path: Path) -> None:
    """Only the attention attributes compaction sets (a registered layout's ``set_attrs``), each a
    size: a manifest cannot set anything else on a module."""
    from .layouts import registered_layouts

    allowed = {a for layout in registered_layouts() if layout.attention is not None
               for a in layout.attention.set_attrs}
    for name, attrs in manifest["attributes"].items():
        for a, v in attrs.items():
            if a not in allowed:
                raise _field_error(path, f"attributes.{name}.{a}", f"one of the attributes compaction sets "
                                   f"({', '.join(sorted(allowed))})", v)
            if not _is(v, (int,)) or v < 0:
                raise _field_error(path, f"attributes.{name}.{a}", "an integer >= 0", v)


def _skeleton(path: Path, manifest: Dict[str, Any]) -> nn.Module:
    name = manifest.get("transformers_class")
    if not name:
        raise ValueError(
            "load_compact: this model is not a Hugging Face model; pass model=<an instance of "
            f"{manifest.get('model_class')} built like the original> to load it"
        )
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"load_compact: transformers {transformers.__version__} has no model class {name!r} "
                         f"(transformers_class in {MANIFEST_NAME} must name a PreTrainedModel)")
    try:  # never the code of a config's auto_map, and never a prompt asking whether to run it
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except ValueError as e:
        raise ValueError(f"load_compact: config.json in {str(path)!r} is not a config of a built-in transformers "
                         f"model ({str(e).splitlines()[0]})") from None
    return cls(config)


def _swap_layer(model: nn.Module, name: str, spec: Dict[str, Any], dtype) -> None:
    """Puts a layer of the recorded shape at ``name``. A stock Linear that already has that shape
    stays: it may share its weight with another module (tied embeddings), and a fresh one would not."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"load_compact: the model has no module {name!r} recorded in {MANIFEST_NAME} (mismatched model?)") from None
    if type(old).__name__ not in ("Linear", "Conv1D", "GatheredLinear", "GatedLinear"):
        raise ValueError(f"load_compact: module {name!r} is a {type(old).__name__}, not a Linear (mismatched model?)")
    if spec["kind"] == "linear":
        if type(old) is nn.Linear and (old.in_features, old.out_features, old.bias is not None) == (
            spec["in_features"], spec["out_features"], spec["bias"]
        ):
            return
        new = nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"], dtype=dtype)
        setattr(new, COMPACTED, True)
    elif spec["kind"] == "gathered":
        full = (getattr(old, "in_features", None), getattr(old, "out_features", None))
        if type(old) is nn.Linear and (spec["in_features"] > full[0] or spec["out_features"] > full[1]):
            raise ValueError(f"load_compact: layers.{name} in {MANIFEST_NAME} is {spec['out_features']} x "
                             f"{spec['in_features']} wide, more than the model's layer ({full[1]} x {full[0]}); "
                             "mismatched model, or re-save it")
        new = GatheredLinear(
            spec["in_features"], spec["out_features"], spec["active_out"], spec["active_in"],
            bias=spec["bias"], scatter_rows=spec["scatter_rows"], gather_cols=spec["gather_cols"], dtype=dtype,
        )
    else:
        raise ValueError(f"load_compact: unknown layer kind {spec['kind']!r} for {name!r} in {MANIFEST_NAME}")
    set_submodule(model, name, new)


def _first(names, n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _load_weights(model: nn.Module, wpath: Path, path: Path) -> None:
    """Loads the safetensors file strictly; a mismatch names the keys (first few), not a cut-off line."""
    from safetensors.torch import load_model

    where = f"load_compact: weights in {str(path)!r} do not fit the model"
    try:
        missing, unexpected = load_model(model, str(wpath), strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        raise ValueError(f"{where}: {'; '.join(lines[:3])}" + (f" (and {len(lines) - 3} more)" if len(lines) > 3 else "")) from None
    if missing or unexpected:
        parts = ([f"missing {_first(missing)}"] if missing else []) + ([f"unexpected {_first(unexpected)}"] if unexpected else [])
        raise ValueError(f"{where}: {'; '.join(parts)} (mismatched config.json or a different model?)")


@torch.no_grad()
def load_compact(path: PathLike, *, model: Optional[nn.Module] = None, device=None) -> nn.Module:
    """Loads a :func:`save_compact` directory into the stock model class (eval mode).

    ``model``: an uncompacted instance of the original architecture to load into (needed only for
    models that are not Hugging Face ``PreTrainedModel``s). Raises ``FileNotFoundError`` /
    ``ValueError`` naming the problem for a missing, corrupt or mismatched directory.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    wpath = path / WEIGHTS_NAME
    if not wpath.is_file():
        raise FileNotFoundError(f"load_compact: {str(path)!r} has no {WEIGHTS_NAME}")
    if _sha256(wpath) != manifest["weights_sha256"]:
        raise ValueError(
            f"load_compact: {WEIGHTS_NAME} in {str(path)!r} does not match the checksum in {MANIFEST_NAME} "
            "(corrupt or modified file); re-save the model"
        )
    _check_specs_against_weights(manifest, wpath, path)
    _check_attributes(manifest, path)
    if model is None:
        model = _skeleton(path, manifest)
    dtype = getattr(torch, manifest["dtype"]) if manifest.get("dtype") else None
    for name, spec in manifest["layers"].items():
        _swap_layer(model, name, spec, dtype)
    for name, attrs in manifest["attributes"].items():
        mod = model.get_submodule(name)
        for a, v in attrs.items():
            setattr(mod, a, v)
        setattr(mod, COMPACT_ATTRS, dict(attrs))
    if dtype is not None:
        model.to(dtype)
    _load_weights(model, wpath, path)
    if getattr(getattr(model, "config", None), CONFIG_KEY, None) == "mean":
        use_mean_pooling(model)  # the classifier was trained on mean-pooled token states
    _restore_training_record(model, manifest.get("training"))
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(device)
    return model
