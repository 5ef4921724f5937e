"""HPA on safetensors checkpoints, without the model in memory: ``hpa-calibrate`` and ``hpa-adjust``.

The paper's edit is post-hoc (HPA_SPEC.md § Setting): given the checkpoint before a task, the
checkpoint after it and the two calibration statistics, Steps 1–3 need one layer at a time.

* :func:`calibrate_checkpoint` (``hpa-calibrate``): loads a Hugging Face model from a local
  directory, runs it on a JSONL calibration set and writes the ``hinv`` vector of every managed
  layer (HPA_SPEC.md Step 0) to a safetensors file, keyed by the layer's **weight parameter
  name** (``<module name>.weight``: ``model.layers.0.self_attn.q_proj.weight``). A line holds token
  ids or text fields, and may name images (``"image"``: a path relative to the JSONL file, or a
  list of them), read with the model's own processor (``AutoProcessor`` saved with the
  checkpoint), so that the pixel values go through the model's forward and the decoder layers
  count the image tokens. The forwards go through :func:`hpa_kernels.integrations.calibrate`,
  the in-memory path.
* :func:`adjust_checkpoint` (``hpa-adjust``): copies the *after* checkpoint directory and rewrites,
  in the copy, the bytes of every tensor named in the hinv files by its edit Ŵ (Steps 1–3). It
  streams tensor by tensor (``safetensors.safe_open``): one W_prev and one W_new in memory at a
  time (Ŵ is written over W_new), so the peak is about two of the largest managed tensors plus the
  reduce pass's work space. Every other tensor, the safetensors headers and metadata and every
  other file are copied unchanged; sharded checkpoints (``model.safetensors.index.json``) and
  single files both work, and *before* may be sharded differently from *after*. The result
  equals ``HPAOptimizer.end_task`` on the same weights and statistics. The edit is atomic: every
  tensor is checked and planned before anything is written, and the copy is written into a
  temporary folder renamed to ``--out`` only on success.


The package: :mod:`~hpa_kernels.checkpoint.files` (files, headers, hinv files, depths),
:mod:`~hpa_kernels.checkpoint.names` (tensor names and layouts from the model's definition),
:mod:`~hpa_kernels.checkpoint.calibrate`, :mod:`~hpa_kernels.checkpoint.adjust` and
:mod:`~hpa_kernels.checkpoint.cli`.
"""

from .adjust import adjust_checkpoint
from .calibrate import calibrate_checkpoint
from .cli import adjust_main, calibrate_main
from .files import block_depths, checkpoint_files, load_hinv, save_hinv

__all__ = [
    "adjust_checkpoint",
    "adjust_main",
    "block_depths",
    "calibrate_checkpoint",
    "calibrate_main",
    "checkpoint_files",
    "load_hinv",
    "save_hinv",
]
