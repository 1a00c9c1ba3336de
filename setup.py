"""Build of the optional C kernels (lpcli/_kernels.c); the project's metadata is in pyproject.toml.

The extension is optional: where no C compiler is found, the install goes on and lpcli
runs its torch kernels instead (same results, slower on the CPU). The wheel also carries
the checkout's recipes/ as lpcli/recipes.
"""

import shutil
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

if sys.platform == "win32":
    flags = ["/O2", "/fp:precise"]
else:
    # No contraction into fused multiply-adds: the kernels must round exactly as torch's do.
    # No trapping math: lets floor/trunc vectorize; nothing reads the floating-point flags.
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c11"]


class BuildPyWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "lpcli" / "recipes"
        if Path("recipes").is_dir():
            shutil.copytree("recipes", target, dirs_exist_ok=True)


setup(
    ext_modules=[Extension("lpcli._kernels", ["lpcli/_kernels.c"], extra_compile_args=flags, optional=True)],
    cmdclass={"build_py": BuildPyWithRecipes},
)
