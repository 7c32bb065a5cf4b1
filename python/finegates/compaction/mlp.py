"""Compaction of an MLP ``down(act(gate(x)) * up(x))`` or ``down(act(up(x)))``.

The intermediate dims kept are those the down-projection reads (open columns) and every
up-projection writes (open rows); a closed row of the activated projection counts as closed only
where ``act(0) == 0``, else it still feeds a constant. The kept width is then physically the width of
both sides: no gather or scatter is left between them.

:func:`recognise_mlp` finds such an MLP inside a block that has no registered layout, from its
modules alone, and confirms the wiring by running it once.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .folding import Folded, LayoutMismatch, PartPlan, Projection, Rewrites, build, fold, idx, is_linear, require_linears
from .layouts import MLPLayout

__all__ = ["compact_mlp", "recognise_mlp", "up_projections", "activation_of", "act_keeps_zero"]

# The kept MLP intermediate width is rounded up to a multiple of this (0: off) when that costs no
# more than compression_report promised: odd GEMM widths were measured up to 1.45x slower in MKL
# (128 x 595 -> 1250 against 1264). The extra dims are closed ones whose folded up-projection rows
# (weights and bias) and down-projection columns are zeroed: they compute act(0) or anything finite,
# times a zero column, so the output is unchanged.
_PAD_INTERMEDIATE = 16

_Part = Tuple[Projection, int]


def _resolve(block: nn.Module, path: str):
    obj = block
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def activation_of(block: nn.Module, layout: MLPLayout, prefix: str):
    """The MLP's activation (module or callable); LayoutMismatch when the block has none there."""
    try:
        return _resolve(block, layout.act)
    except AttributeError:
        raise LayoutMismatch(f"it has no activation {prefix}{layout.act}") from None


def act_keeps_zero(act: Optional[Callable], dtype: torch.dtype, device) -> bool:
    """True if ``act(0) == 0`` (gelu, relu, silu ...): then a closed up-projection row is removable."""
    if act is None:
        return False
    try:
        z = act(torch.zeros(4, dtype=dtype, device=device))
    except Exception:  # an activation that is not elementwise on one tensor: assume it is not 0
        return False
    return isinstance(z, Tensor) and bool((z == 0).all())


def _pad_intermediate(keep: Tensor, ups: List[_Part], down: Folded) -> Tensor:
    """Indices of the kept intermediate dims, padded with zeroed closed dims (see above)."""
    kidx = idx(keep)
    mult = _PAD_INTERMEDIATE
    pad = (-kidx.numel()) % mult if mult > 1 and kidx.numel() > 0 else 0
    spare = idx(~keep)[:pad]
    if pad == 0 or spare.numel() < pad or kidx.numel() + pad >= keep.numel():
        return kidx
    costs = [proj.row_cost() for proj, _ in ups]  # parameters per kept row of each part
    down_rows, down_bias = int(down.rows.sum()), int(down.has_bias)
    promised = sum(int(proj.part_rows(p).sum()) * c for (proj, p), c in zip(ups, costs))
    promised += down_rows * int(down.cols.sum()) + down_rows * down_bias
    if (kidx.numel() + pad) * (sum(costs) + down_rows) + down_rows * down_bias > promised:
        return kidx
    for proj, p in ups:
        proj.folded.zero_rows(proj.source(p, spare))
    down.zero_cols(spare)
    return torch.sort(torch.cat((kidx, spare))).values


def up_projections(prefix: str, block: nn.Module, layout: MLPLayout, width: int) -> List[_Part]:
    """The up-projections as (Projection, part), the activated one first."""
    if layout.fused_up:
        f = fold(block.get_submodule(layout.up[0]))
        if f.out_features != 2 * width:
            raise LayoutMismatch(f"{prefix}{layout.up[0]} has {f.out_features} outputs, not 2 x {width}")
        proj = Projection(prefix + layout.up[0], f, (width, width))
        return [(proj, 0), (proj, 1)]
    parts = []
    for path in layout.up:
        f = fold(block.get_submodule(path))
        if f.out_features != width:
            raise LayoutMismatch(f"{prefix}{path} has {f.out_features} outputs, {prefix}{layout.down} reads {width}")
        parts.append((Projection(prefix + path, f, (width,)), 0))
    return parts


def compact_mlp(rewrites: Rewrites, prefix: str, block: nn.Module, layout: MLPLayout) -> None:
    """Shrinks the MLP of ``block`` (named ``prefix``) in place; raises LayoutMismatch, before
    changing anything, when the block does not fit ``layout``."""
    require_linears(block, layout.projections, prefix)
    act = activation_of(block, layout, prefix)
    down = fold(block.get_submodule(layout.down))
    ups = up_projections(prefix, block, layout, down.in_features)
    keep = down.cols.clone()
    for i, (proj, p) in enumerate(ups):
        if i == 0 and not act_keeps_zero(act, proj.folded.dtype, proj.folded.rows.device):
            continue  # act(0) != 0: a closed row still feeds a constant
        keep &= proj.part_rows(p)
    kidx = _pad_intermediate(keep, ups, down)
    for proj in {id(proj): proj for proj, _ in ups}.values():
        rewrites.replace(proj.name, proj.layer([PartPlan.compact(kidx) for _ in proj.sizes]))
    rewrites.replace(prefix + layout.down, build(down, idx(down.rows), kidx, out_width=down.out_features))


# ------------------------------------------------------------------------ recognition


def _activations(container: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Children that can be an elementwise activation: no parameters, not a Linear or dropout."""
    return [
        (n, m) for n, m in container.named_children()
        if not is_linear(m) and not isinstance(m, nn.Dropout) and next(m.parameters(), None) is None
    ]


@torch.no_grad()
def _wiring_holds(container: nn.Module, ups: List[nn.Module], down: nn.Module, act: nn.Module) -> bool:
    """Runs ``container`` once and checks that ``down`` reads exactly ``act(ups[0]) * ups[1:]``."""
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out)) for i, m in enumerate(ups)]
    hooks.append(down.register_forward_pre_hook(lambda m, a: seen.__setitem__("down", a[0])))
    modes = [(m, m.training) for m in container.modules()]
    container.eval()  # no gate noise, no dropout, no draw from the RNG of a run that is only counting
    try:
        p = next(down.parameters())
        x = torch.randn(2, 3, ups[0].in_features, generator=torch.Generator().manual_seed(0)).to(p)
        container(x)
        expect = act(seen[0])
        for i in range(1, len(ups)):
            expect = expect * seen[i]
        got = seen["down"]
        tol = 1e-5 if p.dtype in (torch.float32, torch.float64) else 2e-2
        return got.shape == expect.shape and torch.allclose(got, expect, rtol=tol, atol=tol * float(expect.abs().max().clamp_min(1)))
    except Exception:  # a container that cannot run on one tensor is not a plain MLP
        return False
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training


def recognise_mlp(block: nn.Module) -> Optional[MLPLayout]:
    """An MLPLayout for the first submodule of ``block`` that holds an up-projection (or a gate and
    an up), an elementwise activation and a down-projection, wired as an MLP (checked by running it)."""
    for cname, container in block.named_modules():
        if container is block:
            continue  # the block's own forward needs attention inputs
        lins = [(n, m) for n, m in container.named_children() if is_linear(m) and hasattr(m, "in_features")]
        acts = _activations(container)
        if not 2 <= len(lins) <= 3 or not acts:
            continue
        for dn, down in lins:
            ups = [(n, m) for n, m in lins if m is not down and m.out_features == down.in_features and m.in_features == down.out_features]
            if len(ups) != len(lins) - 1:
                continue
            orders = [ups] if len(ups) == 1 else [ups, ups[::-1]]
            for order in orders:
                for an, act in acts:
                    if _wiring_holds(container, [m for _, m in order], down, act):
                        pre = cname + "."
                        return MLPLayout(up=tuple(pre + n for n, _ in order), down=pre + dn, act=pre + an)
    return None
