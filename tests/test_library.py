"""Loading the compiled library: present in a real install, loud (not silent) when missing."""

import subprocess
import sys
import textwrap

import torch

import fg_kernels


def test_compiled_library_is_loaded():
    assert fg_kernels.library_loaded(), "fg_kernels._C failed to load: rebuild the extension"
    for name in ("gated_linear", "gated_linear_backward", "gathered_linear"):
        assert hasattr(torch.ops.fg, name), f"torch.ops.fg.{name} is not registered"


def _assert_loud_without_library(code: str) -> None:
    """Runs ``code`` in a fresh interpreter in which importing fg_kernels._C fails, as on a broken
    install; the code prints LOUD once it has seen the rebuild hint."""
    code = 'import sys\nsys.modules["fg_kernels._C"] = None  # `from . import _C` raises ImportError\n' + code
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOUD" in out.stdout


def test_missing_library_warns_on_import_and_op_names_the_fix():
    _assert_loud_without_library(textwrap.dedent(
        """
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fg_kernels
        assert any("fg_kernels._C" in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert not fg_kernels.library_loaded()
        import torch
        try:
            fg_kernels.gated_linear(torch.ones(1, 2), torch.ones(3, 2), None, torch.ones(3), torch.ones(2))
        except RuntimeError as err:
            assert "pip install --no-build-isolation" in str(err), str(err)
            print("LOUD")
        """
    ))


def test_one_autograd_path():
    """No hand-written torch.autograd.Function anywhere in fg_kernels: every backend's autograd is
    the one registered by fg_kernels.registration (whose only Function is the guard that refuses a
    double backward: no gradient formula)."""
    import importlib
    import pkgutil

    import fg_kernels

    found = []
    for info in pkgutil.walk_packages(fg_kernels.__path__, "fg_kernels."):
        if info.name.endswith(("._C", "._compile_check")):
            continue
        if info.name == "fg_kernels.registration":
            assert [n for n, v in vars(importlib.import_module(info.name)).items() if isinstance(v, type)
                    and issubclass(v, torch.autograd.Function)] == ["_OnceDifferentiable"]
            continue
        try:
            mod = importlib.import_module(info.name)
        except ImportError:  # fg_kernels.triton without triton installed
            continue
        found += [f"{info.name}.{n}" for n, v in vars(mod).items()
                  if isinstance(v, type) and issubclass(v, torch.autograd.Function) and v.__module__ == info.name]
    assert not found, f"autograd.Function subclasses in fg_kernels: {found}"


def test_missing_library_reaches_finegates_users_with_the_fix():
    """The training layer calls the ops through fg_kernels, so a broken install says how to rebuild."""
    _assert_loud_without_library(textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("ignore")
        import torch, finegates
        layer = finegates.GatedLinear(torch.nn.Linear(4, 3))
        try:
            layer(torch.ones(2, 4))
        except RuntimeError as err:
            assert "pip install --no-build-isolation" in str(err), str(err)
            print("LOUD")
        """
    ))
