"""``hpa-calibrate``'s core: :func:`calibrate_checkpoint`, the hinv vectors of a local Hugging Face
model on a JSONL calibration set (HPA_SPEC.md Step 0), written to a safetensors file."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import HPAConfig
from ..jsonl import json_object
from .files import save_hinv


def _images_of(record: Mapping[str, Any], where: str, base: Path) -> list[Path]:
    """The image paths of a JSONL record (``"image"``: a path or a list of them, relative to ``base``)."""
    value = record.get("image")
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise ValueError(f"{where}: 'image' must be a path or a list of paths, got {value!r}")
    paths = [Path(v) if Path(v).is_absolute() else base / v for v in values]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"{where}: image {path} does not exist")
    return paths


def _cut(sample: dict[str, Tensor], max_length: int, keep_id: int | None) -> dict[str, Tensor]:
    """``sample`` cut to ``max_length`` positions, but never before its last ``keep_id`` token (an
    image's tokens must all stay, with their pixel values). Cuts every (1, T) tensor along T."""
    ids = sample["input_ids"]
    length = ids.shape[-1]
    keep = max_length
    if keep_id is not None:
        positions = (ids[0] == keep_id).nonzero()
        if positions.numel():
            keep = max(keep, int(positions[-1]) + 1)
    if length <= keep:
        return sample
    return {k: v[..., :keep] if isinstance(v, Tensor) and v.shape == ids.shape else v for k, v in sample.items()}


def _read_jsonl(
    path: Path,
    fields: Sequence[str],
    tokenizer: Any,
    max_length: int,
    max_samples: int | None,
    processor: Any = None,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
) -> Iterator[dict[str, Tensor]]:
    """One batch of model inputs per JSONL line (see :func:`calibrate_checkpoint`), lazily;
    ``input_ids`` outside ``[0, vocab_size)`` raise ValueError naming the line."""
    from transformers.image_utils import load_image

    count = 0
    image_token = getattr(processor, "image_token", None)
    image_id = getattr(processor, "image_token_id", None)
    if image_id is None and image_token is not None:
        image_id = processor.tokenizer.convert_tokens_to_ids(image_token)
    with open(path) as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            record = json_object(line, where)
            images = _images_of(record, where, path.parent)
            if images and processor is None:
                raise ValueError(f"{where}: image samples need the model's processor (AutoProcessor)")
            pictures = [load_image(str(image)) for image in images]
            if "input_ids" in record:
                ids = torch.tensor([record["input_ids"]], dtype=torch.long)
                if vocab_size is not None and ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
                    raise ValueError(f"{where}: input_ids outside the model's vocabulary [0, {vocab_size})")
                sample = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                if pictures:  # the ids hold the image tokens already: only the pixel values are read
                    sample.update(processor.image_processor(images=pictures, return_tensors="pt"))
            else:
                missing = [field for field in fields if field not in record]
                if missing and not images:
                    raise ValueError(f"{where}: no field {missing} (and no input_ids)")
                text = "\n".join(str(record[field]) for field in fields if field in record)
                if processor is not None:
                    if images and image_token is not None and image_token not in text:
                        text = image_token * len(images) + "\n" * bool(text) + text  # [decision] images first
                    sample = dict(processor(text=text, images=pictures or None, return_tensors="pt"))
                elif tokenizer is None:
                    raise ValueError(f"{where}: text samples need a tokenizer")
                else:
                    sample = dict(tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt"))
            sample = _cut(sample, max_length, image_id if pictures else None)
            sample = {
                k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in sample.items()
            }
            if sample["input_ids"].numel() == 0:
                continue
            yield sample
            count += 1
            if max_samples is not None and count >= max_samples:
                return


def _model_class(model_dir: Path, auto_class: str | None) -> Any:
    """The class that loads ``model_dir``: ``transformers.<auto_class>``, else the class its
    ``config.json`` names (``architectures``), else ``AutoModelForCausalLM``."""
    import transformers

    if auto_class is not None:
        return getattr(transformers, auto_class)
    config_path = model_dir / "config.json"
    architectures = json.loads(config_path.read_text()).get("architectures") if config_path.is_file() else None
    found = getattr(transformers, architectures[0], None) if architectures else None
    return found if found is not None else transformers.AutoModelForCausalLM


def calibrate_checkpoint(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    *,
    fields: Sequence[str] = ("text",),
    max_samples: int | None = None,
    max_length: int = 512,
    auto_class: str | None = None,
    tokenizer_dir: str | Path | None = None,
    config: HPAConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Per-layer ``hinv`` vectors of the model in ``model_dir`` on a JSONL calibration set (HPA_SPEC.md Step 0).

    Each JSONL line is one sample (one forward, no padding):

    * ``{"input_ids": [...]}``: token ids as given;
    * text fields (``fields``), joined by newlines and tokenized by the directory's tokenizer;
    * either of them with ``"image"``: a path (relative to the JSONL file, or absolute) or a list of
      paths. Then every line is read with the model's own processor (``AutoProcessor`` of
      ``tokenizer_dir`` or ``model_dir``), which expands the image tokens and gives the pixel values
      (and whatever else the model takes, e.g. ``image_sizes``). [decision] A text without the
      processor's image token gets one per image in front (``<image>\\n`` + text); a line with
      an image may have no text field. ``input_ids`` lines with an image must hold its tokens
      already (only the pixel values are read). Text-only lines still work in the same file.

    Each sample is cut to ``max_length`` tokens, never inside its image tokens. The forwards run
    through :func:`hpa_kernels.integrations.calibrate` (the in-memory path), so the decoder layers
    count the image tokens and the tower's layers (when managed) count the patches. Layers are
    those of :func:`hpa_kernels.layers.find_hpa_layers`; nothing leaves the machine
    (``local_files_only``).

    Args:
        model_dir: a ``save_pretrained`` directory.
        data: the JSONL file.
        out: where to write the safetensors file (``None``: do not write).
        fields: the text fields of a line (e.g. ``("prompt", "response")``).
        max_samples: use at most this many lines (e.g. ``HPAConfig.safety_samples``).
        max_length: truncate each sample to this many tokens.
        auto_class: the ``transformers`` class that loads the model (``AutoModelForCausalLM``,
            ``AutoModelForSequenceClassification``, …); default: the class named in the
            directory's ``config.json`` (``architectures``), else ``AutoModelForCausalLM``.
        tokenizer_dir: where the tokenizer / processor is (default ``model_dir``; unused for
            ``input_ids`` lines without images).
        config: gives ``damping``, ``include``, ``exclude`` and ``extra_layers``.
        dtype: the model's dtype for the forwards (statistics accumulate in fp32 anyway).

    Returns:
        ``{weight parameter name: (in_features,) float32}``, as written.

    Raises:
        FileNotFoundError: ``model_dir`` without ``config.json``, or no ``data`` file.
        ValueError: an empty calibration set, a line that is not a JSON object, a line without the
            fields, ``input_ids`` outside the vocabulary, a missing image, images without a
            processor, text without a tokenizer, a layer without tokens.
    """
    import transformers

    from ..integrations import calibrate
    from ..optim import HPAOptimizer

    config = config or HPAConfig()
    model_dir, data = Path(model_dir), Path(data)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a save_pretrained directory (no config.json)")
    if not data.is_file():
        raise FileNotFoundError(f"{data}: no such file")
    needs_processor = needs_tokenizer = False
    with open(data) as handle:
        for line_number, line in enumerate(handle, 1):
            if line.strip():
                record = json_object(line, f"{data}:{line_number}")
                needs_processor = needs_processor or record.get("image") is not None
                needs_tokenizer = needs_tokenizer or "input_ids" not in record
    model_cls = _model_class(model_dir, auto_class)
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"  # renamed in v5
    model = model_cls.from_pretrained(str(model_dir), local_files_only=True, **{dtype_key: dtype}).eval()
    source = str(tokenizer_dir or model_dir)
    tokenizer = processor = None
    if needs_processor:
        try:
            processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{data}: lines with an image need the model's processor, and {source} has none ({error})"
            ) from error
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"{data}: lines with an image need the model's processor, and {source} has none")
    elif needs_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"{data}: text lines need a tokenizer, and {source} has none that loads (pass --tokenizer, or "
                f"give input_ids; {type(error).__name__})"
            ) from error
    embeddings = model.get_input_embeddings()
    vocab_size = getattr(embeddings, "num_embeddings", None)
    samples = _read_jsonl(data, fields, tokenizer, max_length, max_samples, processor, dtype, vocab_size)
    first = next(samples, None)
    if first is None:
        raise ValueError(f"{data}: no calibration sample")
    counted = [0]

    def batches() -> Iterator[dict[str, Tensor]]:
        for sample in itertools.chain([first], samples):
            counted[0] += 1
            yield sample

    # The in-memory path: the same layers as HPAOptimizer.from_model, the same masks and forwards.
    optimizer = HPAOptimizer.from_model(model, hpa=config, master_weights=False)
    hinv = calibrate(model, optimizer, batches())
    if out is not None:
        save_hinv(hinv, out, {"hpa.samples": str(counted[0]), "hpa.damping": str(config.damping)})
    return {f"{name}.weight": vec for name, vec in hinv.items()}
