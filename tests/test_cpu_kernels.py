"""What only the CPU kernels have: the cache of gate-folded weight blocks and the AVX-512 paths.

The shared suites (test_gated_linear.py, test_gathered_linear.py) check values and gradients with
whatever paths this machine takes; here the cache is checked for staleness (every change of what
the block depends on must show in the result) and the generic paths (``FG_CPU_SIMD=0``, no cache)
are run in a subprocess and compared with the default ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fg_kernels
from fg_kernels.reference import gated_linear_ref
from fg_kernels.testing import make_gate, rel_err

op = torch.ops.fg.gated_linear


def _layer(seed: int, n: int = 67, k: int = 45, sparsity: float = 0.4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 9, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    gr = make_gate(n, gen=g, sparsity=sparsity)
    gc = make_gate(k, gen=g, sparsity=sparsity)
    return x, w, b, gr, gc


def _assert_ref(x, w, b, gr, gc):
    with torch.no_grad():
        got = op(x, w, b, gr, gc)
        want = gated_linear_ref(x.double(), w.double(), b.double(), gr.double(), gc.double())
    assert rel_err(got, want) < 1e-5


@pytest.fixture(autouse=True)
def _empty_cache():
    fg_kernels.clear_cpu_weight_cache()
    yield
    fg_kernels.clear_cpu_weight_cache()


def test_cache_keeps_a_frozen_weights_block_and_reuses_it():
    x, w, b, gr, gc = _layer(0)
    _assert_ref(x, w, b, gr, gc)
    held = fg_kernels.cpu_weight_cache_bytes()
    assert held > 0
    _assert_ref(x, w, b, gr, gc)
    assert fg_kernels.cpu_weight_cache_bytes() == held  # same block, not a second one


@pytest.mark.parametrize("change", ["weight_inplace", "weight_copy", "gate_values", "gate_pattern", "new_weight"])
def test_cache_never_serves_a_stale_block(change):
    x, w, b, gr, gc = _layer(1)
    _assert_ref(x, w, b, gr, gc)
    with torch.no_grad():
        if change == "weight_inplace":
            w.mul_(-2.0)
        elif change == "weight_copy":
            w.copy_(torch.randn_like(w))
        elif change == "gate_values":
            gr.mul_(0.5)
        elif change == "gate_pattern":
            gc[gc.nonzero()[0]] = 0.0
        else:
            w = w.clone() + 1.0
    _assert_ref(x, w, b, gr, gc)


def _write_bypassing(w: torch.Tensor, how: str) -> torch.Tensor:
    """Replace w's values in ways the version counter does not see; returns the weight to use."""
    new = torch.randn(w.shape, generator=torch.Generator().manual_seed(7))
    if how == "data_swap":  # the old storage freed: the allocator may hand its address out again
        w.data = w.data.half()
        w.data = new.clone()
    elif how == "half_float":
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
        lin.weight.copy_(w)
        lin.half().float()
        lin.weight.data = new.clone()  # ... then new values into the round-tripped storage
        return lin.weight
    elif how == "data_copy":
        w.data.copy_(new)
    elif how == "numpy":
        w.numpy()[:] = new.numpy()
    else:  # "storage"
        w.untyped_storage().copy_(new.untyped_storage())
    return w


BYPASSING = ["data_swap", "half_float", "data_copy", "numpy", "storage"]


@pytest.mark.parametrize("how", BYPASSING)
def test_a_forward_never_reuses_an_earlier_calls_block_outside_frozen_weights(how):
    """Writes that bypass the version counter cannot reach a result: a forward folds anew."""
    for trial in range(5):  # a freed storage's address comes back often: try more than once
        x, w, b, gr, gc = _layer(10 + trial)
        _assert_ref(x, w, b, gr, gc)
        _assert_ref(x, _write_bypassing(w, how), b, gr, gc)


@pytest.mark.parametrize("how", ["data_swap", "half_float"])
def test_inside_frozen_weights_a_swapped_storage_is_still_seen(how):
    with fg_kernels.frozen_weights():
        for trial in range(5):
            x, w, b, gr, gc = _layer(20 + trial)
            _assert_ref(x, w, b, gr, gc)
            _assert_ref(x, _write_bypassing(w, how), b, gr, gc)


def test_frozen_weights_reuses_the_block_and_the_backward_reuses_its_forwards():
    """The reuse itself, seen through a write that the promise of frozen_weights() excludes."""
    x, w, b, gr, gc = _layer(30)
    with torch.no_grad():
        before = op(x, w, b, gr, gc)
        with fg_kernels.frozen_weights():
            with fg_kernels.frozen_weights():  # scopes nest
                op(x, w, b, gr, gc)
            w.data.mul_(3.0)
            assert torch.equal(op(x, w, b, gr, gc), before)  # reused, as promised
        _assert_ref(x, w, b, gr, gc)  # scope closed: folded anew
    with pytest.raises(RuntimeError, match="more frozen_weights"):
        torch.ops.fg.cpu_weight_reuse(-1)
    assert torch.ops.fg.cpu_weight_reuse(1) == 1 and torch.ops.fg.cpu_weight_reuse(-1) == 0  # not left at -1
    # a step's backward reads its forward's block: the same gradient as without the cache
    xg = x.clone().requires_grad_(True)
    op(xg, w, b, gr, gc).square().sum().backward()
    ref = xg.detach().double().requires_grad_(True)
    gated_linear_ref(ref, w.double(), b.double(), gr.double(), gc.double()).square().sum().backward()
    assert rel_err(xg.grad, ref.grad) < 1e-5


def test_weight_that_requires_grad_is_not_cached():
    x, w, b, gr, gc = _layer(2)
    w.requires_grad_(True)
    _assert_ref(x, w, b, gr, gc)
    assert fg_kernels.cpu_weight_cache_bytes() == 0


def test_blocks_of_freed_weights_are_dropped():
    x, w, b, gr, gc = _layer(3)
    _assert_ref(x, w, b, gr, gc)
    first = fg_kernels.cpu_weight_cache_bytes()
    del w
    x, w2, b, gr, gc = _layer(4, n=33, k=21)
    _assert_ref(x, w2, b, gr, gc)
    held = fg_kernels.cpu_weight_cache_bytes()
    assert 0 < held < first  # the first block went with its weight; only the second is held
    fg_kernels.clear_cpu_weight_cache()
    assert fg_kernels.cpu_weight_cache_bytes() == 0


@pytest.mark.parametrize("tokens", [1300, 45])
def test_backward_matches_reference_after_forward_filled_the_cache(tokens):
    """1300 tokens run as blocks shared out in one parallel region (for_token_blocks), 45 as one."""
    x, w, b, gr, gc = _layer(5)
    x = torch.randn(tokens, x.shape[-1], generator=torch.Generator().manual_seed(6))
    leaves = [t.clone().requires_grad_(True) for t in (x, b, gr, gc)]
    y = op(leaves[0], w, leaves[1], leaves[2], leaves[3])
    grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
    ref_leaves = [t.double().requires_grad_(True) for t in (x, b, gr, gc)]
    y_ref = gated_linear_ref(ref_leaves[0], w.double(), ref_leaves[1], ref_leaves[2], ref_leaves[3])
    ref_grads = torch.autograd.grad(y_ref, ref_leaves, torch.ones_like(y_ref))
    for name, got, want in zip(("x", "bias", "row_gate", "col_gate"), grads, ref_grads):
        zero = {"x": gc == 0, "bias": gr == 0, "row_gate": gr == 0, "col_gate": gc == 0}[name]
        want = want.clone()
        want[..., zero] = 0.0  # a zero gate is a removed row/column: no gradient (docs/design.md)
        assert rel_err(got, want) < 1e-5, name


_GENERIC_SCRIPT = r"""
import sys, torch, fg_kernels
from fg_kernels.testing import make_gate
out = {}
for seed, (n, k, s) in enumerate([(67, 45, 0.4), (128, 96, 0.0), (33, 130, 0.7), (50, 17, 1.0), (80, 64, 0.05)]):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, k, generator=g, requires_grad=True)
    w = torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g, requires_grad=True)
    gr = make_gate(n, gen=g, sparsity=s).requires_grad_(True)
    gc = make_gate(k, gen=g, sparsity=s).requires_grad_(True)
    for rep in range(2):  # the second call is served by the cache where it is on
        y = torch.ops.fg.gated_linear(x, w, b, gr, gc)
        grads = torch.autograd.grad(y, (x, b, gr, gc), torch.randn(y.shape, generator=torch.Generator().manual_seed(9)))
    out[seed] = [y.detach()] + list(grads)
    a = (torch.randn(3, k, generator=g) * 0.3).requires_grad_(True)
    lb = (torch.randn(n, 3, generator=g) * 0.3).requires_grad_(True)
    y = torch.ops.fg.gated_linear(x, w, b, gr, gc, a, lb, 0.7)
    grads = torch.autograd.grad(y, (x, b, gr, gc, a, lb), torch.randn(y.shape, generator=torch.Generator().manual_seed(9)))
    out[(seed, "lora")] = [y.detach()] + list(grads)
    idx = gr.detach().nonzero().flatten()
    with torch.no_grad():
        out[(seed, "gathered")] = torch.ops.fg.gathered_linear(x.detach(), w[idx][:, gc.detach() != 0].contiguous(),
                                                            None, idx, (gc.detach() != 0).nonzero().flatten(), n)
torch.save(out, sys.argv[1])
"""


def _run_generic(tmp_path: Path, env_extra: dict) -> dict:
    path = tmp_path / f"out_{'_'.join(f'{k}{v}' for k, v in env_extra.items())}.pt"
    env = {**os.environ, **env_extra}
    subprocess.run([sys.executable, "-c", _GENERIC_SCRIPT, str(path)], env=env, check=True, timeout=120)
    return torch.load(path)


@pytest.mark.parametrize("env", [{"FG_CPU_SIMD": "0", "FG_CPU_WEIGHT_CACHE_MB": "0"}, {"FG_CPU_BLOCK_M": "7"},
                                 {"FG_CPU_WHOLE_BELOW": "1"}, {"FG_CPU_WHOLE_BELOW": "0"}],
                         ids=["scalar-no-cache", "blocks-of-7-tokens", "sets-kept-whole", "sets-always-gathered"])
def test_generic_paths_match_the_default_ones(tmp_path, env):
    """FG_CPU_SIMD=0 and FG_CPU_WEIGHT_CACHE_MB=0 force the scalar gathers/scatters and a fold per
    call; FG_CPU_BLOCK_M=7 splits 33 tokens into blocks shared out in one parallel region (the last
    one ragged); FG_CPU_WHOLE_BELOW=1 keeps every partial set whole (closed entries as zero gates in
    the GEMM), 0 gathers every one. The results must equal the default paths' (AVX-512 where the
    CPU has it, cache on, one block, sets under 10% closed kept whole)."""
    default = _run_generic(tmp_path, {})
    other = _run_generic(tmp_path, env)
    assert default.keys() == other.keys()
    for key in default:
        a, b = default[key], other[key]
        for t_default, t_other in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert rel_err(t_default, t_other) < 1e-6, key


def _lora_layer(seed: int, n: int = 40, k: int = 36, r: int = 3):
    x, w, b, gr, gc = _layer(seed, n=n, k=k)
    g = torch.Generator().manual_seed(seed + 100)
    return x, w, b, gr, gc, torch.randn(r, k, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3


@pytest.mark.parametrize("tokens", [1, 300], ids=["low-rank-path", "folded-into-block"])
def test_lora_gradients_on_both_paths_match_the_reference(tokens):
    """Few tokens run the adapter on its low-rank path, many fold it into the weight block
    (fold_lora); both give the reference's values and gradients."""
    x, w, b, gr, gc, a, lb = _lora_layer(40)
    x = torch.randn(tokens, x.shape[-1], generator=torch.Generator().manual_seed(41))
    leaves = [t.clone().requires_grad_(True) for t in (x, gr, gc, a, lb)]
    y = op(leaves[0], w, b, leaves[1], leaves[2], leaves[3], leaves[4], 0.7)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(42))
    grads = torch.autograd.grad(y, leaves, dy)
    ref = [t.double().requires_grad_(True) for t in (x, gr, gc, a, lb)]
    y_ref = gated_linear_ref(ref[0], w.double(), b.double(), ref[1], ref[2], ref[3], ref[4], 0.7)
    ref_grads = torch.autograd.grad(y_ref, ref, dy.double())
    assert rel_err(y, y_ref) < 1e-5
    for name, got, want in zip(("x", "row_gate", "col_gate", "lora_a", "lora_b"), grads, ref_grads):
        want = want.clone()
        if name in ("x", "col_gate"):
            want[..., gc == 0] = 0.0
        elif name == "row_gate":
            want[gr == 0] = 0.0
        elif name == "lora_a":
            want[:, gc == 0] = 0.0
        else:
            want[gr == 0] = 0.0
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("change", ["a_inplace", "b_data_swap", "scale"])
def test_a_block_with_the_adapter_folded_in_follows_the_adapter(change):
    """Inside frozen_weights() the folded block holds W and the adapter; an optimizer's in-place
    update of a factor, a swapped storage or a new scale must each give a new block."""
    x, w, b, gr, gc, a, lb = _lora_layer(43)
    x = torch.randn(300, x.shape[-1], generator=torch.Generator().manual_seed(44))
    scale = 0.7

    def check():
        with torch.no_grad():
            got = op(x, w, b, gr, gc, a, lb, scale)
            want = gated_linear_ref(x.double(), w.double(), b.double(), gr.double(), gc.double(),
                                    a.double(), lb.double(), scale)
        assert rel_err(got, want) < 1e-5

    with fg_kernels.frozen_weights():
        check()
        assert fg_kernels.cpu_weight_cache_bytes() > 0
        if change == "a_inplace":
            with torch.no_grad():
                a.add_(0.5)
        elif change == "b_data_swap":
            lb.data = torch.randn(lb.shape, generator=torch.Generator().manual_seed(45))
        else:
            scale = 1.3
        check()


def test_a_training_step_leaves_no_block_in_the_cache():
    """The backward takes its forward's block out of the cache: outside frozen_weights() nothing
    would read it again, so it must not hold memory past the step."""
    x, w, b, gr, gc, a, lb = _lora_layer(46)
    leaves = [t.clone().requires_grad_(True) for t in (x, gr, gc, a, lb)]
    y = op(leaves[0], w, b, leaves[1], leaves[2], leaves[3], leaves[4], 1.0)
    assert fg_kernels.cpu_weight_cache_bytes() > 0
    y.sum().backward()
    assert fg_kernels.cpu_weight_cache_bytes() == 0


def test_a_nearly_open_layer_runs_whole_and_still_skips_its_closed_entries():
    """Under 10% of a dimension closed, the CPU kernel keeps the set whole and lets the zero gates
    zero their rows and columns inside the GEMM: the closed outputs are still exactly 0 and the
    closed gates, their weight rows and columns and the LoRA factors there get exactly no gradient,
    as the reference's masks say."""
    g = torch.Generator().manual_seed(7)
    n, k = 64, 48
    x = torch.randn(4, 9, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    gr = make_gate(n, gen=g, sparsity=0.0)
    gc = make_gate(k, gen=g, sparsity=0.0)
    gr[[3, 40]] = 0.0  # 3% of the rows, 2% of the columns: kept whole
    gc[17] = 0.0
    a, lb = torch.randn(4, k, generator=g) * 0.3, torch.randn(n, 4, generator=g) * 0.3
    leaves = [t.clone().requires_grad_(True) for t in (x, b, gr, gc, a, lb)]
    y = op(leaves[0], w, leaves[1], leaves[2], leaves[3], leaves[4], leaves[5], 0.7)
    dy = torch.randn(y.shape, generator=g)
    grads = dict(zip(("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b"), torch.autograd.grad(y, leaves, dy)))
    ref = [t.double().requires_grad_(True) for t in (x, b, gr, gc, a, lb)]
    y_ref = gated_linear_ref(ref[0], w.double(), ref[1], ref[2], ref[3], ref[4], ref[5], 0.7)
    want = dict(zip(grads, torch.autograd.grad(y_ref, ref, dy.double())))
    assert rel_err(y, y_ref) < 1e-5
    for name in grads:
        assert rel_err(grads[name], want[name]) < 1e-5, name
    assert torch.equal(y[..., [3, 40]], torch.zeros_like(y[..., [3, 40]]))
    for name, closed in (("row_gate", grads["row_gate"][[3, 40]]), ("col_gate", grads["col_gate"][17]),
                         ("bias", grads["bias"][[3, 40]]), ("x", grads["x"][..., 17]),
                         ("lora_a", grads["lora_a"][:, 17]), ("lora_b", grads["lora_b"][[3, 40]])):
        assert torch.equal(closed, torch.zeros_like(closed)), name


@pytest.mark.parametrize("closed", [0.0, 0.3])
def test_inside_frozen_weights_a_fused_optimizer_step_on_the_adapter_is_seen(closed):
    """Fused AdamW updates the LoRA factors without bumping their version counter: inside
    frozen_weights() a block with the adapter folded in must still follow their new values, step
    after step (every gate open, and rows and columns gathered)."""
    g = torch.Generator().manual_seed(70)
    n, k = 64, 48
    x = torch.randn(300, k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g)
    gr, gc = make_gate(n, gen=g, sparsity=closed), make_gate(k, gen=g, sparsity=closed)
    a = torch.nn.Parameter(torch.randn(4, k, generator=g) * 0.3)
    lb = torch.nn.Parameter(torch.randn(n, 4, generator=g) * 0.3)
    opt = torch.optim.AdamW([a, lb], lr=0.1, fused=True)
    with fg_kernels.frozen_weights():
        for step in range(3):
            y = op(x, w, b, gr, gc, a, lb, 0.7)
            with torch.no_grad():
                want = gated_linear_ref(x.double(), w.double(), b.double(), gr.double(), gc.double(),
                                        a.double(), lb.double(), 0.7)
            assert rel_err(y.detach(), want) < 1e-5, step
            y.square().sum().backward()
            opt.step()
            opt.zero_grad()
