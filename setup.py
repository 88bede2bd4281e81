"""Package set-up. The C++ CPU kernels in csrc/ are built as a torch extension
(`treepo_kernels._C`, ops under torch.ops.treepo) where torch and a C++ compiler are available.
If that build is impossible the install still succeeds and the engine falls back to the
plain-PyTorch attention (`treepo info` says which backends are available).

TREEPO_NO_EXT=1 skips the extension; TREEPO_NATIVE=0 builds without -march=native (for a
binary that must run on other CPUs)."""
import os
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("TREEPO_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as e:  # torch not importable at build time: no extension
        print(f"treepo: not building the C++ CPU kernels ({e})", file=sys.stderr)
    else:
        flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno"]
        if os.environ.get("TREEPO_NATIVE", "1") == "1":
            flags.append("-march=native")

        class OptionalBuild(BuildExtension):
            """A failed compile is a notice, not a failed install."""

            def build_extensions(self):
                try:
                    super().build_extensions()
                except Exception as e:
                    print(f"treepo: the C++ CPU kernels did not build ({e}); the engine will use the "
                          "plain-PyTorch attention", file=sys.stderr)
                    self.extensions = []  # nothing to copy or install afterwards

        # attention (one op per file, sharing csrc/attention.h), packed GEMMs, fused layer ops, and
        # module.cpp, which registers every op (declared in csrc/ops.h) as torch.ops.treepo.*
        sources = ["csrc/paged_kv.cpp", "csrc/tree_decode.cpp", "csrc/extend.cpp", "csrc/linear.cpp",
                   "csrc/layer_ops.cpp", "csrc/module.cpp"]
        ext_modules = [CppExtension("treepo_kernels._C", sources, extra_compile_args=flags,
                                    extra_link_args=["-fopenmp"], depends=["csrc/attention.h", "csrc/bf16.h",
                                                                             "csrc/ops.h"])]
        cmdclass = {"build_ext": OptionalBuild.with_options(use_ninja=False)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
