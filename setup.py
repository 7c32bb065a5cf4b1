"""Builds fg_kernels._C, the C++/OpenMP CPU kernels and the schemas of the `fg` ops.

Install torch first, then build against it without build isolation (a build-isolated install
would fetch a second, multi-GB torch):

    pip install torch==2.13.0
    pip install --no-build-isolation -e .

The extension is CPU-only C++: the CUDA kernels are Triton, compiled at run time.
"""

import glob
import os

from setuptools import setup

try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError as err:  # pragma: no cover - a clear message instead of a traceback
    raise SystemExit(
        "fg_kernels builds against an installed PyTorch: run `pip install torch` first, then "
        "`pip install --no-build-isolation .`"
    ) from err


def extension_sources():
    """Every C++ source of the library (schemas + CPU kernels); tests in csrc/test are not."""
    sources = glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
    return sorted(sources)


def compile_args():
    args = ["-O3", "-fopenmp", "-std=c++17", "-Wall", "-Wno-unused-function"]
    if os.environ.get("FG_DEBUG", "0") == "1":
        args = ["-O0", "-g", "-fopenmp", "-std=c++17", "-Wall"]
    return args


setup(
    ext_modules=[
        CppExtension(
            name="fg_kernels._C",
            sources=extension_sources(),
            extra_compile_args={"cxx": compile_args()},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
