"""Builds sparsekern._C: the C++ CPU kernels always, the CUDA kernels when a CUDA torch and nvcc exist.

Switches (printed at build time):
  SPARSEKERN_CPP=0    build no extension at all (pure-Python install: reference and Triton backends only)
  SPARSEKERN_CUDA=1   force the CUDA sources in;  SPARSEKERN_CUDA=0  leave them out
  TORCH_CUDA_ARCH_LIST  architectures for the CUDA build, as torch reads it
A switch set to another value stops the build with an error naming it (both are checked, whichever decides), and
so does SPARSEKERN_CUDA=1 where no CUDA toolkit is found.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# The bare name `triton_kernels` belongs to Triton's own package; ours installs under sparsekern.
PACKAGES = find_packages(include=["sparsekern", "sparsekern.*"]) + ["sparsekern.triton_kernels"]
PACKAGE_DIR = {"sparsekern": "sparsekern", "sparsekern.triton_kernels": "triton_kernels"}


def _say(message):
    print(f"[sparsekern build] {message}", file=sys.stderr)


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _switch(name):
    """The value of the on/off switch `name`: "0", "1" or "" (unset). Another (`yes`, `on`) would pass for
    the default without a word: refused, naming it, before anything is built."""
    value = os.environ.get(name, "")
    if value not in ("", "0", "1"):
        sys.exit(f"[sparsekern build] error: {name} must be 0 or 1 (or unset), got {value!r}")
    return value


def _cuda_decision(torch, cuda_home, flag):
    if flag == "0":
        return False, "SPARSEKERN_CUDA=0"
    if flag == "1":
        if not cuda_home:   # torch's CUDAExtension raised its own OSError, a traceback naming no switch
            sys.exit("[sparsekern build] error: SPARSEKERN_CUDA=1 forces the CUDA kernels in, but no CUDA toolkit "
                     "was found: set CUDA_HOME to one, or unset SPARSEKERN_CUDA")
        return True, "SPARSEKERN_CUDA=1"
    # Gate on a CUDA build of torch plus nvcc, never on torch.cuda.is_available():
    # a build host without a GPU must still produce the CUDA kernels.
    if not torch.version.cuda:
        return False, "torch is a CPU build"
    if not cuda_home:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, toolkit at {cuda_home}"


def _extensions():
    # Both switches first: SPARSEKERN_CPP=0 decides alone, but a bad SPARSEKERN_CUDA beside it is still a mistake.
    cpp, cuda = _switch("SPARSEKERN_CPP"), _switch("SPARSEKERN_CUDA")
    if cpp == "0":
        _say("SPARSEKERN_CPP=0: no compiled extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # No -std flag: BuildExtension adds the standard this torch's headers need (C++20 from torch 2.14).
    cxx_flags = ["-O3"]
    if sys.platform.startswith("linux"):
        cxx_flags.append("-fopenmp")  # at::parallel_for is OpenMP-backed in torch's Linux wheels
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    use_cuda, why = _cuda_decision(torch, CUDA_HOME, cuda)
    _say(f"C++ CPU kernels: yes; CUDA kernels: {'yes' if use_cuda else 'no'} ({why})")
    if use_cuda:
        sources += _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*_cuda.cpp")
        extension = CUDAExtension(
            "sparsekern._C",
            sources,
            extra_compile_args={"cxx": cxx_flags + ["-DSPARSEKERN_WITH_CUDA"],
                                "nvcc": ["-O3", "-DSPARSEKERN_WITH_CUDA"]},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    else:
        extension = CppExtension(
            "sparsekern._C",
            sources,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if "-fopenmp" in cxx_flags else [],
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
