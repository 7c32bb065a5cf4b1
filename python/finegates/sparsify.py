"""``sparsify``: put FineGates on the Linears of any ``nn.Module`` (in place)."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Dict, List, Optional

from torch import nn

from .config import FineGatesConfig
from .layers import GatedLinear, is_linear_like, set_submodule

__all__ = ["sparsify", "dense_view", "trainable_parameters", "gated_layers", "gate_parameters", "default_match",
           "param_groups", "sparsify_record", "sparsify_as", "check_sparsify_record", "HEAD_NAMES"]

logger = logging.getLogger("finegates")

# Names of task-head modules (last name component); never gated by default.
HEAD_NAMES = ("classifier", "score", "qa_outputs", "lm_head", "pooler", "cls", "embed_out", "output_projection")
_TASK_HEADS = ("classifier", "score", "qa_outputs")
_EXCLUDE_PARTS = ("embed", "embeddings", "wte", "wpe") + HEAD_NAMES


def gated_layers(model: nn.Module):
    """``(name, GatedLinear)`` pairs of the model."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GatedLinear)]


def gate_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The gate logits of every gated layer, rows then columns, in module order: the one way the
    optimizer groups and the learning-rate schedule find the gates."""
    return [g.theta for _, layer in gated_layers(model) for g in (layer.row_gates, layer.col_gates)]


def trainable_parameters(model: nn.Module) -> int:
    """Number of (distinct) parameters that require grad."""
    seen = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _inside_block(model: nn.Module, name: str) -> bool:
    """True if some proper ancestor of ``name`` is an element of an ``nn.ModuleList``."""
    parts = name.split(".")
    mod = model
    for i, part in enumerate(parts[:-1]):
        child = getattr(mod, part, None)
        if child is None:
            return False
        if isinstance(mod, nn.ModuleList):
            return True
        mod = child
    return isinstance(mod, nn.ModuleList)


def default_match(model: nn.Module, name: str) -> bool:
    """Whether ``sparsify`` gates the Linear ``name`` by default: inside a transformer block (an
    element of an ``nn.ModuleList``), not an embedding or a head."""
    parts = name.split(".")
    if any(p in _EXCLUDE_PARTS or p.startswith("embed") for p in parts):
        return False
    return _inside_block(model, name)


def _matcher(model: nn.Module, target_modules):
    if target_modules is None:
        return lambda name: default_match(model, name)
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return lambda name: pattern.fullmatch(name) is not None
    suffixes = list(target_modules)
    if not suffixes:
        raise ValueError("target_modules is an empty list")
    return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)


def _refuse_tied(model: nn.Module, targets: List[str]) -> None:
    """A gated layer is compacted into a new, smaller weight: one whose weight another module shares
    (an ``lm_head`` tied to the input embeddings) would come apart from it, so it is refused."""
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for n in targets:
        names = owners.get(id(model.get_submodule(n).weight), [])
        others = [o for o in names if o != f"{n}.weight"]
        if others:
            raise ValueError(
                f"sparsify: {n}.weight is tied to {others[0]}; gating it would untie them at compaction. "
                "Leave it out of target_modules (or untie the weights first)"
            )


def sparsify(model: nn.Module, config: Optional[FineGatesConfig] = None, *, verbose: bool = True,
             **options) -> nn.Module:
    """Replace the chosen Linear/Conv1D modules of ``model`` by :class:`GatedLinear`, in place.

    ``config`` (:class:`~finegates.config.FineGatesConfig`) or its fields as keyword ``options``
    (``sparsify(model, target_sparsity=0.4, lora_rank=8)``), not both.

    Selection: ``target_modules`` is a list of name suffixes (``"query"`` matches
    ``"...attention.self.query"``) or a regex matched against the full qualified name (PEFT style).
    Default: every Linear/Conv1D inside the transformer blocks (a module below an ``nn.ModuleList``
    element), excluding embeddings and heads (classifier / score / pooler / lm_head ...).

    Trainable afterwards (everything else frozen): gates, LoRA factors, the gated layers' biases
    (``train_bias``), their weights (``train_weights``), the task head (modules named
    ``classifier``/``score``/``qa_outputs``; with a classifier also the ``pooler``; ``lm_head`` only
    when ``train_weights``), and every module named in ``trainable_modules`` (suffixes).
    ``target_sparsity``: the fraction of the gated layers' parameters (weights and biases) the compact
    model removes, counted as :func:`finegates.compact` removes them (the budget objective,
    :mod:`finegates.budget`); the reference's per-layer objective (:func:`finegates.sparsity_loss`)
    reads it as each layer's per-dimension target. A target compaction cannot reach (units that must
    stay) is refused. ``gate_gradient``: ``"straight-through"`` (the task's gradient reaches gates at
    the top of their clamp, see :class:`finegates.gates.Gates`) or ``"clamp"`` (the reference).
    ``kurtosis=True`` makes the gated layers record the reference's kurtosis weights in training
    forwards, for ``sparsity_loss(model, kurtosis=True)``.
    It can be called again on other modules (e.g. attention and MLP with different targets): the
    layers gated by an earlier call keep training. Returns the model.
    """
    if config is not None and options:
        raise TypeError(f"sparsify: pass a FineGatesConfig or its fields as keywords, not both (got {sorted(options)})")
    c = config if config is not None else FineGatesConfig(**options)
    targets = _select_targets(model, c.target_modules)
    _gate(model, c, targets)
    msg = f"finegates.sparsify: gated {len(targets)} layers, trainable parameters: {trainable_parameters(model):,}"
    logger.info(msg)
    if verbose:
        print(msg)
    return model


# The attribute of a sparsified model that records how it was sparsified: one entry per call,
# ``{"config": FineGatesConfig.to_dict(), "modules": [the names it gated]}``.
RECORD_ATTR = "finegates_sparsify"


def sparsify_record(model: nn.Module) -> List[Dict[str, Any]]:
    """How ``model`` was sparsified (every :func:`sparsify` call, in order): what checkpoints, the
    engine's state and compact models save, and what :func:`sparsify_as` replays."""
    return [dict(config=dict(e["config"]), modules=list(e["modules"])) for e in getattr(model, RECORD_ATTR, [])]


def check_sparsify_record(record: Any, what: str) -> None:
    """ValueError naming ``what`` unless ``record`` has the shape :func:`sparsify_record` gives: a
    list of ``{"config": {...}, "modules": [...]}`` entries."""
    if not isinstance(record, list):
        raise ValueError(f"{what} must be a list of sparsify calls, got {record!r}")
    for i, entry in enumerate(record):
        if not (isinstance(entry, dict) and set(entry) == {"config", "modules"} and isinstance(entry["config"], dict)
                and isinstance(entry["modules"], list)):
            raise ValueError(f"{what}[{i}] must hold exactly 'config' (an object) and 'modules' (a list)")


def sparsify_as(model: nn.Module, record: List[Dict[str, Any]]) -> nn.Module:
    """Sparsifies a fresh ``model`` as the one :func:`sparsify_record` describes was: the same
    configs on the same modules (then :func:`finegates.load_trainable_state` restores its gates)."""
    check_sparsify_record(record, "sparsify_as: record")
    if not record:
        raise ValueError("sparsify_as: record must be a non-empty list of sparsify calls, got []")
    for i, entry in enumerate(record):
        config = FineGatesConfig.from_dict(entry["config"])
        names = entry["modules"]
        linear = {n for n, m in model.named_modules() if n and is_linear_like(m) and not isinstance(m, GatedLinear)}
        missing = [n for n in names if not isinstance(n, str) or n not in linear]
        if missing or not names:
            raise ValueError(f"sparsify_as: record[{i}] gates modules this model has no ungated Linear/Conv1D for: "
                             f"{missing[:3] or 'none named'}")
        _gate(model, config, list(names))
    return model


def _gate(model: nn.Module, c: FineGatesConfig, targets: List[str]) -> None:
    """Gates the modules ``targets`` of ``model`` with config ``c`` and records the call."""
    _refuse_tied(model, targets)
    _freeze_all_but_gated(model)
    for n in targets:
        base = model.get_submodule(n)
        layer = GatedLinear(base, lora_rank=c.lora_rank, lora_alpha=c.lora_alpha, train_weight=c.train_weights,
                            sigma=c.sigma, gate_dtype=c.gate_dtype, target_sparsity=c.target_sparsity,
                            straight_through=c.gate_gradient == "straight-through")
        layer.train(base.training)
        if c.kurtosis:
            layer.kurtosis_tau = float(c.kurtosis_tau)
        set_submodule(model, n, layer)
        if layer.bias is not None:
            layer.bias.requires_grad_(bool(c.train_bias))
    _unfreeze_head(model, c.train_weights, c.trainable_modules)
    if c.structure == "heads_units":
        _gate_whole_units(model, targets)
    _check_reachable(model, c.target_sparsity)
    record = sparsify_record(model) + [dict(config=c.to_dict(), modules=list(targets))]
    object.__setattr__(model, RECORD_ATTR, record)


def _select_targets(model: nn.Module, target_modules) -> List[str]:
    """The names of the not-yet-gated Linear/Conv1D modules ``target_modules`` selects (at least one)."""
    match = _matcher(model, target_modules)
    targets = [n for n, m in model.named_modules()
               if n and is_linear_like(m) and not isinstance(m, GatedLinear) and match(n)]
    already = [n for n, m in model.named_modules() if n and isinstance(m, GatedLinear) and match(n)]
    if not targets and already:
        raise ValueError(
            f"sparsify: the {len(already)} modules target_modules={target_modules!r} selects are already gated "
            f"(e.g. {already[0]}); a second call gates other modules, e.g. target_modules=['mlp']"
        )
    if not targets:
        raise ValueError(
            f"sparsify: no nn.Linear/Conv1D module matched target_modules={target_modules!r}"
            + (" (default: Linears inside the transformer blocks, i.e. below an nn.ModuleList)" if target_modules is None else "")
        )
    return targets


def _freeze_all_but_gated(model: nn.Module) -> None:
    """Everything frozen except what an earlier call made trainable (gates, LoRA, biases of its layers)."""
    earlier = [p for _, m in gated_layers(model) for p in m.parameters() if p.requires_grad]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in earlier:
        p.requires_grad_(True)


def _unfreeze_head(model: nn.Module, train_weights: bool, trainable_modules) -> None:
    """The task head trains: classifier/score/qa_outputs, the pooler a classifier reads (a frozen
    pooler leaves BERT-style classifiers at chance level), ``lm_head`` with ``train_weights``, and
    every module named in ``trainable_modules``."""
    names = {n.rpartition(".")[2] for n, _ in model.named_modules()}
    head = list(_TASK_HEADS) + (["pooler"] if "classifier" in names else []) + (["lm_head"] if train_weights else [])
    head += list(trainable_modules or [])
    for n, m in model.named_modules():
        if n and any(n == s or n.endswith("." + s) for s in head) and not isinstance(m, GatedLinear):
            for p in m.parameters():
                p.requires_grad_(True)


def dense_view(model: nn.Module) -> nn.Module:
    """``model`` as it was before :func:`sparsify`: every gated Linear back to its plain layer, on the
    same Parameters (no weight is copied; buffers and the rest of the module tree are)."""
    memo = {id(p): p for p in model.parameters()}
    memo.update({id(m): m.dense_module() for m in model.modules() if isinstance(m, GatedLinear)})
    return copy.deepcopy(model, memo)


def _gate_whole_units(model: nn.Module, targets: List[str]) -> None:
    """``structure="heads_units"``: every side of the new layers that compaction does not pair (the
    residual stream's) keeps fixed open gates, and the closure closes these layers by whole units."""
    from .compaction.compact import paired_sides

    paired = paired_sides(model)
    layers = [model.get_submodule(n) for n in targets]
    if not any(any(paired.get(layer, ())) for layer in layers):
        raise ValueError("sparsify: structure='heads_units' leaves no gate to train: compaction pairs no dimension of "
                         "the selected modules (register the block's layout with finegates.register_layout)")
    for layer in layers:
        layer.closes_whole_units = True
        rows, cols = paired.get(layer, (False, False))
        if not rows:
            layer.row_gates.fix_open()
        if not cols:
            layer.col_gates.fix_open()


def _check_reachable(model: nn.Module, target_sparsity: float) -> None:
    from .budget import check_reachable

    check_reachable(model, target_sparsity)


def param_groups(model: nn.Module, gate_lr: float, other_lr: float, weight_lr: Optional[float] = None):
    """AdamW groups: gate logits (no weight decay), the gated layers' weights (pretraining), and the
    rest that trains (task head, pooler, biases, LoRA)."""
    gated_weights = {id(m.weight) for _, m in gated_layers(model)}
    gate_ids = {id(p) for p in gate_parameters(model)}
    gates, weights, rest = [], [], []
    seen = set()
    for n, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in gate_ids:
            gates.append(p)
        elif id(p) in gated_weights and weight_lr is not None:
            weights.append(p)
        else:
            rest.append(p)
    groups = []
    if gates:
        groups.append(dict(params=gates, lr=gate_lr, weight_decay=0.0))
    if weights:
        groups.append(dict(params=weights, lr=weight_lr))
    if rest:
        groups.append(dict(params=rest, lr=other_lr if weight_lr is None else weight_lr))
    if not groups:
        raise ValueError("nothing to train: no parameter requires grad")
    return groups
