import os
import sys
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when its kernels are defined: set it before any test module imports
# triton, so that on a machine without a GPU (CI) the "triton" backend runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
