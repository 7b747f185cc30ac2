"""Build for dynkernels.

The C++ extension ``dynkernels._C`` always gets the CPU kernels. CUDA sources are
added when torch is a CUDA build and CUDA_HOME is found, or when FORCE_CUDA=1;
never from ``torch.cuda.is_available()``, since a build host may have no GPU.
``DYNKERNELS_CUDA=0`` leaves them out anyway. ``DYNKERNELS_NO_EXTENSION=1`` installs the pure-Python and Triton parts alone.
MAX_JOBS and TORCH_CUDA_ARCH_LIST are read by torch's BuildExtension.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern), recursive=True))


def cxx_standard(torch_version: str) -> str:
    """torch >= 2.14's headers require C++20; older ones are built as C++17
    (tests/test_build.py parses the CUDA glue with the same rule)."""
    major, minor = (int(x) for x in torch_version.split("+")[0].split(".")[:2])
    return "c++20" if (major, minor) >= (2, 14) else "c++17"


def _extensions():
    if os.environ.get("DYNKERNELS_NO_EXTENSION", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # DYNKERNELS_CUDA=0 leaves the CUDA sources out even with a CUDA build of
    # torch (scripts/setup.sh sets it where no NVIDIA driver is present, so a
    # CPU machine does not spend minutes compiling kernels it cannot run).
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        os.environ.get("DYNKERNELS_CUDA", "1") != "0" and torch.version.cuda is not None and CUDA_HOME is not None
    )
    sources = ["csrc/dynkernels.cpp"] + _sources("*/*_cpu.cpp")
    # -ffp-contract=off: the point ops promise bit-equal distances with the
    # reference, which a compiler-fused multiply-add would break.
    # -fopenmp: at::parallel_for expands to an inline `#pragma omp parallel`;
    # without the flag every "parallel" CPU kernel silently runs on one thread.
    # -fno-trapping-math: lets GCC if-convert float selects (clamps, maxima) so
    # those loops vectorise; results are unchanged (no FP exception is read).
    # -fno-math-errno: nothing reads errno, and a sqrt that may set it is a call the vectoriser cannot pass
    cxx = [
        "-O3",
        f"-std={cxx_standard(torch.__version__)}",
        "-ffp-contract=off",
        "-fno-trapping-math",
        "-fno-math-errno",
    ]
    cxx += ["-fvisibility=hidden", "-fopenmp"]
    link = ["-fopenmp"]
    define_macros = [("DYNKERNELS_TORCH_VERSION", f'"{torch.__version__}"')]
    if with_cuda:
        sources += _sources("*/*_cuda.cpp") + _sources("*/*_kernel.cu")
        define_macros.append(("WITH_CUDA", None))
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        define_macros.append(("DYNKERNELS_CUDA_ARCH_LIST", f'"{arch_list or "torch default"}"'))
        ext = CUDAExtension(
            "dynkernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--fmad=false", "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension(
            "dynkernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["dynkernels", "dynkernels.*"]) + ["dynkernels.triton_kernels"],
    package_dir={"dynkernels.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
