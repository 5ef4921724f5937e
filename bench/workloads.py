"""What the benchmarks run: parameter sets shaped like real models, and one step / edit of each
optimizer on them.

Parameter sets are :class:`ModelSpec` records built into :class:`ShapedModel` (an ``nn.ModuleList``
of blocks of ``nn.Linear`` layers, so :meth:`HPAOptimizer.from_model` manages the same layers it
would in the real model), with every parameter and gradient filled with fixed pseudo-random values.

* ``minilm-l6``: all-MiniLM-L6-v2 (BERT, hidden 384, 6 layers, FFN 1536, vocab 30522), 22.7M
  parameters, embeddings included (trained, never edited).
* ``llama-1b-<k>l``: Llama-3.2-1B blocks (hidden 2048, GQA 32/8 heads of 64, FFN 8192, RMSNorm),
  k of its 16 blocks, no embedding (the tied 128256 × 2048 table alone is 2.6e8 parameters).
* ``sweep-<N>``: four Llama-style blocks (GQA 4:1, FFN 4×) of the hidden size that gives about N
  parameters, for the time-against-size curve.

The baselines are the ones the tests use: ``torch.optim.AdamW`` and the ``torch`` backend
(:mod:`hpa_kernels.ops.torch_ref`, selected with ``backend="torch"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import hpa_kernels
from hpa_kernels import HPAConfig, HPAOptimizer, ops

LR = 1e-3
WEIGHT_DECAY = 1e-2
SEED = 0


@dataclass(frozen=True)
class LinearSpec:
    """One ``nn.Linear(in_features, out_features)``: weight (out_features, in_features)."""

    name: str
    out_features: int
    in_features: int
    bias: bool


@dataclass(frozen=True)
class ModelSpec:
    """A parameter set: ``num_blocks`` identical blocks plus unmanaged ``extras``.

    Attributes:
        name: short id used in tables and file names.
        description: what it is shaped like.
        linears: the ``nn.Linear`` layers of one block (managed by HPA).
        vectors: ``(name, size)`` 1-D parameters of one block (norms).
        num_blocks: blocks in the stack.
        extras: ``(name, shape)`` parameters outside the blocks (embeddings, final norm).
        kind: ``"bert"`` for a set :class:`BertEncoder` can run forward, else ``"params"``.
    """

    name: str
    description: str
    linears: tuple[LinearSpec, ...]
    vectors: tuple[tuple[str, int], ...]
    num_blocks: int
    extras: tuple[tuple[str, tuple[int, ...]], ...] = ()
    kind: str = "params"

    @property
    def num_params(self) -> int:
        block = sum(s.out_features * s.in_features + (s.out_features if s.bias else 0) for s in self.linears)
        block += sum(size for _, size in self.vectors)
        return block * self.num_blocks + sum(math.prod(shape) for _, shape in self.extras)

    @property
    def num_tensors(self) -> int:
        block = len(self.linears) + sum(s.bias for s in self.linears) + len(self.vectors)
        return block * self.num_blocks + len(self.extras)

    @property
    def num_managed_params(self) -> int:
        return self.num_blocks * sum(s.out_features * s.in_features for s in self.linears)


def _bert_linears(hidden: int, ffn: int) -> tuple[LinearSpec, ...]:
    return (
        LinearSpec("query", hidden, hidden, True),
        LinearSpec("key", hidden, hidden, True),
        LinearSpec("value", hidden, hidden, True),
        LinearSpec("attn_out", hidden, hidden, True),
        LinearSpec("intermediate", ffn, hidden, True),
        LinearSpec("output", hidden, ffn, True),
    )


def _llama_linears(hidden: int, kv: int, ffn: int) -> tuple[LinearSpec, ...]:
    return (
        LinearSpec("q_proj", hidden, hidden, False),
        LinearSpec("k_proj", kv, hidden, False),
        LinearSpec("v_proj", kv, hidden, False),
        LinearSpec("o_proj", hidden, hidden, False),
        LinearSpec("gate_proj", ffn, hidden, False),
        LinearSpec("up_proj", ffn, hidden, False),
        LinearSpec("down_proj", hidden, ffn, False),
    )


MINILM_L6 = ModelSpec(
    name="minilm-l6",
    description="all-MiniLM-L6-v2: BERT, hidden 384, 6 layers, FFN 1536, embeddings included",
    linears=_bert_linears(384, 1536),
    vectors=(("attn_ln_weight", 384), ("attn_ln_bias", 384), ("out_ln_weight", 384), ("out_ln_bias", 384)),
    num_blocks=6,
    extras=(
        ("word_embeddings", (30522, 384)),
        ("position_embeddings", (512, 384)),
        ("token_type_embeddings", (2, 384)),
        ("embeddings_ln_weight", (384,)),
        ("embeddings_ln_bias", (384,)),
        ("pooler_weight", (384, 384)),
        ("pooler_bias", (384,)),
    ),
    kind="bert",
)


def llama_1b(num_blocks: int) -> ModelSpec:
    """Llama-3.2-1B's block shapes, ``num_blocks`` of its 16 blocks, final norm, no embedding."""
    return ModelSpec(
        name=f"llama-1b-{num_blocks}l",
        description=f"Llama-3.2-1B shapes (hidden 2048, GQA 32/8, FFN 8192), {num_blocks} of 16 blocks, no embedding",
        linears=_llama_linears(2048, 512, 8192),
        vectors=(("input_norm", 2048), ("post_attention_norm", 2048)),
        num_blocks=num_blocks,
        extras=(("final_norm", (2048,)),),
    )


def sweep_spec(target: float) -> ModelSpec:
    """Four Llama-style blocks whose hidden size d (a multiple of 4) gives about ``target`` parameters.

    One block: q, o (d, d); k, v (d/4, d); gate, up (4d, d); down (d, 4d); two norms (d,).
    """
    hidden = max(4, 4 * round(math.sqrt(target / 58.0) / 4))
    return ModelSpec(
        name=f"sweep-{target:.0e}".replace("+0", "").replace("+", ""),
        description=f"4 Llama-style blocks, hidden {hidden}",
        linears=_llama_linears(hidden, hidden // 4, 4 * hidden),
        vectors=(("input_norm", hidden), ("post_attention_norm", hidden)),
        num_blocks=4,
    )


class Block(nn.Module):
    """One block of a :class:`ModelSpec`: its linears and vectors as attributes."""

    def __init__(self, spec: ModelSpec, device: torch.device | str) -> None:
        super().__init__()
        for s in spec.linears:
            setattr(self, s.name, nn.Linear(s.in_features, s.out_features, bias=s.bias, device=device))
        for name, size in spec.vectors:
            setattr(self, name, nn.Parameter(torch.empty(size, device=device)))


class ShapedModel(nn.Module):
    """The parameters of a :class:`ModelSpec`: ``blocks`` (an ``nn.ModuleList``) and ``extras``."""

    def __init__(self, spec: ModelSpec, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.spec = spec
        self.blocks = nn.ModuleList(Block(spec, device) for _ in range(spec.num_blocks))
        self.extras = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(shape, device=device)) for name, shape in spec.extras}
        )


class BertEncoder(ShapedModel):
    """A BERT encoder (post-LN, GELU FFN, SDPA attention) over a ``kind="bert"`` spec.

    ``forward(input_ids: (B, T) int64) -> (B, T, hidden)``; q, k and v read one input tensor,
    as in BERT, so HessianCollector shares their XᵀX.
    """

    num_heads = 12

    def forward(self, input_ids: Tensor) -> Tensor:
        extras = self.extras
        batch, length = input_ids.shape
        hidden = extras["word_embeddings"].shape[1]
        h = F.embedding(input_ids, extras["word_embeddings"]) + extras["position_embeddings"][:length]
        h = F.layer_norm(
            h + extras["token_type_embeddings"][0],
            (hidden,),
            extras["embeddings_ln_weight"],
            extras["embeddings_ln_bias"],
        )
        heads = self.num_heads
        for block in self.blocks:
            q, k, v = (
                layer(h).view(batch, length, heads, hidden // heads).transpose(1, 2)
                for layer in (block.query, block.key, block.value)
            )
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, hidden)
            h = F.layer_norm(h + block.attn_out(attn), (hidden,), block.attn_ln_weight, block.attn_ln_bias)
            ffn = block.output(F.gelu(block.intermediate(h)))
            h = F.layer_norm(h + ffn, (hidden,), block.out_ln_weight, block.out_ln_bias)
        return h


_POOL_SIZE = 1 << 20


def _fill(tensor: Tensor, pool: Tensor) -> None:
    """Fill ``tensor`` by tiling ``pool`` at a shifting offset: varied values at copy speed."""
    flat = tensor.view(-1)
    for start in range(0, flat.numel(), _POOL_SIZE):
        stop = min(start + _POOL_SIZE, flat.numel())
        shift = (start // _POOL_SIZE * 7919) % _POOL_SIZE
        chunk = torch.roll(pool, shift)[: stop - start] if shift else pool[: stop - start]
        flat[start:stop].copy_(chunk)


def build_model(spec: ModelSpec, device: torch.device | str = "cpu", *, grads: bool = True) -> ShapedModel:
    """``spec`` built on ``device``: weights ~ N(0, 0.02²) and, with ``grads``, gradients ~ N(0, 1e-3²)
    (fixed pseudo-random values tiled from a 2²⁰-element pool)."""
    generator = torch.Generator().manual_seed(SEED)
    weight_pool = (torch.randn(_POOL_SIZE, generator=generator) * 0.02).to(device)
    grad_pool = (torch.randn(_POOL_SIZE, generator=generator) * 1e-3).to(device)
    cls = BertEncoder if spec.kind == "bert" else ShapedModel
    model = cls(spec, device="meta").to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            _fill(p, weight_pool)
            if grads:
                p.grad = torch.empty_like(p)
                _fill(p.grad, grad_pool)
    return model


def hinv_vectors(model: nn.Module, layers: dict, seed: int) -> dict[str, Tensor]:
    """Positive (in_features,) stand-ins for ``HessianCollector.hinv()``, one per managed layer."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.rand(layer.module.in_features, generator=generator) + 0.5).to(layer.module.weight.device)
        for name, layer in layers.items()
    }


# ---------------------------------------------------------------------------------------- steps


def device_backends(device: torch.device | str) -> list[str]:
    """The available kernels backends that run tensors on ``device`` (``"torch"`` first)."""
    kind = torch.device(device).type
    wanted = ("torch", "cpu") if kind == "cpu" else ("torch", "cuda", "triton")
    return [b for b in ops.available_backends() if b in wanted]


ONLINE_KINDS = {"hpa-online": "exact", "hpa-online-lagged": "lagged"}  # StepVariant.kind -> online_projection


@dataclass(frozen=True)
class StepVariant:
    """One optimizer configuration whose ``step()`` is timed.

    Attributes:
        name: row label (``adamw-fused``, ``hpa-plain[cpu]``, ...).
        kind: ``"adamw"``, ``"hpa-plain"``, ``"hpa-online"`` (the exact projection) or
            ``"hpa-online-lagged"`` (the lagged one, ``HPAConfig.online_projection``).
        option: ``"foreach"`` / ``"fused"`` for AdamW, the backend name for HPA.
    """

    name: str
    kind: str
    option: str


def step_variants(device: torch.device | str = "cpu") -> list[StepVariant]:
    """torch AdamW (foreach, fused), then HPAOptimizer plain, online (exact) and online (lagged) on
    every backend of ``device``."""
    variants = [StepVariant("adamw-foreach", "adamw", "foreach"), StepVariant("adamw-fused", "adamw", "fused")]
    for backend in device_backends(device):
        variants.append(StepVariant(f"hpa-plain[{backend}]", "hpa-plain", backend))
    for kind in ONLINE_KINDS:
        for backend in device_backends(device):
            variants.append(StepVariant(f"{kind}[{backend}]", kind, backend))
    return variants


def make_optimizer(variant: StepVariant, model: ShapedModel):
    """The optimizer of ``variant`` over every parameter of ``model`` (same hyperparameters for all).

    ``hpa-online`` / ``hpa-online-lagged``: ``HPAOptimizer(hpa=HPAConfig(online=True,
    online_projection="exact" / "lagged"))`` with a task open, so that the W_prev snapshots are
    part of its state.
    """
    if variant.kind == "adamw":
        params = list(model.parameters())
        return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **{variant.option: True})
    online = variant.kind in ONLINE_KINDS
    hpa = HPAConfig(online=online, online_projection=ONLINE_KINDS.get(variant.kind, "exact"))
    opt = HPAOptimizer.from_model(model, lr=LR, weight_decay=WEIGHT_DECAY, hpa=hpa, backend=variant.option)
    if online:
        opt.begin_task(hinv_safety=hinv_vectors(model, opt.hpa_layers, seed=1))
    return opt


def step_bytes(variant: StepVariant, model: ShapedModel) -> int:
    """Bytes one step moves: every tensor a fused kernel must read or write, once.

    AdamW: reads p, g (storage dtype) and m, v (fp32), writes p, m, v. The online step also reads
    W_prev (storage dtype) and the column mask (bits) of every managed layer (the lagged
    projection's one pass moves just that; the exact one's second pass is not counted).
    """
    total = 0
    for p in model.parameters():
        total += p.numel() * (3 * p.element_size() + 16)
    if variant.kind in ONLINE_KINDS:
        for block in model.blocks:
            for s in model.spec.linears:
                weight = getattr(block, s.name).weight
                total += weight.numel() * weight.element_size() + math.ceil(s.in_features / 8)
    return total


# ---------------------------------------------------------------------------------------- the edit


def edit_bytes(rows: int, cols: int, element_size: int = 4) -> int:
    """Bytes of one layer's edit, each pass's tensors once: the reduce reads W_prev and W_new; the write
    reads W_prev, W_new and the mask (bits) and writes Ŵ."""
    return 5 * rows * cols * element_size + math.ceil(cols / 8)


def model_edit_bytes(model: ShapedModel) -> int:
    return sum(
        edit_bytes(s.out_features, s.in_features, getattr(block, s.name).weight.element_size())
        for block in model.blocks
        for s in model.spec.linears
    )


class LayerEdit:
    """One layer's end-of-task edit through :func:`hpa_kernels.functional.hpa_layer_update`
    (reduce + select + write), ``out`` = a separate buffer so every run sees the same inputs."""

    def __init__(self, rows: int, cols: int, device: torch.device | str = "cpu", retain_ratio: float = 0.1) -> None:
        generator = torch.Generator().manual_seed(SEED)
        self.w_prev = (torch.randn(rows, cols, generator=generator) * 0.02).to(device)
        self.w_new = self.w_prev + (torch.randn(rows, cols, generator=generator) * 1e-3).to(device)
        self.hinv_safety = (torch.rand(cols, generator=generator) + 0.5).to(device)
        self.hinv_task = (torch.rand(cols, generator=generator) + 0.5).to(device)
        self.mask = torch.rand(cols, generator=generator).to(device) < retain_ratio
        self.out = torch.empty_like(self.w_new)
        self.retain_ratio = retain_ratio

    def edit(self, backend: str) -> Callable[[], object]:
        def run() -> object:
            return hpa_kernels.functional.hpa_layer_update(
                self.w_prev,
                self.w_new,
                self.hinv_safety,
                self.hinv_task,
                self.retain_ratio,
                out=self.out,
                backend=backend,
            )

        return run

    def reduce(self, backend: str) -> Callable[[], object]:
        return lambda: ops.hpa_reduce(self.w_prev, self.w_new, backend=backend)

    def apply(self, backend: str) -> Callable[[], object]:
        return lambda: ops.hpa_apply(self.w_prev, self.w_new, self.mask, 0.01, self.out, backend=backend)


class ModelEdit:
    """A whole model's ``HPAOptimizer.end_task`` on one backend.

    :meth:`setup` opens a task (snapshot W_prev) and moves every managed weight a little, as a
    task's training would; :meth:`run` is the timed ``end_task``.
    """

    def __init__(self, model: ShapedModel, backend: str) -> None:
        self.model = model
        self.opt = HPAOptimizer.from_model(model, lr=LR, weight_decay=WEIGHT_DECAY, backend=backend)
        self.safety = hinv_vectors(model, self.opt.hpa_layers, seed=1)
        self.task = hinv_vectors(model, self.opt.hpa_layers, seed=2)
        self._delta = {
            name: torch.randn(layer.module.in_features, generator=torch.Generator().manual_seed(3)) * 1e-3
            for name, layer in self.opt.hpa_layers.items()
        }

    def setup(self) -> tuple[tuple, dict]:
        self.opt.begin_task(hinv_safety=self.safety)
        with torch.no_grad():
            for name, layer in self.opt.hpa_layers.items():
                layer.module.weight.add_(self._delta[name].to(layer.module.weight.device))
        return (), {}

    def run(self) -> object:
        return self.opt.end_task(hinv_task=self.task)
