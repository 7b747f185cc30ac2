"""Build-level checks: CUDA sources compile on a machine without a GPU, and
the package imports without its optional parts."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc").rglob("*_kernel.cu"))
GLUE_FILES = sorted((ROOT / "csrc").rglob("*_cuda.cpp"))
ARCHS = ("80", "90")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cuda_kernel_compiles(source, tmp_path):
    """Every *_kernel.cu includes CUDA headers only, so plain nvcc builds it
    for sm_80 and sm_90 here; ptxas must report no spills."""
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [
        "nvcc",
        "-c",
        "-std=c++17",
        "--fmad=false",
        "-Xptxas",
        "-v",
        *gencode,
        "-I",
        str(ROOT / "csrc"),
        str(source),
        "-o",
        str(tmp_path / "out.o"),
    ]
    result = _run(cmd)
    report = result.stdout + result.stderr
    assert result.returncode == 0, f"nvcc failed for {source.name}:\n{report}"
    spills = [line for line in report.splitlines() if "spill" in line and not line.strip().startswith("0 bytes")]
    assert all(" 0 bytes spill stores, 0 bytes spill loads" in line for line in spills), report


@pytest.fixture(scope="module")
def glue_flags(tmp_path_factory):
    """g++ flags that parse the CUDA glue against torch's headers, with those
    headers precompiled once (parsing them is ~12 s a file; the precompiled
    header makes each file about a second). A CPU wheel lacks one generated
    CMake header of c10/cuda: a one-line shim stands in for it (macros only)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not on PATH")
    torch_include = Path(torch.__file__).parent / "include"
    from torch.utils.cpp_extension import CUDA_HOME

    # CUDA_HOME as torch guesses it can be /usr/local (from a wrapper nvcc in /usr/local/bin)
    candidates = [Path(CUDA_HOME or "/usr/local/cuda") / "include", Path("/usr/local/cuda/include")]
    cuda_include = next((c for c in candidates if (c / "cuda_runtime.h").exists()), candidates[0])
    if not (torch_include / "c10" / "cuda" / "CUDAStream.h").exists() or not (cuda_include / "cuda_runtime.h").exists():
        pytest.skip("torch's c10/cuda headers or the CUDA runtime headers are missing")
    tmp = tmp_path_factory.mktemp("glue")
    shim = tmp / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        (shim / "cuda_cmake_macros.h").write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    flags = ["-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17", "-DWITH_CUDA"]  # as setup.py builds
    for include in (
        ROOT / "csrc",
        tmp,
        torch_include,
        torch_include / "torch" / "csrc" / "api" / "include",
        cuda_include,
        Path(sysconfig.get_paths()["include"]),
    ):
        flags += ["-I", str(include)]
    header = tmp / "glue_pch.h"
    header.write_text('#include "common/cuda_glue.h"\n')
    result = _run(["g++", *flags, "-x", "c++-header", str(header), "-o", str(header) + ".gch"])
    assert result.returncode == 0, f"common/cuda_glue.h does not parse:\n{result.stderr[-4000:]}"
    return [*flags, "-include", str(header)]


def test_cuda_glue_parses(glue_flags):
    """The torch glue of every CUDA kernel parses against torch's headers (all
    files at once, one g++ per core)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda src: (src, _run(["g++", *glue_flags, "-fsyntax-only", str(src)])), GLUE_FILES)
        failed = [f"{src.name}:\n{r.stderr[-3000:]}" for src, r in results if r.returncode != 0]
    assert GLUE_FILES and not failed, "\n".join(failed)


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-c", code], env={**os.environ, **env}, cwd=str(ROOT))


# What auto falls back to without a piece, and how the explicit backend says so.
_WITHOUT = {
    "extension": (
        dict(DYNKERNELS_DISABLE_EXTENSION="1"),
        "",
        "x = torch.rand(1, 50, 3)\n"
        "assert dynkernels.info()['extension']['built'] is False\n"
        "got, want = ops.furthest_point_sample(x, 5), dynkernels.reference.furthest_point_sample(x, 5)\n",
        "ops.furthest_point_sample(x, 5, backend='cpp')",
        "pip install --no-build-isolation -e .",
    ),
    "triton": (
        dict(TRITON_INTERPRET="1"),
        "import sys; sys.modules['triton'] = None\n",
        "f, i = torch.rand(1, 4, 9), torch.zeros(1, 3, dtype=torch.long)\n"
        "got, want = ops.gather_points(f, i), dynkernels.reference.gather_points(f, i)\n",
        "ops.gather_points(f, i, backend='triton')",
        "triton",
    ),
}


@pytest.mark.parametrize("missing", sorted(_WITHOUT))
def test_import_without(missing):
    env, prelude, auto, explicit, hint = _WITHOUT[missing]
    code = (
        f"{prelude}import torch, dynkernels\nfrom dynkernels import ops\n{auto}"
        "assert torch.equal(got, want)\n"  # auto falls back to the reference
        f"try:\n    {explicit}\n"
        f"except dynkernels.BackendUnavailableError as e:\n    assert {hint!r} in str(e), e\n"
        "else:\n    raise SystemExit('the explicit backend did not raise')\n"
        "print('ok')\n"
    )
    result = _python(code, **env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_info_cli():
    result = _run([sys.executable, "-m", "dynkernels", "info"], cwd=str(ROOT))
    assert result.returncode == 0, result.stderr
    assert "extension:" in result.stdout and "cpu   cpp" in result.stdout


def test_timm_and_torchvision_import_with_this_torch():
    """The test and bench extras' anchors load against the installed torch
    (scripts/setup.sh installs a torch / torchvision pair that does)."""
    import timm
    import torchvision

    assert torchvision.__version__ and timm.__version__
    conv = timm.layers.CondConv2d(4, 6, 3, num_experts=2)  # the dynamic-convolution family's anchor
    routing = torch.softmax(torch.randn(1, 2), -1)
    assert conv(torch.randn(1, 4, 8, 8), routing).shape[:2] == (1, 6)
