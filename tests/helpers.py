"""Small models and loops shared by the tests (one copy of each helper)."""

from __future__ import annotations

import torch
from torch import nn

from hpa_kernels import HPAOptimizer, integrations


class Block(nn.Module):
    """A transformer-ish block: q and k read the same input (one shared Hessian), o another."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.o = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.o(torch.tanh(self.q(x)) * self.k(x)))


class TinyModel(nn.Module):
    """Embedding, a stack of blocks, a head: the shape of the models HPA is for."""

    def __init__(self, width: int = 12, depth: int = 3, classes: int = 3, vocab: int = 50) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=1))


def random_batches(count: int, seed: int, batch: int = 4, length: int = 7, vocab: int = 50, classes: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab, (batch, length), generator=generator),
            torch.randint(0, classes, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


def calibrate(model: nn.Module, optimizer: HPAOptimizer, batches) -> dict[str, torch.Tensor]:
    """``integrations.calibrate`` on ``(tokens, labels)`` batches (the labels unused)."""
    return integrations.calibrate(model, optimizer, [{"tokens": tokens} for tokens, _ in batches])


def train(model: nn.Module, optimizer: torch.optim.Optimizer, batches) -> None:
    for tokens, labels in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(tokens), labels).backward()
        optimizer.step()


def run_task(model: nn.Module, optimizer: HPAOptimizer, seed: int, device="cpu", steps: int = 4, task_batches: int = 2):
    """One HPA task: safety calibration (2 batches), ``steps`` training steps, task calibration
    (``task_batches`` batches), edit; returns ``end_task``'s report. Batches from seeds ``seed``,
    ``seed + 1``, ``seed + 2``, on ``device``."""

    def batches(count: int, batch_seed: int):
        return [(tokens.to(device), labels.to(device)) for tokens, labels in random_batches(count, seed=batch_seed)]

    optimizer.begin_task(calibrate(model, optimizer, batches(2, seed)))
    train(model, optimizer, batches(steps, seed + 1))
    return optimizer.end_task(calibrate(model, optimizer, batches(task_batches, seed + 2)))


def tiny_llama(vocab: int = 64, seed: int = 0, *, layers: int = 3, max_positions: int = 32) -> nn.Module:
    """A Llama of ``layers`` blocks (hidden 16, MLP 24, 2 heads, 1 KV head) built from a config
    (no hub), initialised from ``seed``."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config)


def tiny_decoder(seed: int = 0) -> nn.Module:
    """The 4-block, 64-token tiny Llama of the hpa-cvit method tests, in eval mode."""
    return tiny_llama(64, seed, layers=4, max_positions=2048).eval()
