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


def test_missing_library_warns_on_import_and_op_names_the_fix():
    # A fresh interpreter in which importing fg_kernels._C fails, as on a broken install.
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["fg_kernels._C"] = None  # makes `from . import _C` raise ImportError
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
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOUD" in out.stdout
