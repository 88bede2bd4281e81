"""`torchrun --nproc_per_node N -m treepo.train [flags]` (and `treepo train [flags]`)."""
import sys

from .trainer import main

if __name__ == "__main__":
    sys.exit(main())
