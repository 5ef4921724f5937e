"""SPPFT: Safely Partial-Parameter Fine-Tuning, the "safety layers" kept frozen during task tuning.

Paper: Shen Li, Liuyi Yao, Lan Zhang, Yaliang Li, "Safety Layers in Aligned Large Language Models:
The Key to LLM Security", ICLR 2025, arXiv:2408.17003. Official code: github.com/listen0425/Safety-Layers
(the code index holds only its README); its ``Code/SPPFT.py`` freezes the ``self_attn`` and ``mlp``
modules of the safety layers (as quoted by ``silu101/safety-layers-repo``,
``handoff_asr_eval/finetune_sppft.py``, and ``silu101/Safety-Layers``, ``reference/README.md``), and
a copy of its locating script found in the code index (``locate_safety_layers``; the index does not
name its repository) computes the gap below from the per-layer cosine similarities.

**Locating the safety layers** (the paper's § 3.2–3.4, on the aligned model before fine-tuning).
For a prompt x, let h_l(x) ∈ R^d be the output of decoder block l (l = 0 … L−1) at the last
prompt position (the end of the rendered chat prompt, where the answer starts). With N the normal
(benign) prompts and M the malicious (harmful) ones,

    c_NN(l) = mean over pairs {a ≠ b} ⊂ N of cos(h_l(a), h_l(b)),
    c_NM(l) = mean over (a, m) ∈ N × M of cos(h_l(a), h_l(m)),
    g(l)    = c_NN(l) − c_NM(l)        (the gap)

In the first layers g ≈ 0 (every last-position vector looks alike); across some middle layers the
model separates malicious from normal prompts and g opens up, then it levels off. The paper takes
as initial range the layers from the gap's appearance to its first smoothing, then moves the upper
bound with an over-rejection test (the candidate layers' weights scaled by a factor α, the range
whose scaling moves the over-rejection rate on an over-rejection set most). [decision] We use a simpler rule on g
alone, :func:`safety_layer_range`: with l* = argmax g, b = min g over layers 0 … l* (at layer l_b),
and the rise Δ = g(l*) − b,

    first = min{l ≥ l_b : g(l) ≥ b + 0.1·Δ},   last = min{l ≥ first : g(l) ≥ b + 0.9·Δ},

and the safety layers are blocks first … last: the layers over which the gap rises from 10% to 90%
of its rise. Why: with 8 + 8 prompts the curve is noisy, and the script's step-wise test (start at
the first layer-to-layer increase > 0.001, then keep every later layer whose gap increases by
> ε = 10⁻⁴) would start at the first noisy step and collect scattered layers; the over-rejection
refinement needs an over-rejection set and generation sweeps outside our calibration budget.

**SPPFT** (the paper's fine-tuning method): fine-tune with the safety layers' parameters frozen, everything else
trained as usual. Here, in :meth:`SPPFT.begin_task` (before the optimizer is built): under LoRA the
``lora_A`` / ``lora_B`` parameters of every managed layer of blocks first … last are frozen, so
their adapters stay at B = 0 and the merge at the task's end leaves those blocks' dense weights as
they were; under ``--full`` the layers' own parameters are frozen (the paper freezes exactly the
attention and MLP projections of those blocks; the RMSNorm weights stay trainable, as in its code).

Defaults and decisions:

* Prompts [decision, shared calibration budget]: the run's benign prompts (8) as N and the harmful
  prompts of the safety calibration pairs (8) as M, every pair used once (28 N–N, 64 N–M pairs),
  instead of the paper's r sampled pairs from a few hundred prompts. Each prompt is rendered in
  the model's chat template (:func:`~hpa_kernels.cvit.model.render_prompt`), tokenised without
  added special tokens as the runner does, left-padded, positions counted from the first real
  token.
* h_l: ``output_hidden_states`` of the Hugging Face model, entries 1 … L (entry 0, the embeddings,
  skipped, as in the paper's code). As in the paper's code, the last entry is taken after the
  model's final norm (that is what Hugging Face returns there).
* The layers are located once, on the aligned dense model (``before_tasks``), and stay frozen for
  every task of the sequence: the paper tunes one task; the safety layers are a property of the
  aligned model.
* Rise fractions 10% and 90% [decision, see above]. [decision] A gap that never rises (its
  maximum at or before its minimum) means the model shows no safety layers: nothing is frozen, a
  warning says so, and ``describe()`` reports an empty ``safety_layers`` with the curve.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import Tensor

from ... import HPAConfig
from ...layers import ManagedLayer
from ..model import ChatModel, render_prompt
from .base import Method, RunContext, TaskContext

# Fractions of the gap's rise that bound the safety layers (module doc, [decision]).
GAP_RISE = (0.1, 0.9)


@torch.no_grad()
def last_position_states(chat: ChatModel, prompts: list[str]) -> Tensor:
    """Each decoder block's output at the last position of each rendered prompt.

    The prompts are rendered with :func:`~hpa_kernels.cvit.model.render_prompt`, tokenised without
    added special tokens, left-padded into one batch (position ids counted from each row's first
    real token) and run in eval mode (the training mode is restored).

    Returns:
        (L, n, d) float32 on CPU: ``output_hidden_states`` entries 1 … L (the embeddings dropped;
        the last entry is after the final norm, as Hugging Face returns it), row i for prompt i.

    Raises:
        ValueError: no prompts.
    """
    if not prompts:
        raise ValueError("last_position_states: no prompts")
    tok, model = chat.tokenizer, chat.model
    encoded = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    was_training = model.training
    model.eval()
    device = chat.device
    try:
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            output_hidden_states=True,
        )
    finally:
        model.train(was_training)
    return torch.stack([h[:, -1].float().cpu() for h in out.hidden_states[1:]])


def similarity_gap(normal: Tensor, malicious: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The paper's per-layer cosine similarities and their gap (§ 3.2–3.3, module doc).

    Args:
        normal: (L, n, d) last-position vectors of n ≥ 2 normal prompts at each of L layers.
        malicious: (L, m, d) the same for m ≥ 1 malicious prompts.

    Returns:
        ``(gap, c_nn, c_nm)``, each (L,) float32: c_NN(l) the mean cosine similarity over the
        n(n−1)/2 pairs of distinct normal prompts, c_NM(l) the mean over the n·m normal–malicious
        pairs, gap = c_NN − c_NM.

    Raises:
        ValueError: not 3-D, fewer than 2 normal or no malicious prompts, or L or d differ.
    """
    if normal.dim() != 3 or malicious.dim() != 3:
        raise ValueError(
            f"similarity_gap: expected (L, n, d) tensors, got {tuple(normal.shape)}, {tuple(malicious.shape)}"
        )
    layers, n, width = normal.shape
    if n < 2 or malicious.shape[1] < 1:
        raise ValueError(f"similarity_gap: need ≥ 2 normal, ≥ 1 malicious prompts, got {n}, {malicious.shape[1]}")
    if malicious.shape[0] != layers or malicious.shape[2] != width:
        raise ValueError(f"similarity_gap: shapes {tuple(normal.shape)} and {tuple(malicious.shape)} differ in L or d")
    u = torch.nn.functional.normalize(normal.float(), dim=-1)
    v = torch.nn.functional.normalize(malicious.float(), dim=-1)
    nn_sims = u @ u.transpose(1, 2)  # (L, n, n), diagonal = 1
    c_nn = (nn_sims.sum(dim=(1, 2)) - nn_sims.diagonal(dim1=1, dim2=2).sum(dim=1)) / (n * (n - 1))
    c_nm = (u @ v.transpose(1, 2)).mean(dim=(1, 2))
    return c_nn - c_nm, c_nn, c_nm


def safety_layer_range(gap: Tensor, low: float = GAP_RISE[0], high: float = GAP_RISE[1]) -> tuple[int, int] | None:
    """The safety layers: the blocks over which the gap rises from ``low`` to ``high`` of its rise.

    With l* = argmax g (first maximum), b = g(l_b) = min of g over 0 … l* (first minimum) and
    Δ = g(l*) − b: ``first`` = the first l ≥ l_b with g(l) ≥ b + low·Δ, ``last`` = the first
    l ≥ first with g(l) ≥ b + high·Δ. A simplification of the paper's § 3.4 (module doc).

    Args:
        gap: (L,) the gap c_NN − c_NM per layer (:func:`similarity_gap`).
        low, high: fractions of the rise, 0 ≤ low < high ≤ 1.

    Returns:
        ``(first, last)``: the safety layers are blocks first … last (inclusive), first ≤ last ≤ l*;
        ``None`` when the gap never rises (its maximum at or before its minimum: no safety layers,
        the paper's premise does not hold on this model and data).

    Raises:
        ValueError: ``gap`` not 1-D or with non-finite values, or bad fractions.
    """
    if gap.dim() != 1 or gap.numel() == 0 or not torch.isfinite(gap).all():
        raise ValueError(f"safety_layer_range: expected a finite 1-D gap curve, got shape {tuple(gap.shape)}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"safety_layer_range: need 0 ≤ low < high ≤ 1, got {low}, {high}")
    g = gap.double()
    peak = int(torch.argmax(g))
    base_at = int(torch.argmin(g[: peak + 1]))
    base, rise = float(g[base_at]), float(g[peak] - g[base_at])
    if rise <= 0.0:
        return None
    first = next(i for i in range(base_at, peak + 1) if float(g[i]) >= base + low * rise)
    last = next(i for i in range(first, peak + 1) if float(g[i]) >= base + high * rise)
    return first, last


def freeze_blocks(layers: dict[str, ManagedLayer], blocks: range) -> list[str]:
    """Freeze (``requires_grad=False``) the trainable parameters of the managed layers in ``blocks``.

    A layer with a PEFT LoRA wrapper has its adapters' ``lora_A`` / ``lora_B`` parameters frozen
    (its base weight is frozen by PEFT already); a layer without one (``--full``) has its own
    parameters frozen. Only layers of the language model's block stack (``part == "language"``)
    are touched. Call it before the optimizer is built.

    Returns:
        The names of the layers frozen, in ``layers`` order.
    """
    frozen = []
    for name, layer in layers.items():
        if layer.part != "language" or layer.block not in blocks:
            continue
        params = (
            [*layer.adapter.lora_A.parameters(), *layer.adapter.lora_B.parameters()]
            if layer.adapter is not None
            else list(layer.module.parameters())
        )
        for p in params:
            p.requires_grad_(False)
        frozen.append(name)
    return frozen


class SPPFT(Method):
    """Safely Partial-Parameter Fine-Tuning (module doc): the safety layers located on the aligned
    model in :meth:`before_tasks`, their layers frozen in every :meth:`begin_task`.

    Args:
        hpa: the run's :class:`~hpa_kernels.HPAConfig` (its calibration sizes; HPA's edit is turned off).
        low, high: the rise fractions of :func:`safety_layer_range`.
    """

    def __init__(self, hpa: HPAConfig | None = None, low: float = GAP_RISE[0], high: float = GAP_RISE[1]) -> None:
        super().__init__("sppft", replace(hpa or HPAConfig(), enabled=False))
        self.low, self.high = low, high
        self.blocks: range | None = None
        self.curves: dict[str, list[float]] = {}
        self.pairs = {"normal_normal": 0, "normal_malicious": 0}
        self.frozen: list[str] = []

    def describe(self) -> dict:
        return {
            "rule": "safety layers = blocks over which the N-N minus N-M cosine gap rises from low to high of its rise",
            "low": self.low,
            "high": self.high,
            "safety_layers": [] if self.blocks is None else list(self.blocks),
            "pairs": dict(self.pairs),
            "frozen_layers": len(self.frozen),
            **self.curves,
        }

    def before_tasks(self, run: RunContext) -> None:
        normal = last_position_states(run.chat, run.benign_prompts)
        malicious = last_position_states(run.chat, [prompt for prompt, _ in run.safety_pairs])
        gap, c_nn, c_nm = similarity_gap(normal, malicious)
        located = safety_layer_range(gap, self.low, self.high)
        if located is None:
            warnings.warn(
                "SPPFT: the cosine gap between normal-normal and normal-malicious prompt pairs never rises "
                "across depth on this model; no safety layers are frozen (SPPFT acts as SeqFT)",
                stacklevel=2,
            )
        self.blocks = range(0) if located is None else range(located[0], located[1] + 1)
        n, m = normal.shape[1], malicious.shape[1]
        self.pairs = {"normal_normal": n * (n - 1) // 2, "normal_malicious": n * m}
        self.curves = {"gap": gap.tolist(), "cos_normal_normal": c_nn.tolist(), "cos_normal_malicious": c_nm.tolist()}

    def begin_task(self, task: TaskContext) -> None:
        if self.blocks is None:
            raise RuntimeError("SPPFT.begin_task: the safety layers are not located (before_tasks was not called)")
        # Under --full a layer frozen by an earlier task is no longer in task.layers: keep every name.
        self.frozen += [name for name in freeze_blocks(task.layers, self.blocks) if name not in self.frozen]
