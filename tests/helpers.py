"""Small models and loops shared by the tests (one copy of each helper)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hpa_kernels import HPAConfig, HPAOptimizer, integrations, ops


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


def random_batches(
    count: int, seed: int, batch: int = 4, length: int = 7, vocab: int = 50, classes: int = 3, device="cpu"
):
    """``count`` ``(tokens, labels)`` batches drawn on the CPU from ``seed``, then moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randint(0, vocab, (batch, length), generator=generator).to(device),
            torch.randint(0, classes, (batch,), generator=generator).to(device),
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
    optimizer.begin_task(calibrate(model, optimizer, random_batches(2, seed, device=device)))
    train(model, optimizer, random_batches(steps, seed + 1, device=device))
    return optimizer.end_task(calibrate(model, optimizer, random_batches(task_batches, seed + 2, device=device)))


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


def lora_llama() -> nn.Module:
    """:func:`tiny_llama` (vocabulary 32, seed 0) with rank-2 PEFT LoRA adapters on q_proj and v_proj."""
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(tiny_llama(32, seed=0), config)


def model_weights(model: nn.Module) -> dict[str, Tensor]:
    """Every entry of ``model.state_dict()``, cloned."""
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[tuple[int, str], Tensor]:
    """Every state tensor, keyed by (parameter index, key), cloned."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {
        (index, key): value.detach().clone()
        for index, p in enumerate(params)
        for key, value in optimizer.state.get(p, {}).items()
        if isinstance(value, Tensor)
    }


def assert_bitwise(before: Mapping, after: Mapping) -> None:
    """The same keys, and under each a tensor of the same dtype, shape and bits."""
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), key


def run_fixed_grads(optimizer: torch.optim.Optimizer, params, grads_per_step, scheduler=None) -> None:
    """Steps with the given gradients, assigned as they are (their strides kept; never written)."""
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g if g is None or g.device == p.device else g.to(p.device)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def is_plain(value: Any) -> bool:
    """True when ``value`` holds only tensors and plain Python values (what ``weights_only=True`` loads)."""
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    return value is None or isinstance(value, (Tensor, bool, int, float, str))


# The optimizer tests are table-driven, as torch's OptimizerInfo tests
# (torch/testing/_internal/common_optimizers.py): each runs on the records of OPTIM_DB it selects.

BACKENDS = ops.available_backends()
# What HPAOptimizer's default backend="auto" resolves to for CPU tensors.
DEFAULT_BACKEND = ops.resolve_backend("auto", torch.device("cpu"))


@dataclasses.dataclass(frozen=True)
class OptimInfo:
    """One configuration of HPAOptimizer on one backend: how to build it and what it supports.

    Attributes:
        config: the configuration's name in :data:`OPTIM_DB`.
        backend: the kernels backend, one of :data:`BACKENDS`.
        kwargs: the HPAOptimizer keywords that make the configuration; a test adds its own
            hyperparameters (and may override these).
        managed: built by ``HPAOptimizer.from_model`` on a model (managed layers and the HPA task
            lifecycle); else on parameters or param groups (AdamW steps only).
        dtypes: the parameter dtypes the backend steps (others are refused).
        make_model: the model a managed configuration is built on.
    """

    config: str
    backend: str
    kwargs: Mapping[str, Any]
    managed: bool
    dtypes: tuple[torch.dtype, ...]
    make_model: Callable[..., nn.Module] = TinyModel

    @property
    def id(self) -> str:
        return f"{self.config}-{self.backend}"

    @property
    def device(self) -> torch.device:
        """The device the backend runs on: CPU when it takes CPU tensors ("torch", "cpu", and "triton"
        under ``TRITON_INTERPRET=1``), else CUDA."""
        try:
            ops.resolve_backend(self.backend, torch.device("cpu"))
        except ValueError:
            return torch.device("cuda")
        return torch.device("cpu")

    @property
    def hpa(self) -> HPAConfig:
        return self.kwargs.get("hpa", HPAConfig())

    def build(self, target, **overrides: Any) -> HPAOptimizer:
        """The optimizer: ``from_model(target)`` when managed, else over the parameters or groups
        ``target``; ``overrides`` win over :attr:`kwargs`."""
        kwargs = {**self.kwargs, **overrides, "backend": self.backend}
        return HPAOptimizer.from_model(target, **kwargs) if self.managed else HPAOptimizer(target, **kwargs)

    def model(self, **kwargs: Any) -> nn.Module:
        """``make_model(**kwargs)`` on :attr:`device`."""
        return self.make_model(**kwargs).to(self.device)

    def batches(self, count: int, seed: int):
        """:func:`random_batches` on :attr:`device`."""
        return random_batches(count, seed, device=self.device)


def _configurations(backend: str) -> list[OptimInfo]:
    dtypes = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if backend == "torch" else ())
    online = HPAConfig(online=True, refresh_every=3, p_max=0.3, p_min=0.2)
    return [
        # AdamW steps over a parameter list; a bf16 / fp16 parameter is rounded at every step.
        OptimInfo("adamw", backend, {"master_weights": False}, False, dtypes),
        # AdamW steps on fp32 master copies of the bf16 / fp16 parameters.
        OptimInfo("master", backend, {"master_weights": True}, False, dtypes),
        # HPA offline: the managed layers edited at end_task.
        OptimInfo("hpa", backend, {"master_weights": False}, True, dtypes),
        # HPA offline on fp32 master copies: the snapshot and the edit act on the copies.
        OptimInfo("hpa-master", backend, {"master_weights": True}, True, dtypes),
        # HPA online: the column mask and the orthogonal projection inside every step.
        OptimInfo("online", backend, {"hpa": online}, True, dtypes),
        # HPA disabled: sequential fine-tuning, end_task edits nothing.
        OptimInfo("seqft", backend, {"hpa": HPAConfig(enabled=False)}, True, dtypes),
        # HPA offline on a PEFT LoRA model: the adapters merged into the edit.
        OptimInfo("lora", backend, {}, True, dtypes, make_model=lora_llama),
    ]


OPTIM_DB = [info for backend in BACKENDS for info in _configurations(backend)]


def select(*configs: str, backends: Iterable[str] = BACKENDS) -> list[OptimInfo]:
    """The records of :data:`OPTIM_DB` of ``configs`` on ``backends``."""
    backends = tuple(backends)
    return [info for info in OPTIM_DB if info.config in configs and info.backend in backends]


def optims(*configs: str, backends: Iterable[str] = BACKENDS):
    """Parametrizes a test's ``info`` over ``select(*configs, backends=backends)``, named by their id."""
    return pytest.mark.parametrize(
        "info", [pytest.param(info, id=info.id) for info in select(*configs, backends=backends)]
    )


def optim_info(config: str, backend: str) -> OptimInfo:
    """The record of ``config`` on ``backend``."""
    (info,) = select(config, backends=(backend,))
    return info
