"""Package set-up. The C++ CPU kernels in csrc/ (when present) are built as a torch extension
where a compiler is available; if that build fails the install still succeeds and the engine
falls back to the plain-PyTorch attention."""
from setuptools import setup

setup()
