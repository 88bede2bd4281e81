"""`torchrun --nproc_per_node N -m treepo.train [flags]` (and `treepo train [flags]`)."""
import sys

from .trainer import cli

if __name__ == "__main__":
    sys.exit(cli())
