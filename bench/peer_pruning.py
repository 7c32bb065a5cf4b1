"""Structured pruning by the tools practitioners use, for the prune-then-LoRA peers of the quality table.

A peer removes whole attention heads and whole FFN units of a BERT-family encoder and keeps the
residual width, as Torch-Pruning's and TextPruner's transformer recipes do. Everything here is held
to what FineGates is measured by:

- ``peer_shape``: heads and units removed per layer so that the removed share of the encoder's
  Linear parameters is the fraction asked for (one head of MiniLM is 49,248 parameters, one unit 769);
- ``counted_removal``: that share counted by FineGates' own counter (the compaction plan of a gated
  copy with the same heads and units closed), and checked against the pruned model's own count;
- ``check_pruned``: the pruned model's logits equal the dense model's with those heads and units zeroed;
- ``torch_pruning_prune`` / ``textpruner_prune``: the two tools, Taylor importance on calibration batches.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Structure", "peer_shape", "encoder_layers", "zero_pruned", "slice_pruned", "check_pruned",
           "counted_removal", "torch_pruning_prune", "textpruner_prune"]


@dataclasses.dataclass
class Structure:
    """What a pruned encoder keeps: per layer a bool mask over its heads and one over its FFN units."""

    heads: List[Tensor]
    units: List[Tensor]

    def to_dict(self) -> Dict[str, List[List[int]]]:
        return dict(heads=[torch.nonzero(~m).flatten().tolist() for m in self.heads],
                    units=[torch.nonzero(~m).flatten().tolist() for m in self.units])

    @classmethod
    def from_dict(cls, d, n_heads: int, n_units: int) -> "Structure":
        def masks(removed, n):
            out = []
            for r in removed:
                m = torch.ones(n, dtype=torch.bool)
                m[torch.tensor(r, dtype=torch.long)] = False
                out.append(m)
            return out

        return cls(masks(d["heads"], n_heads), masks(d["units"], n_units))


def encoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    """The transformer layers of a BERT-family classifier (query/key/value, output, intermediate)."""
    encoder = getattr(model.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if layers is None or not hasattr(layers[0], "attention") or not hasattr(layers[0].attention, "self"):
        raise ValueError(f"peers: {type(model).__name__} is not a BERT-family encoder (the peers prune BERT's "
                         "attention heads and FFN units)")
    return layers


def _dims(model: nn.Module) -> Tuple[int, int, int, int]:
    c = model.config
    return c.hidden_size, c.num_attention_heads, c.hidden_size // c.num_attention_heads, c.intermediate_size


def peer_shape(model: nn.Module, fraction: float) -> Tuple[int, int]:
    """(heads, FFN units) removed from every layer so that the removed share of the encoder's Linear
    parameters is closest to ``fraction``: the heads rounded to the same share, the units fill the rest."""
    hidden, n_heads, head_dim, inter = _dims(model)
    head = 4 * head_dim * hidden + 3 * head_dim  # q/k/v rows with their biases, o's columns
    unit = 2 * hidden + 1  # an intermediate row with its bias, a down-projection column
    per_layer = 4 * (hidden * hidden + hidden) + 2 * inter * hidden + inter + hidden
    heads = min(n_heads - 1, round(fraction * n_heads))
    units = round((fraction * per_layer - heads * head) / unit)
    if not 0 <= units < inter:
        raise ValueError(f"peers: no whole heads and units remove {fraction:.0%} of a layer")
    return heads, units


def _head_rows(mask: Tensor, head_dim: int) -> Tensor:
    return mask.repeat_interleave(head_dim)


def zero_pruned(model: nn.Module, structure: Structure) -> nn.Module:
    """A copy of ``model`` with the removed heads and units zeroed (what the pruned model must compute)."""
    model = copy.deepcopy(model).eval()
    head_dim = _dims(model)[2]
    with torch.no_grad():
        for layer, heads, units in zip(encoder_layers(model), structure.heads, structure.units):
            closed = ~_head_rows(heads, head_dim)
            att = layer.attention
            for lin in (att.self.query, att.self.key, att.self.value):
                lin.weight[closed] = 0
                lin.bias[closed] = 0
            att.output.dense.weight[:, closed] = 0
            layer.intermediate.dense.weight[~units] = 0
            layer.intermediate.dense.bias[~units] = 0
            layer.output.dense.weight[:, ~units] = 0
    return model


def _sliced(lin: nn.Linear, rows: Tensor = None, cols: Tensor = None) -> nn.Linear:
    w = lin.weight.detach()
    b = None if lin.bias is None else lin.bias.detach()
    if rows is not None:
        w, b = w[rows], (None if b is None else b[rows])
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def slice_pruned(model: nn.Module, structure: Structure) -> nn.Module:
    """Removes the heads and units ``structure`` drops, in place, as plain smaller ``nn.Linear`` s
    (BERT reads the head count from its projections' width, so nothing else changes)."""
    head_dim = _dims(model)[2]
    for layer, heads, units in zip(encoder_layers(model), structure.heads, structure.units):
        rows = _head_rows(heads, head_dim)
        sa = layer.attention.self
        sa.query, sa.key, sa.value = (_sliced(sa.query, rows=rows), _sliced(sa.key, rows=rows),
                                      _sliced(sa.value, rows=rows))
        sa.num_attention_heads, sa.all_head_size = int(heads.sum()), int(rows.sum())
        layer.attention.output.dense = _sliced(layer.attention.output.dense, cols=rows)
        layer.intermediate.dense = _sliced(layer.intermediate.dense, rows=units)
        layer.output.dense = _sliced(layer.output.dense, cols=units)
    return model


def _encoder_linear_params(model: nn.Module) -> int:
    return sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for layer in encoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def check_pruned(pruned: nn.Module, dense: nn.Module, structure: Structure, batches, atol: float = 1e-4) -> float:
    """Raises unless ``pruned`` gives the logits of ``dense`` with the structure's heads and units
    zeroed, on ``batches``; returns the largest difference."""
    reference = zero_pruned(dense, structure)
    pruned = pruned.eval()
    worst = 0.0
    for batch in batches:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        worst = max(worst, float((pruned(**inputs).logits - reference(**inputs).logits).abs().max()))
    if not worst <= atol:
        raise AssertionError(f"peers: the pruned model's logits differ from the dense model's with the same heads "
                             f"and units zeroed by {worst:.3g} (> {atol})")
    return worst


def counted_removal(dense: nn.Module, pruned: nn.Module, structure: Structure) -> Dict[str, float]:
    """The share of the encoder's Linear parameters removed, by FineGates' counter (the compaction
    plan of a gated copy of ``dense`` with the same heads and units closed), checked against the
    parameters the pruned model actually has."""
    from finegates import compression_report, sparsify
    from finegates.layers import GatedLinear

    gated = sparsify(copy.deepcopy(dense), target_sparsity=0.0, verbose=False)
    head_dim = _dims(dense)[2]
    masks = {}
    for layer, heads, units in zip(encoder_layers(gated), structure.heads, structure.units):
        rows = _head_rows(heads, head_dim)
        for lin in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
            masks[lin] = (rows, torch.ones(lin.in_features, dtype=torch.bool))
        o = layer.attention.output.dense
        masks[o] = (torch.ones(o.out_features, dtype=torch.bool), rows)
        up, down = layer.intermediate.dense, layer.output.dense
        masks[up] = (units, torch.ones(up.in_features, dtype=torch.bool))
        masks[down] = (torch.ones(down.out_features, dtype=torch.bool), units)
    if not all(isinstance(m, GatedLinear) for m in masks):
        raise ValueError("peers: sparsify did not gate every encoder Linear")
    report = compression_report(gated, masks=masks)
    physical = report["params_gated"] - _encoder_linear_params(pruned)
    if physical != report["params_removable"]:
        raise AssertionError(f"peers: the pruned model lost {physical:,} encoder Linear parameters, FineGates' counter "
                             f"says {report['params_removable']:,} for the same heads and units")
    return dict(removed_fraction_of_gated=report["removed_fraction_of_gated"], params_removed=physical,
                params_gated=report["params_gated"])


def _train_everything(model: nn.Module) -> None:
    """Every parameter requires grad: the tools read weight gradients (Taylor scores), and
    Torch-Pruning traces the autograd graph, in which frozen weights would be invisible."""
    for p in model.parameters():
        p.requires_grad_(True)


def _loss_backward(model: nn.Module, batches) -> None:
    """Accumulates the task loss's gradient over ``batches`` on every parameter (the Taylor scores)."""
    model.eval()
    model.zero_grad()
    for batch in batches:
        model(**batch).loss.backward()


def torch_pruning_prune(model: nn.Module, batches, heads: int, units: int) -> Structure:
    """Torch-Pruning: group Taylor importance (``GroupTaylorImportance``) over ``batches``, ``heads``
    whole heads and ``units`` FFN units removed from every layer, the residual width kept (the
    projections that write the residual stream, the embeddings and the head are ignored layers).
    Prunes ``model`` in place; returns what it removed, read from the pruning groups."""
    import torch_pruning as tp

    layers = encoder_layers(model)
    _, n_heads, head_dim, inter = _dims(model)
    sa = [l.attention.self for l in layers]
    names = {id(m): (i, kind) for i, l in enumerate(layers)
             for kind, m in (("head", l.attention.self.query), ("unit", l.intermediate.dense))}
    ignored = [model.base_model.embeddings, *[m for m in (getattr(model.base_model, "pooler", None),
                                                          getattr(model, "classifier", None)) if m is not None]]
    ignored += [m for l in layers for m in (l.attention.output.dense, l.output.dense)]
    example = {k: v for k, v in batches[0].items() if k != "labels"}
    _train_everything(model)
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=(units - 0.5) / inter,  # Torch-Pruning keeps int(n * (1 - ratio)) channels
        head_pruning_ratio=(heads - 0.5) / n_heads, num_heads={m: n_heads for s in sa for m in (s.query, s.key, s.value)},
        prune_num_heads=True, prune_head_dims=False, ignored_layers=ignored, global_pruning=False)
    _loss_backward(model, batches)
    structure = Structure([torch.ones(n_heads, dtype=torch.bool) for _ in layers],
                          [torch.ones(inter, dtype=torch.bool) for _ in layers])
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            found = names.get(id(dep.target.module))
            if found is not None and pruner.DG.is_out_channel_pruning_fn(dep.handler):
                i, kind = found
                if kind == "head":
                    structure.heads[i][torch.unique(torch.tensor(list(idxs)) // head_dim)] = False
                else:
                    structure.units[i][torch.tensor(list(idxs))] = False
        group.prune()
    for s, m in zip(sa, structure.heads):
        s.num_attention_heads, s.all_head_size = int(m.sum()), int(m.sum()) * head_dim
    model.zero_grad(set_to_none=True)
    _expect(structure, heads, units, "Torch-Pruning")
    return structure


def textpruner_prune(model: nn.Module, batches, heads: int, units: int, n_iters: int = 4) -> Structure:
    """TextPruner: iterative pruning (``n_iters`` rounds) by first-order Taylor importance of heads
    and FFN units on ``batches``, the same count removed from every layer. TextPruner removes heads
    through ``prune_heads``, which transformers 5 no longer has, so it runs with ``keep_shape=True``
    (it zeroes what it prunes) and the model is cut to its masks here."""
    from textpruner import GeneralConfig, TransformerPruner, TransformerPruningConfig
    import tempfile

    _, n_heads, _, inter = _dims(model)
    n_layers = len(encoder_layers(model))
    _train_everything(model)
    with tempfile.TemporaryDirectory() as tmp:
        pruner = TransformerPruner(
            model,
            transformer_pruning_config=TransformerPruningConfig(
                target_ffn_size=inter - units, target_num_of_heads=n_heads - heads, pruning_method="iterative",
                n_iters=n_iters, head_even_masking=True, ffn_even_masking=True),
            general_config=GeneralConfig(use_device="cpu", output_dir=tmp))
        pruner.prune(dataloader=batches, adaptor=lambda out: out.loss, keep_shape=True, save_model=False)
    structure = Structure([m.bool() for m in pruner.head_mask.reshape(n_layers, n_heads)],
                          [m.bool() for m in pruner.ffn_mask.reshape(n_layers, inter)])
    model.zero_grad(set_to_none=True)
    _expect(structure, heads, units, "TextPruner")
    return structure


def _expect(structure: Structure, heads: int, units: int, tool: str) -> None:
    got = {(int((~h).sum()), int((~u).sum())) for h, u in zip(structure.heads, structure.units)}
    if got != {(heads, units)}:
        raise AssertionError(f"peers: {tool} removed (heads, units) {sorted(got)} per layer, asked ({heads}, {units})")
