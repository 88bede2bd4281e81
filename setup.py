"""Package set-up. The C++ CPU kernels in csrc/ are built as a torch extension
(`treepo_kernels._C`, ops under torch.ops.treepo) when torch is importable at build time, i.e. with
`pip install --no-build-isolation` (the README's set-up). Otherwise (`pip install .` and
`pip install -e .` build in an isolated environment without torch) no `_C` is built and the first
use builds the same sources with the same flags just in time against the installed torch, cached
(treepo_kernels/ext.py, docs/kernels.md "How the extension is built"); csrc/ is shipped inside the
wheel as treepo_kernels/csrc for that. A failed compile is a notice, never a failed install: the
engine then falls back to the plain-PyTorch attention (`treepo info` says which).

TREEPO_NO_EXT=1 skips the extension; TREEPO_NATIVE=0 builds without -march=native (for a
binary that must run on other CPUs)."""
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

# the source list and flags are the JIT build's (ext.py is stdlib-only at import: no torch needed)
_spec = importlib.util.spec_from_file_location("_treepo_ext", Path(__file__).parent / "treepo_kernels" / "ext.py")
ext = sys.modules["_treepo_ext"] = importlib.util.module_from_spec(_spec)  # (dataclasses look it up)
_spec.loader.exec_module(ext)


class BuildPy(build_py):
    """Ships csrc/ as treepo_kernels/csrc in a wheel, for the JIT build (an editable install finds
    csrc/ beside the package instead)."""

    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            dst = Path(self.build_lib) / "treepo_kernels" / "csrc"
            dst.mkdir(parents=True, exist_ok=True)
            for f in ext.SOURCES + ext.HEADERS:
                shutil.copyfile(Path("csrc") / f, dst / f)


ext_modules, cmdclass = [], {"build_py": BuildPy}
if os.environ.get("TREEPO_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch not importable at build time (build isolation): JIT on first use
        print(f"treepo: not building the C++ CPU kernels now ({e}); they are built just in time on first "
              "use against the installed torch", file=sys.stderr)
    else:
        cflags, ldflags = ext.flags()

        class OptionalBuild(BuildExtension):
            """A failed compile is a notice, not a failed install."""

            def build_extensions(self):
                try:
                    super().build_extensions()
                except Exception as e:
                    print(f"treepo: the C++ CPU kernels did not build ({e}); the engine will use the "
                          "plain-PyTorch attention", file=sys.stderr)
                    self.extensions = []  # nothing to copy or install afterwards

        ext_modules = [CppExtension("treepo_kernels._C", [f"csrc/{f}" for f in ext.SOURCES],
                                    extra_compile_args=cflags, extra_link_args=ldflags,
                                    depends=[f"csrc/{f}" for f in ext.HEADERS])]
        cmdclass["build_ext"] = OptionalBuild.with_options(use_ninja=False)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
