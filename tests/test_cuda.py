"""What only a GPU shows about the ``fg`` ops on CUDA tensors (the Triton kernels registered by
``fg_kernels.cuda_registration``): agreement with the CPU kernels at sizes beyond one tile,
``torch.compile`` with inductor, no recompilation for new sparsity patterns, no host
synchronisation, CUDA-graph capture, a second device. Values, gradients, gradcheck, opcheck and bad
input run on CUDA through the shared suites (the ``cuda`` backend of ``conftest.BACKENDS``).

Skips cleanly without a CUDA device; never imports triton at import time. Every test here is
quick (seconds once compiled) except those marked ``slow`` (the 1,000-pattern recompile check): the
quick GPU check (``bench/gpu_check.sh``) runs ``-m "gpu and not slow"``, the full CUDA suite
``-m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from conftest import GRAD_NAMES_ALL, grad_names, make_gate, make_gated_inputs, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _registered():
    from fg_kernels import cuda_registration

    assert cuda_registration.register(), "the Triton kernels are not registered for CUDA"
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 is checked at full precision
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _call(inp):
    return torch.ops.fg.gated_linear(*inp.args(), **inp.kwargs())


def test_matches_cpu_kernels(seed):
    """The CUDA and CPU kernels of every op agree on a layer several tiles wide."""
    inp = make_gated_inputs(seed, (5, 31), 277, 265, lora_rank=3, lora_scale=0.5, device=DEV)
    cpu = inp.map(lambda n, t: t.cpu())
    a, b = _call(inp), _call(cpu)
    assert rel_err(a, b) <= 1e-5
    go = torch.randn_like(b)
    mask = [True] * 7
    ga = torch.ops.fg.gated_linear_backward(go.to(DEV), inp.x, inp.weight, inp.row_gate, inp.col_gate,
                                             inp.lora_a, inp.lora_b, 0.5, a, mask)
    gb = torch.ops.fg.gated_linear_backward(go, cpu.x, cpu.weight, cpu.row_gate, cpu.col_gate,
                                             cpu.lora_a, cpu.lora_b, 0.5, b, mask)
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert p.shape == q.shape and p.dtype == q.dtype, i
        assert rel_err(p, q) <= 1e-5 or (p.cpu() - q).abs().max().item() <= 1e-5, i


def test_compile_inductor_fullgraph(seed):
    torch._dynamo.reset()
    inp = make_gated_inputs(seed, (3, 40), 96, 80, lora_rank=4, lora_scale=0.5, device=DEV)
    names = ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b")

    def layer(x, w, b, rg, cg, la, lb):
        return torch.ops.fg.gated_linear(x, w, b, rg, cg, la, lb, 0.5).relu().sum()

    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        leaves = inp.map(lambda n, t: t.clone().requires_grad_(n in names))
        out = fn(*[getattr(leaves, n) for n in GRAD_NAMES_ALL])
        results.append((out.detach(), torch.autograd.grad(out, [getattr(leaves, n) for n in names])))
    (o1, g1), (o2, g2) = results
    assert rel_err(o2, o1) <= 1e-5
    for a, b in zip(g2, g1):
        assert rel_err(a, b) <= 1e-5


# --------------------------------------------------------------------------------------------
# No recompilation, no synchronisation, CUDA graphs
# --------------------------------------------------------------------------------------------


def _kernel_objects():
    """Every launchable kernel of the compiled kernel module, by attribute name: each attribute that
    is a triton ``JITFunction`` or a wrapper of one (``Autotuner``, ``Heuristics``). Discovered, not
    listed, so a renamed or added kernel is counted too. (The module's ``@triton.jit`` helpers are
    JITFunctions as well; they are never launched on their own, so their caches stay empty.)"""
    from triton.runtime.autotuner import Autotuner, Heuristics
    from triton.runtime.jit import JITFunction

    from fg_kernels.triton import _launch

    km = _launch.kernel_module(False)
    found = {}
    for name in sorted(vars(km)):
        obj = getattr(km, name)
        if isinstance(obj, (JITFunction, Autotuner, Heuristics)):
            found[name] = obj
    assert found, f"no triton kernel found in {km.__name__}"
    return found


def _cache_sizes():
    """``{kernel name: (compiled variants, autotuning entries)}`` of every kernel of the module."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    sizes = {}
    for name, k in _kernel_objects().items():
        tuned = 0
        while not isinstance(k, JITFunction):  # Autotuner / Heuristics (possibly stacked) -> JITFunction
            if isinstance(k, Autotuner):
                tuned += len(k.cache)
            k = k.fn
        compiled = sum(len(c[0]) for c in k.device_caches.values())
        sizes[name] = (compiled, tuned)
    return sizes


# Triton specialises integer arguments (sizes, strides) on ``== 1`` and on divisibility by 16: the
# warm-up of gathered_linear covers both classes of the compact widths, the random widths never 1.
GATHERED_WARMUP_WIDTHS = (96, 90)


@pytest.mark.parametrize("n_patterns", [
    200,
    pytest.param(1000, marks=pytest.mark.slow),
])
def test_new_gate_patterns_do_not_recompile(seed, n_patterns):
    """``n_patterns`` different gate patterns through the same layer (forward; backward for one in
    ten, gathered_linear with a new index set and compact widths for one in ten) add no compiled
    kernel and no autotuning entry after the first calls (autotuning entries exist only with
    autotuning on, ``FG_TRITON_AUTOTUNE`` unset or 1: run this file so too)."""
    N, K, M = 384, 320, 256
    base = make_gated_inputs(seed, (M,), N, K, dtype=torch.bfloat16, lora_rank=8, lora_scale=0.5, device=DEV)
    names = ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b")
    gen = torch.Generator().manual_seed(seed)

    def step(sr, sc, backward):
        inp = base.map(lambda n, t: t)
        inp.row_gate = make_gate(N, gen=gen, sparsity=sr, dtype=torch.bfloat16, device=DEV)
        inp.col_gate = make_gate(K, gen=gen, sparsity=sc, dtype=torch.bfloat16, device=DEV)
        leaves = inp.map(lambda n, t: t.clone().requires_grad_(backward and n in names))
        y = _call(leaves)
        if backward:
            torch.autograd.grad(y.float().sum(), [getattr(leaves, n) for n in names])

    def gathered(nr, nc):
        ri = torch.randperm(N, generator=gen)[:nr].to(DEV)
        ci = torch.randperm(K, generator=gen)[:nc].to(DEV)
        w = torch.randn(nr, nc, generator=gen).to(DEV, torch.bfloat16)
        torch.ops.fg.gathered_linear(base.x, w, None, ri, ci, N)

    # Warm-up: dense, sparse and empty patterns, forward and backward; gathered_linear with row and
    # column counts (and so the compact weight's row stride) both divisible and not by 16.
    for sr, sc in ((0.0, 0.0), (0.5, 0.3), (1.0, 1.0)):
        step(sr, sc, True)
    for nr in GATHERED_WARMUP_WIDTHS:
        for nc in GATHERED_WARMUP_WIDTHS:
            gathered(nr, nc)
    torch.cuda.synchronize()
    before = _cache_sizes()
    assert sum(c for c, _ in before.values()) > 0, f"the warm-up compiled no kernel: {before}"
    rng = torch.Generator().manual_seed(seed + 1)
    for i in range(n_patterns):
        s = torch.rand(2, generator=rng).tolist()
        step(s[0], s[1], backward=i % 10 == 0)
        if i % 10 == 0:
            nr = int(torch.randint(2, N, (1,), generator=rng))
            nc = int(torch.randint(2, K, (1,), generator=rng))
            gathered(nr, nc)
    torch.cuda.synchronize()
    after = _cache_sizes()
    grown = {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
    assert not grown, f"new gate patterns compiled or autotuned again (before, after): {grown}"


def test_no_host_synchronisation(seed):
    """gated_linear forward and backward never wait for the device."""
    inp = make_gated_inputs(seed, (64,), 96, 80, dtype=torch.bfloat16, lora_rank=4, lora_scale=0.5, device=DEV)
    mask = [True] * 7

    def fwd_bwd():
        y = _call(inp)
        torch.ops.fg.gated_linear_backward(torch.ones_like(y), inp.x, inp.weight, inp.row_gate, inp.col_gate,
                                           inp.lora_a, inp.lora_b, 0.5, y, mask)

    fwd_bwd()  # compile / autotune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fwd_bwd()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture_follows_new_patterns(seed):
    """Sync-free kernels can be captured once and replayed with new gate values in place."""
    inp = make_gated_inputs(seed, (128,), 160, 96, dtype=torch.bfloat16, lora_rank=4, lora_scale=0.5, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            _call(inp)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = _call(inp)
    gen = torch.Generator().manual_seed(seed)
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        inp.row_gate.copy_(make_gate(160, gen=gen, sparsity=sparsity))
        inp.col_gate.copy_(make_gate(96, gen=gen, sparsity=sparsity))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, _call(inp)), sparsity


def _compact_mlp(seed):
    """A two-layer compact model on the GPU: scattered output, then a gathered input."""
    from finegates.compaction.modules import GatheredLinear

    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(96, generator=gen)[:60].sort().values
    cols = torch.randperm(80, generator=gen)[:50]
    up = GatheredLinear.from_block(torch.randn(60, 80, generator=gen), torch.randn(60, generator=gen), rows, None,
                                   in_features=80, out_features=96)
    down = GatheredLinear.from_block(torch.randn(40, 50, generator=gen), None, None, cols,
                                     in_features=80, out_features=40)
    return torch.nn.Sequential(up, torch.nn.GELU(), torch.nn.Linear(96, 80), down).to(DEV, torch.bfloat16)


def test_compact_model_no_host_synchronisation(seed):
    """A compact model checks its index lists once: later forwards never wait for the device."""
    model = _compact_mlp(seed)
    x = torch.randn(32, 80, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)  # compile, autotune and the one check of each index list
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_compact_model_cuda_graph_capture(seed):
    """A warmed-up compact model is captured in a CUDA graph and replays new inputs exactly."""
    model = _compact_mlp(seed)
    x = torch.randn(32, 80, device=DEV, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            model(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = model(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        g.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            assert torch.equal(out, model(x))


def test_unchecked_index_list_in_capture_is_refused(seed):
    """An index list first seen inside a capture cannot be read back: a named error, not a hang."""
    model = _compact_mlp(seed)
    x = torch.randn(32, 80, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        model(x)
    model[0].row_idx = model[0].row_idx.clone()  # a new tensor: not checked yet
    g = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="row_idx is seen for the first time inside a CUDA graph capture"):
        with torch.no_grad(), torch.cuda.graph(g):
            model(x)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(seed):
    inp = make_gated_inputs(seed, (33,), 40, 30, lora_rank=2, device="cuda:1")
    out = _call(inp)
    assert out.device == torch.device("cuda:1")
    assert rel_err(out, _call(inp.map(lambda n, t: t.cpu()))) <= 1e-5


def test_triton_namespace_equals_fg_on_cuda(seed):
    """``fg_kernels.triton.gated_linear`` (the fg_triton ops) runs the same kernels and the same
    autograd as ``torch.ops.fg`` on CUDA tensors: bitwise the same results."""
    import fg_kernels.triton as ft

    inp = make_gated_inputs(seed, (7, 9), 50, 45, dtype=torch.bfloat16, lora_rank=2, lora_scale=0.5, device=DEV)
    names = grad_names(inp)
    results = []
    for fn in (ft.gated_linear, torch.ops.fg.gated_linear):
        leaves = inp.map(lambda n, t: t.clone().requires_grad_())
        y = fn(*leaves.args(), **leaves.kwargs())
        results.append((y, torch.autograd.grad(y.float().sum(), [getattr(leaves, n) for n in names])))
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
