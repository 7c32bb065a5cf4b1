"""The ``fg`` ops on CUDA tensors (the Triton kernels registered by ``fg_kernels.cuda_registration``):
values and gradients against the reference (float32, float16, bfloat16), agreement with the CPU
kernels, ``torch.library.opcheck``, ``torch.compile(fullgraph=True)``, no recompilation for new
sparsity patterns, no host synchronisation and CUDA-graph capture.

Skips cleanly without a CUDA device. This module never imports triton at import time (so that a
CPU-only run can still start the Triton interpreter for tests/test_triton_interpret.py).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import zlib
import pytest
import torch

import fg_kernels  # noqa: F401  (registers torch.ops.fg.* and the CUDA kernels)
from fg_kernels.reference import gated_linear_ref, gathered_linear_ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif("triton" in sys.modules and sys.modules["triton"] is None
                       or importlib.util.find_spec("triton") is None,
                       reason="triton is not installed (the CUDA kernels are Triton kernels)"),
]

DEV = "cuda"
TENSORS = ("x", "weight", "bias", "row_gate", "col_gate", "lora_a", "lora_b")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


@pytest.fixture(autouse=True)
def _registered():
    from fg_kernels import cuda_registration

    assert cuda_registration.register(), "the Triton kernels are not registered for CUDA"
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 is checked at full precision
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.fixture
def seed(request) -> int:
    return zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF


def make_gate(n, gen, sparsity):
    vals = 0.05 + 0.95 * torch.rand(n, generator=gen)
    if sparsity >= 1:
        return torch.zeros(n)
    return vals * (torch.rand(n, generator=gen) >= sparsity) if sparsity > 0 else vals


def make_inputs(seed, lead, N, K, *, dtype=torch.float32, row_sparsity=0.4, col_sparsity=0.4, lora_rank=0,
                bias=True, gate_dtype=None, device=DEV):
    gen = torch.Generator().manual_seed(seed)
    d = dict(
        x=torch.randn(*lead, K, generator=gen),
        weight=torch.randn(N, K, generator=gen) / math.sqrt(K),
        bias=torch.randn(N, generator=gen) if bias else None,
        row_gate=make_gate(N, gen, row_sparsity),
        col_gate=make_gate(K, gen, col_sparsity),
        lora_a=torch.randn(lora_rank, K, generator=gen) / math.sqrt(K) if lora_rank else None,
        lora_b=torch.randn(N, lora_rank, generator=gen) / math.sqrt(lora_rank) if lora_rank else None,
    )
    gd = dtype if gate_dtype is None else gate_dtype
    out = {n: None if t is None else t.to(device=device, dtype=gd if "gate" in n else dtype) for n, t in d.items()}
    out["lora_scale"] = 0.5
    return out


def args_of(inp):
    return [inp[n] for n in TENSORS] + [inp["lora_scale"]]


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return (a - b).norm().item() / max(b.norm().item(), 1e-300)


def ref(inp, names=(), go=None, dtype=torch.float64, absolute=False):
    """Reference output (and gradients) computed in `dtype` on the same device."""
    f = (lambda t: t.detach().to(dtype).abs()) if absolute else (lambda t: t.detach().to(dtype))
    leaves = {n: None if inp[n] is None else f(inp[n]).requires_grad_(n in names) for n in TENSORS}
    y = gated_linear_ref(*[leaves[n] for n in TENSORS], inp["lora_scale"])
    if not names:
        return y.detach(), {}
    gs = torch.autograd.grad(y, [leaves[n] for n in names], f(go), allow_unused=True, materialize_grads=True)
    return y.detach(), dict(zip(names, gs))


TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def assert_close(out, truth, lowp_ref, dtype, what, *, grad=False, mag=None):
    assert out.shape == truth.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite"
    err = rel_err(out, truth)
    if mag is not None:
        c = 1e-6 if dtype == torch.float32 else 2.0**-8
        if (out.double() - truth.double()).norm().item() <= c * mag.double().norm().item():
            return
    if dtype == torch.bfloat16:
        base = rel_err(lowp_ref, truth)
        tol = min(2 * base + 2.0**-8, 3e-2 if grad else 1e-2)
    else:
        tol = TOL[dtype]
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol:.3e}"


# --------------------------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_rank", [0, 8], ids=lambda r: f"lora{r}")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 0.9, 1.0])
@pytest.mark.parametrize("lead,N,K", [((3, 129), 257, 191), ((1,), 1, 1), ((67,), 33, 7)],
                         ids=["3d", "tiny", "odd"])
def test_forward(lead, N, K, sparsity, dtype, lora_rank, seed):
    inp = make_inputs(seed, lead, N, K, dtype=dtype, row_sparsity=sparsity, col_sparsity=sparsity,
                      lora_rank=lora_rank)
    out = torch.ops.fg.gated_linear(*args_of(inp))
    assert out.device.type == torch.device(DEV).type and out.dtype == dtype
    truth, _ = ref(inp)
    lowp, _ = ref(inp, dtype=dtype)
    assert_close(out, truth, lowp, dtype, "forward")
    assert (out[..., inp["row_gate"] == 0] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("train_weight", [False, True], ids=["frozenW", "trainW"])
@pytest.mark.parametrize("sparsity", [0.0, 0.4, 1.0])
def test_grads(sparsity, train_weight, dtype, seed):
    inp = make_inputs(seed, (2, 97), 129, 161, dtype=dtype, row_sparsity=sparsity, col_sparsity=sparsity,
                      lora_rank=4)
    names = [n for n in TENSORS if inp[n] is not None and (train_weight or n != "weight")]
    gen = torch.Generator().manual_seed(seed + 1)
    go = torch.randn(2, 97, 129, generator=gen).to(DEV, dtype)
    leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_(n in names) for n in TENSORS}
    y = torch.ops.fg.gated_linear(*[leaves[n] for n in TENSORS], inp["lora_scale"])
    gs = dict(zip(names, torch.autograd.grad(y, [leaves[n] for n in names], go)))
    _, truth = ref(inp, names, go)
    _, lowp = ref(inp, names, go, dtype=dtype)
    _, mag = ref(inp, names, go, absolute=True)
    for n in names:
        assert gs[n].dtype == inp[n].dtype
        assert_close(gs[n], truth[n], lowp[n], dtype, f"grad {n}", grad=True, mag=mag[n])
    assert (gs["x"][..., inp["col_gate"] == 0] == 0).all()


def test_matches_cpu_kernels(seed):
    inp = make_inputs(seed, (5, 31), 77, 65, lora_rank=3)
    cpu = {n: (v.cpu() if isinstance(v, torch.Tensor) else v) for n, v in inp.items()}
    a = torch.ops.fg.gated_linear(*args_of(inp))
    b = torch.ops.fg.gated_linear(*args_of(cpu))
    assert rel_err(a, b) <= 1e-5
    y = b
    go = torch.randn_like(y)
    mask = [True] * 7
    ga = torch.ops.fg.gated_linear_backward(go.to(DEV), inp["x"], inp["weight"], inp["row_gate"], inp["col_gate"],
                                             inp["lora_a"], inp["lora_b"], 0.5, a, mask)
    gb = torch.ops.fg.gated_linear_backward(go, cpu["x"], cpu["weight"], cpu["row_gate"], cpu["col_gate"],
                                             cpu["lora_a"], cpu["lora_b"], 0.5, y, mask)
    for i, (p, q) in enumerate(zip(ga, gb)):
        assert p.shape == q.shape and p.dtype == q.dtype, i
        assert rel_err(p, q) <= 1e-5 or (p.cpu() - q).abs().max().item() <= 1e-5, i


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("specs", [(None, None), ("sorted", "sorted"), ("unsorted", None), (None, "unsorted")])
def test_gathered_linear(specs, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    row_spec, col_spec = specs
    kx, out_f, nR, nC = 300, 257, 130, 170

    def idx(spec, full, n):
        if spec is None:
            return None
        i = torch.randperm(full, generator=gen)[:n]
        return (i.sort().values if spec == "sorted" else i).to(DEV)

    ri, ci = idx(row_spec, out_f, nR), idx(col_spec, kx, nC)
    of = out_f if ri is not None else nR
    x = torch.randn(2, 65, kx if ci is not None else nC, generator=gen).to(DEV, dtype)
    w = (torch.randn(nR, nC, generator=gen) / math.sqrt(nC)).to(DEV, dtype)
    b = torch.randn(nR, generator=gen).to(DEV, dtype)
    y = torch.ops.fg.gathered_linear(x, w, b, ri, ci, of)
    truth = gathered_linear_ref(x.double(), w.double(), b.double(), ri, ci, of)
    lowp = gathered_linear_ref(x, w, b, ri, ci, of)
    assert_close(y, truth, lowp, dtype, "gathered")


# --------------------------------------------------------------------------------------------
# opcheck and torch.compile
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["frozenW", "trainW_lora", "zero_gates", "bf16"])
def test_opcheck_gated_linear(case, seed):
    if case == "frozenW":
        inp, req = make_inputs(seed, (6,), 11, 9), ("x", "bias", "row_gate", "col_gate")
    elif case == "trainW_lora":
        inp, req = make_inputs(seed, (2, 3), 12, 6, lora_rank=2), TENSORS
    elif case == "zero_gates":
        inp, req = make_inputs(seed, (5,), 10, 7, row_sparsity=1, col_sparsity=1, lora_rank=1), TENSORS
    else:
        inp, req = make_inputs(seed, (4,), 17, 13, dtype=torch.bfloat16, lora_rank=2), ("x", "row_gate", "col_gate")
    leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_(n in req) for n in TENSORS}
    args = tuple(leaves[n] for n in TENSORS[:5])
    kwargs = dict(lora_a=leaves["lora_a"], lora_b=leaves["lora_b"], lora_scale=0.5)
    torch.library.opcheck(torch.ops.fg.gated_linear.default, args, kwargs)


def test_opcheck_gathered_linear(seed):
    gen = torch.Generator().manual_seed(seed)
    ri = torch.randperm(11, generator=gen)[:5].to(DEV)
    ci = torch.randperm(9, generator=gen)[:6].sort().values.to(DEV)
    x = torch.randn(4, 9, generator=gen).to(DEV).requires_grad_()
    w = torch.randn(5, 6, generator=gen).to(DEV).requires_grad_()
    b = torch.randn(5, generator=gen).to(DEV).requires_grad_()
    torch.library.opcheck(torch.ops.fg.gathered_linear.default, (x, w, b, ri, ci, 11))


def test_compile_fullgraph(seed):
    torch._dynamo.reset()
    inp = make_inputs(seed, (3, 40), 96, 80, lora_rank=4)
    names = ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b")

    def layer(x, w, b, rg, cg, la, lb):
        return torch.ops.fg.gated_linear(x, w, b, rg, cg, la, lb, 0.5).relu().sum()

    compiled = torch.compile(layer, fullgraph=True)
    results = []
    for fn in (layer, compiled):
        leaves = {n: None if inp[n] is None else inp[n].clone().requires_grad_(n in names) for n in TENSORS}
        out = fn(*[leaves[n] for n in TENSORS])
        gs = torch.autograd.grad(out, [leaves[n] for n in names])
        results.append((out.detach(), gs))
    (o1, g1), (o2, g2) = results
    assert rel_err(o2, o1) <= 1e-5
    for a, b in zip(g2, g1):
        assert rel_err(a, b) <= 1e-5


# --------------------------------------------------------------------------------------------
# No recompilation, no synchronisation, CUDA graphs
# --------------------------------------------------------------------------------------------


def _cache_sizes():
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    from fg_kernels.triton import _launch

    km = _launch.kernels(False)
    sizes = {}
    for name in ("gate_meta_kernel", "gmm_kernel", "mtm_kernel", "colsum_kernel"):
        k = getattr(km, name)
        tuned = len(k.cache) if isinstance(k, Autotuner) else 0
        while not isinstance(k, JITFunction):
            k = k.fn
        compiled = sum(len(c[0]) for c in k.device_caches.values())
        sizes[name] = (compiled, tuned)
    return sizes


def test_new_gate_patterns_do_not_recompile(seed):
    """1,000 different gate patterns through the same layer (forward; backward for 100 of them,
    gathered_linear with 100 index sets) add no compiled kernel and no autotuning entry after the
    first calls."""
    N, K, M = 384, 320, 256
    inp = make_inputs(seed, (M,), N, K, dtype=torch.bfloat16, lora_rank=8)
    names = ("x", "bias", "row_gate", "col_gate", "lora_a", "lora_b")
    gen = torch.Generator().manual_seed(seed)

    def step(sr, sc, backward):
        d = dict(inp)
        d["row_gate"] = make_gate(N, gen, sr).to(DEV, torch.bfloat16)
        d["col_gate"] = make_gate(K, gen, sc).to(DEV, torch.bfloat16)
        leaves = {n: None if d[n] is None else d[n].clone().requires_grad_(backward and n in names) for n in TENSORS}
        y = torch.ops.fg.gated_linear(*[leaves[n] for n in TENSORS], 0.5)
        if backward:
            torch.autograd.grad(y.float().sum(), [leaves[n] for n in names])

    def gathered(nr, nc):
        ri = torch.randperm(N, generator=gen)[:nr].to(DEV)
        ci = torch.randperm(K, generator=gen)[:nc].to(DEV)
        w = torch.randn(nr, nc, generator=gen).to(DEV, torch.bfloat16)
        torch.ops.fg.gathered_linear(inp["x"], w, None, ri, ci, N)

    # Warm-up: dense, sparse and empty patterns, forward and backward.
    for sr, sc in ((0.0, 0.0), (0.5, 0.3), (1.0, 1.0)):
        step(sr, sc, True)
    gathered(100, 90)
    torch.cuda.synchronize()
    before = _cache_sizes()
    assert before["gmm_kernel"][0] > 0
    rng = torch.Generator().manual_seed(seed + 1)
    for i in range(1000):
        s = torch.rand(2, generator=rng).tolist()
        step(s[0], s[1], backward=i % 10 == 0)
        if i % 10 == 0:
            gathered(int(torch.randint(1, N, (1,), generator=rng)), int(torch.randint(1, K, (1,), generator=rng)))
    torch.cuda.synchronize()
    assert _cache_sizes() == before


def test_no_host_synchronisation(seed):
    """gated_linear forward and backward never wait for the device."""
    inp = make_inputs(seed, (64,), 96, 80, dtype=torch.bfloat16, lora_rank=4)
    y = torch.ops.fg.gated_linear(*args_of(inp))  # compile / autotune outside the check
    go = torch.randn_like(y)
    mask = [True] * 7
    torch.ops.fg.gated_linear_backward(go, inp["x"], inp["weight"], inp["row_gate"], inp["col_gate"],
                                       inp["lora_a"], inp["lora_b"], 0.5, y, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = torch.ops.fg.gated_linear(*args_of(inp))
        torch.ops.fg.gated_linear_backward(go, inp["x"], inp["weight"], inp["row_gate"], inp["col_gate"],
                                           inp["lora_a"], inp["lora_b"], 0.5, y, mask)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_capture_follows_new_patterns(seed):
    """Sync-free kernels can be captured once and replayed with new gate values in place."""
    inp = make_inputs(seed, (128,), 160, 96, dtype=torch.bfloat16, lora_rank=4)
    args = args_of(inp)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            torch.ops.fg.gated_linear(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.fg.gated_linear(*args)
    gen = torch.Generator().manual_seed(seed)
    for sparsity in (0.0, 0.5, 0.9, 1.0):
        inp["row_gate"].copy_(make_gate(160, gen, sparsity))
        inp["col_gate"].copy_(make_gate(96, gen, sparsity))
        g.replay()
        torch.cuda.synchronize()
        expect = torch.ops.fg.gated_linear(*args_of(inp))
        assert torch.equal(out, expect), sparsity


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device(seed):
    inp = make_inputs(seed, (33,), 40, 30, lora_rank=2, device="cuda:1")
    out = torch.ops.fg.gated_linear(*args_of(inp))
    assert out.device == torch.device("cuda:1")
    truth, _ = ref(inp)
    assert rel_err(out, truth) <= 1e-5


def test_device_mismatch_is_an_error(seed):
    inp = make_inputs(seed, (3,), 5, 4)
    inp["weight"] = inp["weight"].cpu()
    with pytest.raises((ValueError, RuntimeError), match="weight"):
        torch.ops.fg.gated_linear(*args_of(inp))


def test_direct_triton_functions_on_cuda(seed):
    import fg_kernels.triton as ft

    inp = make_inputs(seed, (7, 9), 50, 45, dtype=torch.bfloat16, lora_rank=2)
    names = [n for n in TENSORS if inp[n] is not None]
    leaves = {n: inp[n].clone().requires_grad_() for n in names}
    full = {n: leaves.get(n) for n in TENSORS}
    y = ft.gated_linear(*[full[n] for n in TENSORS], 0.5)
    g1 = torch.autograd.grad(y.float().sum(), [leaves[n] for n in names])
    leaves2 = {n: inp[n].clone().requires_grad_() for n in names}
    full2 = {n: leaves2.get(n) for n in TENSORS}
    y2 = torch.ops.fg.gated_linear(*[full2[n] for n in TENSORS], 0.5)
    g2 = torch.autograd.grad(y2.float().sum(), [leaves2[n] for n in names])
    assert torch.equal(y, y2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
