"""finegates training layer: Gates, GatedLinear vs the plain-PyTorch reference, sparsify on a small
MLP, the regulariser driving the keep fraction to the target, compression_report, state, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import finegates
from finegates import GatedLinear, Gates
from fg_kernels.reference import gated_linear_ref


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed=0, d_in=16, hidden=64, d_out=8, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, d_out, bias=bias))


# ----------------------------------------------------------------------------- Gates


def test_gates_init_eval_and_keep_probability():
    torch.manual_seed(0)
    g = Gates(1000)
    assert abs(g.theta.mean().item() - 1.0) < 0.02 and abs(g.theta.std().item() - 0.1) < 0.02
    g.eval()
    assert torch.equal(g.values(), torch.ones(1000))  # tanh(~1) + 0.5 > 1 -> clamped to 1
    assert g.active().numel() == 1000
    with torch.no_grad():
        g.theta[:10] = -3.0  # mu = tanh(-3) ~ -0.995 -> eval gate 0
    assert g.active().numel() == 990 and g.active()[0].item() == 10
    mu = torch.tanh(g.theta.detach())
    want = 1 - 0.5 * (1 + torch.erf(((-0.5 - mu) / 0.5) / math.sqrt(2)))
    torch.testing.assert_close(g.keep_probability().detach(), want)


def test_gates_training_noise_is_seeded_and_matches_formula():
    g = Gates(50, sigma=0.3)
    with torch.no_grad():
        g.theta.uniform_(-1, 1)
    g.train()
    torch.manual_seed(5)
    a = g.values()
    torch.manual_seed(5)
    b = g.values()
    torch.manual_seed(5)
    eps = torch.randn(50) * 0.3
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a.detach(), torch.clamp(torch.tanh(g.theta.detach()) + 0.5 + eps, 0, 1))
    assert not torch.equal(a, g.values())  # fresh noise each call


def test_gates_nan_raises():
    g = Gates(4)
    with torch.no_grad():
        g.theta[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        g.values()


# ----------------------------------------------------------------------------- GatedLinear


@pytest.mark.parametrize("lora_rank", [0, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_gated_linear_matches_reference_with_same_noise(lora_rank, bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=bias)
    layer = GatedLinear(base, lora_rank=lora_rank, lora_alpha=6.0, train_weight=True, sigma=0.4)
    assert layer.weight is base.weight and (layer.bias is base.bias)
    assert (layer.bias is None) == (not bias)
    with torch.no_grad():  # gates spread over (0, 1) and some exactly 0 / 1
        layer.row_gates.theta.uniform_(-1.5, 1.5)
        layer.col_gates.theta.uniform_(-1.5, 1.5)
        if lora_rank:
            layer.lora_b.normal_()
    layer.train()
    x = torch.randn(3, 5, 12, requires_grad=True)
    params = [p for p in layer.parameters()] + [x]

    torch.manual_seed(123)
    y = layer(x)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, params, gy, allow_unused=True)

    torch.manual_seed(123)
    r, c = layer.gate_values()
    assert (r == 0).any() or (c == 0).any()
    y_ref = gated_linear_ref(x, layer.weight, layer.bias, r, c, layer.lora_a, layer.lora_b, layer.lora_scale)
    grads_ref = torch.autograd.grad(y_ref, params, gy, allow_unused=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for name_p, g, gr in zip([n for n, _ in layer.named_parameters()] + ["x"], grads, grads_ref):
        if gr is None:
            assert g is None or torch.count_nonzero(g) == 0, name_p
        else:
            torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5, msg=name_p)


def test_gated_linear_conv1d_transposed_weight():
    class Conv1D(nn.Module):  # the GPT-2 layout: weight (in, out), y = x @ W + b
        def __init__(self, nf, nx):
            super().__init__()
            self.nf = nf
            self.weight = nn.Parameter(torch.randn(nx, nf))
            self.bias = nn.Parameter(torch.randn(nf))

        def forward(self, x):
            return x @ self.weight + self.bias

    torch.manual_seed(0)
    conv = Conv1D(7, 5)
    x = torch.randn(4, 5)
    layer = GatedLinear(conv).eval()
    assert (layer.in_features, layer.out_features) == (5, 7)
    assert layer.weight is conv.weight
    torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=1e-6)


def test_bf16_input_with_fp32_gates():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = GatedLinear(base).eval()
    assert layer.row_gates.theta.dtype == torch.float32
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), base(x).float(), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- sparsify on an MLP


def test_sparsify_mlp_identity_trainable_and_storage():
    model = mlp()
    x = torch.randn(32, 16)
    model.eval()
    ref = model(x)
    ptr = [model[0].weight.data_ptr(), model[2].weight.data_ptr()]
    w0 = model[0].weight
    finegates.sparsify(model, target_sparsity=0.3, target_modules=["0", "2"], verbose=False)
    assert isinstance(model[0], GatedLinear) and model[0].weight is w0
    assert [model[0].weight.data_ptr(), model[2].weight.data_ptr()] == ptr
    model.eval()
    assert (model(x) - ref).abs().max().item() <= 1e-6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "0.bias", "0.row_gates.theta", "0.col_gates.theta", "2.bias", "2.row_gates.theta", "2.col_gates.theta",
    }
    assert finegates.trainable_parameters(model) == 64 + 64 + 16 + 8 + 8 + 64
    model.train()
    with torch.no_grad():  # open the gates' clamp so every gate receives gradient
        for m in (model[0], model[2]):
            m.row_gates.theta.fill_(0.3)
            m.col_gates.theta.fill_(0.3)
    (model(x).square().mean() + finegates.sparsity_loss(model)).backward()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, n
        else:
            assert p.grad is None, n
    assert [model[0].weight.data_ptr(), model[2].weight.data_ptr()] == ptr


def test_sparsify_lora_and_train_weights_flags():
    model = finegates.sparsify(mlp(), target_sparsity=0.2, target_modules=r"\d", lora_rank=4,
                               train_weights=True, train_bias=False, verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "0.lora_a" in trainable and "2.lora_b" in trainable and "0.weight" in trainable
    assert "0.bias" not in trainable
    assert model[0].target_sparsity == 0.2 and model[0].lora_scale == 1.0
    assert torch.count_nonzero(model[0].lora_b) == 0 and torch.count_nonzero(model[0].lora_a) > 0


def test_sparsify_takes_a_config_that_saves_and_loads(tmp_path):
    config = finegates.FineGatesConfig(target_sparsity=0.2, target_modules=("0", "2"), lora_rank=4,
                                       train_weights=True, train_bias=False, gate_dtype="float64")
    path = tmp_path / "finegates_config.json"
    config.save(path)
    loaded = finegates.FineGatesConfig.load(path)
    assert loaded == config and loaded.gate_dtype is torch.float64 and loaded.target_modules == ["0", "2"]
    torch.manual_seed(0)
    a = finegates.sparsify(mlp(), loaded, verbose=False)
    torch.manual_seed(0)
    b = finegates.sparsify(mlp(), verbose=False, **config.to_dict())
    assert {n: p.requires_grad for n, p in a.named_parameters()} == {n: p.requires_grad for n, p in b.named_parameters()}
    assert a[0].row_gates.theta.dtype == torch.float64 and a[0].lora_rank == 4
    with pytest.raises(TypeError, match="not both"):
        finegates.sparsify(mlp(), config, lora_rank=2)
    with pytest.raises(ValueError, match="unknown fields"):
        finegates.FineGatesConfig.from_dict({**config.to_dict(), "lora_dropout": 0.1})
    for bad, field in (({"target_sparsity": 1.0}, "target_sparsity"), ({"sigma": float("nan")}, "sigma"),
                       ({"lora_rank": 2.5}, "lora_rank"), ({"gate_dtype": "int8"}, "gate_dtype"),
                       ({"gate_gradient": "magic"}, "gate_gradient"),
                       # what a JSON file can hold and a keyword rarely does
                       ({"lora_alpha": float("nan")}, "lora_alpha"), ({"lora_alpha": -2.0}, "lora_alpha"),
                       ({"train_weights": "false"}, "train_weights"), ({"train_bias": 0}, "train_bias"),
                       ({"trainable_modules": "LayerNorm"}, r"trainable_modules.*for one module: \['LayerNorm'\]"),
                       ({"target_modules": [3]}, "target_modules"), ({"target_sparsity": True}, "target_sparsity"),
                       ({"kurtosis_tau": 0.0}, "kurtosis_tau")):
        with pytest.raises(ValueError, match=field):
            finegates.FineGatesConfig(**{"target_sparsity": 0.3, **bad})


def test_sparsify_never_adds_bias():
    model = finegates.sparsify(mlp(bias=False), target_sparsity=0.1, target_modules=["0"], verbose=False)
    assert model[0].bias is None and "0.bias" not in model.state_dict()


# ----------------------------------------------------------------------------- regulariser


def test_loss_formula_and_schedule():
    model = finegates.sparsify(mlp(), target_sparsity=0.25, target_modules=["0", "2"], verbose=False)
    want = 0.0
    for m in (model[0], model[2]):
        pr = m.row_gates.keep_probability().mean()
        pc = m.col_gates.keep_probability().mean()
        want += ((pr - 0.75).abs() + (pc - 0.75).abs()) / 2
    torch.testing.assert_close(finegates.sparsity_loss(model), want / 2)
    s = finegates.SparsitySchedule(2.0, start_step=10, warmup_steps=4)
    assert [s(i) for i in (0, 9, 10, 11, 13, 100)] == [0.0, 0.0, 0.5, 1.0, 2.0, 2.0]
    assert finegates.SparsitySchedule(3.0)(0) == 3.0
    c = finegates.SparsitySchedule(2.0, start_step=10, warmup_steps=4, shape="cubic")
    assert [c(i) for i in (9, 10, 11, 13, 100)] == [0.0, 2.0 * (1 - 0.75 ** 3), 2.0 * (1 - 0.5 ** 3), 2.0, 2.0]
    with pytest.raises(ValueError, match="shape"):
        finegates.SparsitySchedule(1.0, shape="exponential")


def test_kurtosis_weighting_needs_a_training_forward():
    model = finegates.sparsify(mlp(), target_sparsity=0.25, target_modules=["0", "2"], kurtosis=True, verbose=False)
    with pytest.raises(RuntimeError, match="kurtosis"):
        finegates.sparsity_loss(model, kurtosis=True)
    model.train()
    model(torch.randn(4, 6, 16))
    rw, cw, rows, cols = model[0].kurtosis_state
    torch.testing.assert_close(rw.sum(), torch.tensor(1.0))
    assert rw.numel() == rows.numel() == 64 and cw.numel() == 16
    loss = finegates.sparsity_loss(model, kurtosis=True)
    assert torch.isfinite(loss) and loss.requires_grad


def test_training_drives_keep_fraction_to_target():
    torch.manual_seed(0)
    teacher = mlp(seed=1)
    student = mlp(seed=0)
    target = 0.5
    finegates.sparsify(student, target_sparsity=target, target_modules=["0", "2"], train_weights=True, verbose=False)
    opt = torch.optim.Adam(
        [
            {"params": [p for n, p in student.named_parameters() if "gates" in n], "lr": 5e-2},
            {"params": [p for n, p in student.named_parameters() if "gates" not in n and p.requires_grad], "lr": 3e-3},
        ]
    )
    sched = finegates.SparsitySchedule(1.0, start_step=0, warmup_steps=50)
    xs = torch.randn(512, 16)
    with torch.no_grad():
        ys = teacher(xs)
    first = None
    student.train()
    for step in range(400):
        idx = torch.randint(0, 512, (64,))
        task = nn.functional.mse_loss(student(xs[idx]), ys[idx])
        loss = task + sched(step) * finegates.sparsity_loss(student)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if first is None:
            student.eval()
            with torch.no_grad():
                first = nn.functional.mse_loss(student(xs), ys).item()
            student.train()
    student.eval()
    with torch.no_grad():
        final = nn.functional.mse_loss(student(xs), ys).item()
    keep_p = torch.cat([g.keep_probability().detach() for m in (student[0], student[2]) for g in (m.row_gates, m.col_gates)])
    rep = finegates.compression_report(student)
    fracs = []
    for lay in rep["layers"]:
        fracs += [lay["active_rows"] / lay["out_features"], lay["active_cols"] / lay["in_features"]]
    mean_active = sum(fracs) / len(fracs)
    # The regulariser's quantity (mean keep probability) reaches the target ...
    assert abs(keep_p.mean().item() - (1 - target)) <= 0.05, keep_p.mean().item()
    # ... but the realised fraction of open (eval) gates is lower: with the reference's
    # P(g > 0) = 1 - Phi((-0.5 - mu) / 0.5), a fully closed gate (mu = -1) still counts
    # 1 - Phi(1) = 0.16 as "kept" and an open one (mu = 1) 0.9987, so a 0.5 keep target settles
    # near (0.5 - 0.159) / (0.9987 - 0.159) = 0.41 open gates.
    assert 0.25 <= mean_active <= 0.5, fracs
    assert final < 0.7 * first, (first, final)


# ----------------------------------------------------------------------------- report, state, bad input


def test_compression_report_counts():
    model = finegates.sparsify(mlp(), target_sparsity=0.5, target_modules=["0", "2"], lora_rank=2, verbose=False)
    with torch.no_grad():
        model[0].row_gates.theta[[1, 5, 7]] = -2.0
        model[0].col_gates.theta[[0, 3]] = -2.0
        model[2].col_gates.theta[:10] = -2.0
        model[2].row_gates.theta[2] = -2.0
    model.train()  # the report always uses eval gates
    rep = finegates.compression_report(model)
    n0 = 64 * 16 - 61 * 14 + 3
    n2 = 8 * 64 - 7 * 54 + 1
    assert [l["removed_params"] for l in rep["layers"]] == [n0, n2]
    assert [(l["active_rows"], l["active_cols"]) for l in rep["layers"]] == [(61, 14), (7, 54)]
    assert rep["params_removable"] == n0 + n2
    dense = 64 * 16 + 64 + 8 * 64 + 8  # the model without its gates and LoRA factors
    assert rep["params_total"] == rep["params_gated"] == dense
    assert rep["params_compact"] == dense - n0 - n2
    assert rep["removed_fraction"] == pytest.approx((n0 + n2) / rep["params_total"])
    # direct count: zero rows/cols of the effective weight
    model.eval()
    w_eff = model[0].row_gates.values()[:, None] * model[0].weight * model[0].col_gates.values()[None, :]
    assert int((w_eff != 0).sum()) == 61 * 14


def test_trainable_state_round_trip():
    model = finegates.sparsify(mlp(), target_sparsity=0.4, target_modules=["0", "2"], lora_rank=2, verbose=False)
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.row_gates.theta.uniform_(-1, 1.5)
            m.col_gates.theta.uniform_(-1, 1.5)
            m.lora_b.normal_()
            m.bias.add_(1.0)
    state = finegates.trainable_state_dict(model)
    assert "0.weight" not in state and "0.lora_a" in state and "2.row_gates.theta" in state and "0.bias" in state
    fresh = finegates.sparsify(mlp(), target_sparsity=0.4, target_modules=["0", "2"], lora_rank=2, verbose=False)
    finegates.load_trainable_state(fresh, state)
    x = torch.randn(20, 16)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))
    # the full state_dict round-trips too
    other = finegates.sparsify(mlp(seed=3), target_sparsity=0.4, target_modules=["0", "2"], lora_rank=2, verbose=False)
    other.load_state_dict(model.state_dict())
    other.eval()
    assert torch.equal(model(x), other(x))
    with pytest.raises(KeyError):
        finegates.load_trainable_state(mlp(), state)
    partial = {k: v for k, v in state.items() if k != "2.row_gates.theta"}
    with pytest.raises(KeyError, match=r"lacks 1 gate/LoRA tensors of the model, e.g. \['2.row_gates.theta'\]"):
        finegates.load_trainable_state(fresh, partial)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan")])
def test_bad_target_sparsity(bad):
    with pytest.raises(ValueError, match="target_sparsity"):
        finegates.sparsify(mlp(), target_sparsity=bad, target_modules=["0"], verbose=False)


@pytest.mark.parametrize("bad, name", [(dict(sigma=float("nan")), "sigma"), (dict(sigma=-0.1), "sigma"),
                                       (dict(lora_rank=2.7), "lora_rank"), (dict(lora_rank=True), "lora_rank"),
                                       (dict(lora_rank=-1), "lora_rank")])
def test_bad_sparsify_arguments_are_refused_by_name(bad, name):
    """NaN noise silently turned the noise off and a fractional rank was truncated."""
    with pytest.raises(ValueError, match=name):
        finegates.sparsify(mlp(), target_sparsity=0.2, target_modules=["0"], verbose=False, **bad)


def test_no_matching_module():
    with pytest.raises(ValueError, match="no nn.Linear"):
        finegates.sparsify(mlp(), target_sparsity=0.2, target_modules=["nonexistent"], verbose=False)
    with pytest.raises(ValueError, match="no nn.Linear"):
        finegates.sparsify(mlp(), target_sparsity=0.2, verbose=False)  # no transformer blocks


def test_second_sparsify_keeps_the_first_layers_trainable():
    """Attention and MLP with different targets: two calls; the first call's gates, LoRA and biases
    keep training, and each layer keeps its own target."""
    model = mlp()
    finegates.sparsify(model, target_sparsity=0.2, target_modules=["0"], lora_rank=2, verbose=False)
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    finegates.sparsify(model, target_sparsity=0.5, target_modules=["2"], verbose=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert first <= trainable and {"2.row_gates.theta", "2.col_gates.theta", "2.bias"} <= trainable
    assert (model[0].target_sparsity, model[2].target_sparsity) == (0.2, 0.5)
    with pytest.raises(ValueError, match=r"modules target_modules=\['0'\] selects are already gated \(e.g. 0\)"):
        finegates.sparsify(model, target_sparsity=0.3, target_modules=["0"], verbose=False)


def test_set_backend_rejects_unknown_backend():
    import finegates

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="backend"):
        finegates.set_backend(model, "cuda")


def test_gated_layer_compiles_without_graph_break():
    """The NaN check must not split the graph: fullgraph=True fails on any graph break."""
    torch.manual_seed(0)
    layer = GatedLinear(torch.nn.Linear(16, 8))
    layer.eval()
    x = torch.randn(3, 16)
    ref = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref)
    layer.train()  # sampled gates + backward through the op's autograd, still one graph
    compiled(x).square().sum().backward()
    assert layer.row_gates.theta.grad is not None and torch.isfinite(layer.row_gates.theta.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_layer_with_lora_under_autocast(dtype):
    """The fg ops have an autocast rule: x, weight, bias and LoRA run in the autocast dtype (no
    'mat1 and mat2 must have the same dtype'), gates stay float32 and get float32 gradients."""
    torch.manual_seed(0)
    model = mlp()
    finegates.sparsify(model, target_sparsity=0.3, target_modules=["0", "2"], lora_rank=2, verbose=False)
    with torch.no_grad():
        model[0].lora_b.normal_(0, 0.1)
    x = torch.randn(6, 16)
    model.eval()
    ref = model(x)
    with torch.autocast("cpu", dtype=dtype):
        out = model(x)
    assert out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < 2e-2
    model.train()
    with torch.autocast("cpu", dtype=dtype):
        loss = model(x).float().square().mean()
    loss.backward()
    layer = model[0]
    assert layer.row_gates.theta.grad.dtype == torch.float32 and layer.lora_a.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_a.grad).all()
    w_c, idx = torch.randn(5, 16), torch.tensor([0, 2, 4, 6, 8])
    with torch.autocast("cpu", dtype=dtype):
        y = finegates.GatheredLinear.from_block(w_c, None, idx, None, in_features=16, out_features=9)(x)
    assert y.dtype == dtype
