"""What only the Triton kernels have to show, checked on the CPU without a GPU (values, gradients,
gradcheck, opcheck and bad input of the Triton kernels run in the shared suites, as the ``triton``
backend of ``conftest.BACKENDS``):

* active counts and index lists are runtime arguments (never ``tl.constexpr``), and a new sparsity
  pattern launches every kernel with exactly the same compile-relevant arguments;
* the host never reads device data (no synchronisation on a GPU);
* every kernel variant compiles for sm_90 and sm_80 with Triton's bundled compiler;
* a whole sparsified model gives the same loss and gradients through the C++ and Triton kernels.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TRITON_SKIP_REASON, grad_names, make_gated_inputs, pattern_gates

if TRITON_SKIP_REASON is not None:
    pytest.skip(f"Triton interpreter: {TRITON_SKIP_REASON}", allow_module_level=True)

import triton  # noqa: E402

import fg_kernels.triton as ft  # noqa: E402
from fg_kernels.triton import _launch  # noqa: E402

THIS_FILE = Path(__file__).resolve()
KERNEL_NAMES = ("gate_meta_kernel", "pack_kernel", "gmm_full_kernel", "gmm_compact_kernel", "mtm_kernel",
                "colsum_kernel")
# Everything a kernel is specialised on (tl.constexpr): block sizes, the route and structural flags only.
ALLOWED_CONSTEXPR = {
    "BLOCK", "BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "BLOCK_C", "BLOCK_P", "BLOCK_Q", "GROUP_M", "GROUP_P",
    "ROUTE", "K_DYN", "N_SCATTER", "B_ROW_GATHER", "HAS_KVAL", "HAS_NVAL", "HAS_BIAS", "HAS_LORA", "HAS_AUX",
    "STORE_OUT", "IDX64", "DOT_PREC", "P_SCATTER", "Q_SCATTER", "HAS_PVAL", "HAS_QVAL", "NEED_B", "NEED_G",
    "ROW_GATHER", "ROW_DYN", "HAS_RVAL", "COL_GATHER", "COL_DYN", "HAS_CVAL",
}


def _raw_fn(k):
    while not inspect.isfunction(k):
        k = k.fn
    return k


def _leaves(inp):
    return inp.map(lambda n, t: t.clone().requires_grad_())


@pytest.mark.parametrize("interpret", [True, False], ids=["interpreted", "compiled"])
def test_active_counts_are_runtime_arguments(interpret):
    """Counts and index lists are pointers to device data, never tl.constexpr; the compiled
    kernels do not specialise on the scalars that can vary per pattern, and autotuning keys are
    full sizes, a token bucket and flags."""
    km = _launch.kernel_module(interpret)
    for name in KERNEL_NAMES:
        fn = _raw_fn(getattr(km, name))
        params = inspect.signature(fn).parameters
        constexprs = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert constexprs <= ALLOWED_CONSTEXPR, f"{name}: unexpected constexpr {constexprs - ALLOWED_CONSTEXPR}"
        for n in params:
            if any(s in n for s in ("cnt", "idx", "order", "vals", "val_ptr")):
                assert n.endswith("_ptr") and n not in constexprs, f"{name}: {n} must be a runtime pointer"
    assert "n0" in _raw_fn(km.gate_meta_kernel).__code__.co_varnames
    if not interpret:
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        gm = km.gate_meta_kernel
        assert isinstance(gm, JITFunction) and {"n0", "n1"} <= set(gm.do_not_specialize)
        compact = km.gmm_compact_kernel
        while not isinstance(compact, JITFunction):
            compact = compact.fn
        assert "k_len" in compact.do_not_specialize  # a compact layer's width, not a compile key
        for name in ("gmm_full_kernel", "gmm_compact_kernel", "mtm_kernel"):
            k = getattr(km, name)
            if isinstance(k, Autotuner):
                assert not any("cnt" in key or "idx" in key or key == "k_len" for key in k.keys), k.keys
                assert "M_BUCKET" in k.keys and "M" not in k.keys, k.keys


@pytest.mark.parametrize("arch", [90, 80], ids=["sm90", "sm80"])
def test_compiled_kernels_build_for_gpu_targets(arch):
    """The compiled (non-interpreted) kernels lower to PTX and SASS for Hopper and Ampere with
    triton's bundled compiler, no GPU needed: catches what the interpreter cannot (e.g. types that
    differ between the branches of an `if`), and ptxas reports no register spill and no serialized
    wgmma (C7515) for the bfloat16 launches. Runs in a subprocess without TRITON_INTERPRET."""
    nvidia_bin = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not nvidia_bin.exists():
        pytest.skip("triton's NVIDIA backend (bundled ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["FG_TRITON_AUTOTUNE"] = "0"
    cmd = [sys.executable, "-m", "fg_kernels.triton._compile_check", "--quick", "--strict", "--arch", str(arch)]
    res = subprocess.run(cmd, env=env, cwd=str(THIS_FILE.parent.parent), capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert res.stdout.count("ok ") >= 11, res.stdout


def test_launch_arguments_do_not_depend_on_the_pattern(monkeypatch, seed):
    """Every launch of every kernel, over forward + backward, gets the same grid, the same
    non-tensor arguments (the compile cache key: constexprs and scalar specialisations) and the
    same tensor dtypes and shapes for 8 different gate patterns, from all-zero to all-one."""
    km = _launch.kernel_module(True)
    log = []

    def spy(name, kernel):
        orig_run = kernel.run

        def described(a):
            return ("T", str(a.dtype), tuple(a.shape)) if isinstance(a, torch.Tensor) else a

        def run(*args, grid, warmup, **kwargs):
            sig = tuple(described(a) for a in args)
            kw = tuple(sorted((k, described(v)) for k, v in kwargs.items()))
            log.append((name, sig, kw, grid if not callable(grid) else "fn"))
            return orig_run(*args, grid=grid, warmup=warmup, **kwargs)

        monkeypatch.setattr(kernel, "run", run)

    for name in KERNEL_NAMES:
        spy(name, getattr(km, name))
    runs = []
    for i, pattern in enumerate(["binary_sparse", "all_zero", "all_one", "very_sparse", "rows_zero",
                                 "rows_dense_cols_sparse", "first_last_only", "binary_sparse"]):
        inp = make_gated_inputs(seed + 17 * i, (5,), 21, 19, lora_rank=3, lora_scale=0.5)
        inp.row_gate, inp.col_gate = pattern_gates(pattern, 21, 19, torch.Generator().manual_seed(seed + i))
        leaves = _leaves(inp)
        log.clear()
        y = ft.gated_linear(*leaves.args(), **leaves.kwargs())
        torch.autograd.grad(y, [getattr(leaves, n) for n in grad_names(inp)], torch.ones_like(y))
        runs.append(list(log))
    assert len(runs[0]) >= 8
    for pattern_log in runs[1:]:
        assert pattern_log == runs[0]


def test_no_host_synchronisation(monkeypatch, seed):
    """The host never reads device data (counts, indices, gate values) in gated_linear forward or
    backward: on a GPU nothing waits for the device and CUDA graphs can capture the op."""
    inp = make_gated_inputs(seed, (6,), 13, 11, lora_rank=2)
    leaves = _leaves(inp)

    def forbidden(*a, **k):
        raise AssertionError("host read of device data (a synchronisation on a GPU)")

    for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, attr, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    y = ft.gated_linear(*leaves.args(), **leaves.kwargs())
    torch.autograd.grad(y, [getattr(leaves, n) for n in grad_names(inp)], torch.ones_like(y))


def test_sparsified_model_same_through_cpu_kernel_and_triton():
    """A tiny LLaMA with gates (some closed) gives the same loss and gate gradients through
    torch.ops.fg (C++ on CPU) and through fg_kernels.triton under the interpreter."""
    transformers = pytest.importorskip("transformers")
    import finegates

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    finegates.sparsify(model, target_sparsity=0.3, lora_rank=2)
    with torch.no_grad():
        for _, layer in finegates.gated_layers(model):
            for gates in (layer.row_gates, layer.col_gates):
                closed = torch.rand(gates.theta.shape) < 0.3
                gates.theta.masked_fill_(closed, -5.0)
            layer.lora_b.normal_(0, 0.1)  # non-zero LoRA so its path is exercised too
    ids = torch.randint(0, 64, (2, 9))

    def loss_and_grads(backend):
        finegates.set_backend(model, backend)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss_cpu, g_cpu = loss_and_grads("ops")
    loss_tri, g_tri = loss_and_grads("triton")
    finegates.set_backend(model, "ops")
    assert any("theta" in n for n in g_cpu) and any("lora" in n for n in g_cpu)
    assert g_cpu.keys() == g_tri.keys()
    torch.testing.assert_close(loss_tri, loss_cpu, rtol=1e-5, atol=1e-6)
    for n in g_cpu:
        torch.testing.assert_close(g_tri[n], g_cpu[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def test_direct_functions_are_the_registered_ops(seed):
    """``fg_kernels.triton.gated_linear`` / ``gathered_linear`` are ``torch.ops.fg_triton.*``."""
    inp = make_gated_inputs(seed, (4,), 9, 7, lora_rank=2, lora_scale=0.5)
    assert torch.equal(ft.gated_linear(*inp.args(), **inp.kwargs()),
                       torch.ops.fg_triton.gated_linear(*inp.args(), **inp.kwargs()))
    x, w = inp.x, inp.weight[:4]
    idx = torch.tensor([0, 5, 2, 8])
    assert torch.equal(ft.gathered_linear(x, w, None, idx, None, 9),
                       torch.ops.fg_triton.gathered_linear(x, w, None, idx, None, 9))


def test_autotuning_runs_once_per_key_on_a_representative_pattern(monkeypatch):
    """The first launch of an autotuning key first runs the kernel on a 60%-active pattern with
    scratch outputs (so an all-open first call does not leave the compact kernels nothing to time);
    later launches of the same key run once, on the real arguments only."""
    calls = []

    class FakeAutotuned:
        keys = ["N_FULL", "ROUTE"]

        def __getitem__(self, grid):
            return lambda **kw: calls.append(kw)

    kernel = FakeAutotuned()
    monkeypatch.setattr(_launch, "_TUNED", set())
    n_cnt = torch.full((1,), 40, dtype=torch.int32)
    out = torch.zeros(3, 40)
    rmeta = _launch.GateMeta(order=torch.arange(40, dtype=torch.int32), vals=torch.ones(40), cnt=n_cnt, n=40)
    cmeta = _launch.GateMeta(order=torch.arange(10, dtype=torch.int32), vals=torch.ones(10),
                             cnt=torch.full((1,), 10, dtype=torch.int32), n=10)
    _, compact = _launch.routes(rmeta, cmeta)
    args = dict(out_ptr=out, n_cnt_ptr=n_cnt, N_FULL=40, **compact.args(out))
    tuning = {**_launch._route_tuning(compact), "out_ptr": out, "n_cnt_ptr": 24}
    for _ in range(3):
        _launch._launch(kernel, (1,), args, None, tuning)
    assert len(calls) == 4  # one tuning launch, then the three real ones
    tune, real = calls[0], calls[1]
    assert tune["out_ptr"] is not out and tune["out_ptr"].shape == out.shape
    assert tune["n_cnt_ptr"].tolist() == [24]
    assert tune["route0_cnt_ptr"].tolist() == [24] and tune["route1_cnt_ptr"].tolist() == [6]  # not all open
    assert all(c["out_ptr"] is out and c["n_cnt_ptr"] is n_cnt for c in calls[1:])
    assert real["ROUTE"] == _launch.COMPACT
    full, _ = _launch.routes(rmeta, cmeta)
    assert list(_launch._route_tuning(full).values()) == [40, 10]  # the full route tunes all open
