"""Builds kdfast and its C++ CPU backend ``kdfast._C``.

    pip install -e . --no-build-isolation      # uses the torch already installed (never pulls one)

The row kernel is compiled once per ISA (csrc/kernel_<isa>.cpp, each with its own -m flags, as ATen
compiles its kernels) and chosen at run time, so the build never uses -march=native and the binary
runs on any CPU of its architecture.
"""
import concurrent.futures
import os
import platform

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
sources = ["csrc/kdfast.cpp", "csrc/grad_pool.cpp", "csrc/kernel_default.cpp"]
if x86:
    sources += ["csrc/kernel_avx2.cpp", "csrc/kernel_avx512.cpp"]

# per-file ISA flags: only these translation units may contain AVX2 / AVX-512 instructions
ISA_FLAGS = {
    "kernel_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "kernel_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
                          "-mf16c"],
}


class Build(BuildExtension):
    """torch's BuildExtension (ninja), plus per-source compiler flags (ISA_FLAGS): the sources of an
    extension are compiled in groups of equal flags."""

    def build_extension(self, ext):
        inner = self.compiler.compile  # torch's ninja wrapper, installed by build_extensions()

        def compile_groups(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                           extra_preargs=None, extra_postargs=None, depends=None):
            groups = {}
            for src in sources:
                groups.setdefault(tuple(ISA_FLAGS.get(os.path.basename(src), ())), []).append(src)

            def one(i, flags, group):
                post = dict(extra_postargs) if isinstance(extra_postargs, dict) else {"cxx": list(extra_postargs or [])}
                post["cxx"] = list(post["cxx"]) + list(flags)
                # each group in its own directory: its own build.ninja, so the groups can run at once
                return inner(group, output_dir=os.path.join(output_dir or ".", f"isa{i}"), macros=macros,
                             include_dirs=include_dirs, debug=debug, extra_preargs=extra_preargs,
                             extra_postargs=post, depends=depends)

            # The groups run concurrently (one ninja each): the kernel translation units are the
            # long part of the build and otherwise wait for each other.
            with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:
                futures = [pool.submit(one, i, flags, group) for i, (flags, group) in enumerate(groups.items())]
                return [obj for f in futures for obj in f.result()]

        self.compiler.compile = compile_groups
        try:
            super().build_extension(ext)
        finally:
            self.compiler.compile = inner


cxx_flags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unknown-pragmas"]
if os.environ.get("KDFAST_DEBUG"):
    cxx_flags = ["-O0", "-g", "-fopenmp"]

setup(
    name="kdfast",
    version="0.1.0",
    description="Fused knowledge-distillation losses for PyTorch (C++ CPU and Triton GPU kernels)",
    packages=find_packages(include=["kdfast", "kdfast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    # hf: the Hugging Face drop-ins (kdfast.integrations, docs/integrations.md)
    extras_require={"gpu": ["triton>=3.2"], "test": ["pytest", "pytest-benchmark", "numpy"],
                    "vision": ["torchvision"],
                    "hf": ["transformers", "trl", "datasets", "tokenizers"]},
    ext_modules=[
        CppExtension(
            "kdfast._C",
            sources=sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
)
