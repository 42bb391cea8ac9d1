"""Builds nanollama's C++ extensions (everything else lives in pyproject.toml).

The extensions talk to Python through pybind11 over numpy buffers, never through torch's C++ API,
so one build serves every torch version. Each is optional: where no compiler exists the build
warns and the package falls back to its numpy reference.
"""

from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

CSRC = Path(__file__).parent / "csrc"

# module name -> C++ source; a source that does not exist yet is simply not built.
EXTENSIONS = {"nanollama._gssm_sampler": "csrc/gssm_sampler.cpp"}

# -ffp-contract=off: no FMA contraction, so the C++ GSSM sampler rounds exactly as numpy does (it
# matches the reference bit for bit); -pthread: the samplers run std::threads over the batch.
ext_modules = [
    Pybind11Extension(
        name,
        [src],
        cxx_std=17,
        extra_compile_args=["-O3", "-ffp-contract=off", "-pthread"],
        extra_link_args=["-pthread"],
        optional=True,
    )
    for name, src in EXTENSIONS.items()
    if (Path(__file__).parent / src).exists()
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
