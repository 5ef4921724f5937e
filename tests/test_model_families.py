"""Which layers HPA manages, and a whole task on each model family users tune.

One table of tiny models built from configs (offline, CPU): Llama, Qwen2, GPT-2 (Conv1D), BERT,
T5 (encoder-decoder), Mixtral (fused 3-D experts), Jamba (hybrid Mamba / attention blocks), LLaVA,
Qwen2-VL and Idefics3 (vision tower + projector + text decoder), each where the installed
transformers has it.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from hpa_kernels import HessianCollector, HPAConfig, HPAOptimizer, functional  # noqa: E402
from hpa_kernels.integrations import calibrate  # noqa: E402
from hpa_kernels.layers import LANGUAGE_PARTS, find_block_stacks, find_hpa_layers, is_linear, stack_parts  # noqa: E402

VOCAB, LENGTH, BATCH = 64, 10, 2
IMAGE_TOKEN = 63  # LLaVA, Idefics3
QWEN_IMAGE, QWEN_START, QWEN_END = 60, 62, 63
TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
}


def _tokens(generator: torch.Generator, low: int = 1, high: int = 56) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and their mask, the first row padded from position T - 3."""
    input_ids = torch.randint(low, high, (BATCH, LENGTH), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, LENGTH - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def _causal(input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, **extra}


def text_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    return _causal(*_tokens(generator))


def bert_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    input_ids, attention_mask = _tokens(generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": torch.tensor([0, 2])}


def t5_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Encoder inputs and labels only: the decoder inputs come from the labels, as the loss does."""
    input_ids, attention_mask = _tokens(generator)
    labels = torch.randint(1, VOCAB, (BATCH, 6), generator=generator)
    labels[1, 4:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def llava_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Four image tokens per row (an 8×8 image in 4×4 patches), pixel values (B, 3, 8, 8)."""
    input_ids, attention_mask = _tokens(generator)
    input_ids[:, 1:5] = IMAGE_TOKEN
    batch = _causal(input_ids, attention_mask, pixel_values=torch.randn(BATCH, 3, 8, 8, generator=generator))
    batch["labels"][:, 1:5] = -100
    return batch


def idefics3_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    batch = llava_batch(generator)
    batch["pixel_values"] = batch["pixel_values"][:, None]  # (B, images, 3, 8, 8)
    return batch


def qwen2_vl_batch(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One 4×4-patch image per row (16 patches of 3·2·2·2 values), merged 2×2 into 4 image tokens."""
    input_ids, attention_mask = _tokens(generator, high=QWEN_IMAGE)
    input_ids[:, 1], input_ids[:, 2:6], input_ids[:, 6] = QWEN_START, QWEN_IMAGE, QWEN_END
    batch = _causal(
        input_ids,
        attention_mask,
        pixel_values=torch.randn(BATCH * 16, 24, generator=generator),
        image_grid_thw=torch.tensor([[1, 4, 4]] * BATCH),
        mm_token_type_ids=(input_ids == QWEN_IMAGE).long(),
    )
    batch["labels"][:, 1:7] = -100
    return batch


def _vision(**extra: int) -> dict[str, int]:
    return {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 2, **extra}


def build_llava() -> nn.Module:
    vision = transformers.CLIPVisionConfig(**_vision(image_size=8, patch_size=4, projection_dim=16))
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN
    )
    return transformers.LlavaForConditionalGeneration(config)


def build_qwen2_vl() -> nn.Module:
    config = transformers.Qwen2VLConfig(
        text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        vision_config={
            "depth": 2,
            "embed_dim": 16,
            "hidden_size": 16,
            "num_heads": 2,
            "patch_size": 2,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_chans": 3,
        },
        image_token_id=QWEN_IMAGE,
        video_token_id=61,
        vision_start_token_id=QWEN_START,
        vision_end_token_id=QWEN_END,
    )
    return transformers.Qwen2VLForConditionalGeneration(config)


def build_idefics3() -> nn.Module:
    config = transformers.Idefics3Config(
        text_config=TEXT,
        vision_config=_vision(image_size=8, patch_size=4),
        scale_factor=1,
        image_token_id=IMAGE_TOKEN,
    )
    return transformers.Idefics3ForConditionalGeneration(config)


@dataclass(frozen=True)
class Family:
    """One row of the table.

    Attributes:
        build: the tiny model.
        batch: one batch of its real training inputs (pixel values included), from a generator.
        stacks: ``{stack name: (part, L, linear layers in the stack)}``, every block stack of the model.
        warns: a regex every ``from_model`` warning must match (``None``: no warning at all).
        exclude: ``HPAConfig.exclude`` for the family (layers its forward never calls).
        marks: pytest marks of the whole-task test.
    """

    build: Callable[[], nn.Module]
    batch: Callable[[torch.Generator], dict[str, torch.Tensor]]
    stacks: dict[str, tuple[str, int, int]]
    warns: str | None = None
    exclude: tuple[str, ...] = ()
    marks: tuple = field(default_factory=tuple)


def _family(model_class: str, config_class: str, config: dict) -> Callable[[], nn.Module]:
    return lambda: getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


FAMILIES = {
    "llama": Family(
        _family("LlamaForCausalLM", "LlamaConfig", {**TEXT, "tie_word_embeddings": False}),
        text_batch,
        {"model.layers": ("language", 3, 3 * 7)},
    ),
    "qwen2": Family(
        _family("Qwen2ForCausalLM", "Qwen2Config", {**TEXT, "tie_word_embeddings": False}),
        text_batch,
        {"model.layers": ("language", 3, 3 * 7)},
    ),
    "gpt2": Family(
        _family("GPT2LMHeadModel", "GPT2Config", {"vocab_size": VOCAB, "n_embd": 16, "n_layer": 3, "n_head": 2}),
        text_batch,
        {"transformer.h": ("language", 3, 3 * 4)},  # Conv1D: c_attn, attn.c_proj, c_fc, mlp.c_proj
    ),
    "bert": Family(
        _family(
            "BertForSequenceClassification",
            "BertConfig",
            {
                "vocab_size": VOCAB,
                "hidden_size": 16,
                "num_hidden_layers": 3,
                "num_attention_heads": 2,
                "intermediate_size": 24,
                "num_labels": 3,
            },
        ),
        bert_batch,
        {"bert.encoder.layer": ("language", 3, 3 * 6)},
    ),
    "t5": Family(
        _family(
            "T5ForConditionalGeneration",
            "T5Config",
            {
                "vocab_size": VOCAB,
                "d_model": 16,
                "d_kv": 8,
                "d_ff": 24,
                "num_layers": 2,
                "num_decoder_layers": 3,
                "num_heads": 2,
                "decoder_start_token_id": 0,
                "pad_token_id": 0,
            },
        ),
        t5_batch,
        {"encoder.block": ("encoder", 2, 2 * 6), "decoder.block": ("decoder", 3, 3 * 10)},
    ),
    "mixtral": Family(
        _family(
            "MixtralForCausalLM",
            "MixtralConfig",
            {**TEXT, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2},
        ),
        text_batch,
        {"model.layers": ("language", 2, 2 * 4)},  # attention only: the experts are fused 3-D weights
        warns=r"(?s)not nn.Linear / Conv1D.*experts\.gate_up_proj.*experts\.down_proj",
    ),
    "jamba": Family(
        _family(
            "JambaForCausalLM",
            "JambaConfig",
            {
                **TEXT,
                "num_hidden_layers": 4,
                "num_experts": 2,
                "expert_layer_period": 2,
                "expert_layer_offset": 1,
                "attn_layer_period": 2,
                "attn_layer_offset": 1,
                "mamba_d_state": 4,
                "mamba_expand": 2,
                "mamba_dt_rank": 4,
            },
        ),
        text_batch,
        # Hybrid blocks (Mamba / attention, dense / MoE MLP): 3 + 3 linears in Mamba + dense blocks
        # (dt_proj excluded: the Mamba mixer multiplies by its weight without calling it), 4 in
        # attention + MoE blocks (the experts are fused 3-D weights).
        {"model.layers": ("language", 4, 2 * (3 + 3) + 2 * 4)},
        warns=r"(?s)not nn.Linear / Conv1D.*mamba\.conv1d\.weight.*experts\.gate_up_proj",
        exclude=("*.mamba.dt_proj",),
    ),
    "llava": Family(
        build_llava,
        llava_batch,
        {
            "model.vision_tower.encoder.layers": ("vision", 2, 2 * 6),
            "model.language_model.layers": ("language", 3, 3 * 7),
        },
    ),
    "qwen2_vl": Family(
        build_qwen2_vl,
        qwen2_vl_batch,
        {"model.visual.blocks": ("vision", 2, 2 * 4), "model.language_model.layers": ("language", 3, 3 * 7)},
    ),
    "idefics3": Family(
        build_idefics3,
        idefics3_batch,
        {
            "model.vision_model.encoder.layers": ("vision", 2, 2 * 6),
            "model.text_model.layers": ("language", 3, 3 * 7),
        },
    ),
}


def _installed(name: str) -> bool:
    try:
        FAMILIES[name].build()
    except (AttributeError, ImportError, TypeError, ValueError):
        return False
    return True


def _model(name: str, seed: int = 0) -> nn.Module:
    if not _installed(name):
        pytest.skip(f"the installed transformers has no {name}")
    torch.manual_seed(seed)
    return FAMILIES[name].build()


def _batches(name: str, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [FAMILIES[name].batch(generator) for _ in range(count)]


def _from_model(name: str, model: nn.Module) -> HPAOptimizer:
    """``from_model`` with the family's expected warnings (and no other)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = HPAOptimizer.from_model(
            model, lr=2e-2, weight_decay=0.0, backend="torch", hpa=HPAConfig(exclude=FAMILIES[name].exclude)
        )
    ours = [str(w.message) for w in caught if "HPA" in str(w.message)]
    expected = FAMILIES[name].warns
    if expected is None:
        assert not ours, ours
    else:
        assert ours and all(re.search(expected, message) for message in ours), ours
    return optimizer


@pytest.mark.parametrize("name", list(FAMILIES))
def test_managed_layers_and_depths(name: str) -> None:
    """The language model's block linears are managed, each stack with its own depth; towers, the
    projector, embeddings and heads are not."""
    model = _model(name)
    family = FAMILIES[name]
    stacks = dict(find_block_stacks(model))
    assert {s: (part, len(stacks[s])) for s, part in stack_parts(model).items()} == {
        s: (part, depth) for s, (part, depth, _) in family.stacks.items()
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = find_hpa_layers(model, HPAConfig(exclude=family.exclude))
    for stack, (part, depth, count) in family.stacks.items():
        linears = [
            n
            for n, m in model.named_modules()
            if is_linear(m) and n.startswith(stack + ".") and not any(fnmatch.fnmatchcase(n, p) for p in family.exclude)
        ]
        managed = [n for n in layers if n.startswith(stack + ".")]
        if part in LANGUAGE_PARTS:
            assert managed == linears and len(managed) == count, stack
            schedule = functional.retention_schedule(depth, 0.15, 0.05)
            for n in managed:
                block = int(n[len(stack) + 1 :].split(".")[0])
                assert (layers[n].block, layers[n].num_blocks, layers[n].part) == (block, depth, part), n
                assert layers[n].retain_ratio == schedule[block], n
        else:
            assert not managed and len(linears) == count, stack
    assert all(any(n.startswith(s + ".") for s in family.stacks) for n in layers)  # no head, no projector


@pytest.mark.parametrize("name", [pytest.param(n, marks=FAMILIES[n].marks) for n in FAMILIES])
def test_whole_task_on_real_inputs(name: str) -> None:
    """begin_task → AdamW steps → end_task, calibrated on the family's own inputs (pixel values
    included): every managed layer equals the functional edit of (W_prev, W_new) in its (out, in)
    view, and the edit leaves every other parameter as training left it."""
    model = _model(name)
    optimizer = _from_model(name, model)
    hinv_safety = calibrate(model, optimizer, _batches(name, 2, seed=1))
    w_prev = {n: layer.hpa_view(layer.module.weight).detach().clone() for n, layer in optimizer.hpa_layers.items()}
    optimizer.begin_task(hinv_safety)
    model.train()
    for batch in _batches(name, 3, seed=2):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    hinv_task = calibrate(model, optimizer, _batches(name, 2, seed=3))
    before_edit = {n: p.detach().clone() for n, p in model.named_parameters()}
    reports = optimizer.end_task(hinv_task)

    managed = {id(layer.module.weight) for layer in optimizer.hpa_layers.values()}
    for n, p in model.named_parameters():
        if id(p) not in managed:
            assert torch.equal(p, before_edit[n]), f"{n} changed by the edit"
    for n, layer in optimizer.hpa_layers.items():
        w_new = layer.hpa_view(before_edit[f"{n}.weight"])
        assert not torch.equal(w_new, w_prev[n]), f"{n} did not train"
        expected = functional.hpa_layer_update(
            w_prev[n], w_new, hinv_safety[n], hinv_task[n], layer.retain_ratio, backend="torch"
        ).weight
        torch.testing.assert_close(layer.hpa_view(layer.module.weight), expected, rtol=0, atol=1e-6, msg=n)
        assert reports[n].num_columns == layer.in_features
    assert sum(report.num_retained for report in reports.values()) > 0


# ------------------------------------------------------------------ calibration masks per part


def _vision_included(name: str) -> tuple[nn.Module, dict[str, object]]:
    model = _model(name)
    vision = next(s for s, (part, _, _) in FAMILIES[name].stacks.items() if part == "vision")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layers = find_hpa_layers(model, HPAConfig(include=(f"{vision}.*",)))
    return model, layers


@pytest.mark.parametrize(
    "name,vision_layer,patches",
    [
        ("llava", "model.vision_tower.encoder.layers.0.self_attn.q_proj", BATCH * 5),  # 4 patches + CLS
        ("qwen2_vl", "model.visual.blocks.0.attn.qkv", BATCH * 16),
        ("idefics3", "model.vision_model.encoder.layers.0.self_attn.q_proj", BATCH * 4),
    ],
)
def test_multimodal_masks_apply_to_the_decoder_text_positions(name: str, vision_layer: str, patches: int) -> None:
    """The batch's attention mask selects the decoder's positions (image tokens count as tokens);
    vision layers, included on request with their own depth, count every patch."""
    model, layers = _vision_included(name)
    assert layers[vision_layer].part == "vision" and layers[vision_layer].num_blocks == 2
    decoder_layer = next(n for n, layer in layers.items() if layer.part == "language")
    batch = _batches(name, 1, seed=4)[0]
    with torch.no_grad(), HessianCollector(model, layers) as collector:
        model(**{k: v for k, v in batch.items() if k != "labels"})
    assert collector.num_tokens(decoder_layer) == int(batch["attention_mask"].sum())
    assert collector.num_tokens(vision_layer) == patches


def test_encoder_decoder_stacks_take_their_own_masks() -> None:
    """T5 from a labels-only batch: encoder layers and the cross-attention keys/values count the
    encoder's unpadded positions, the decoder's own layers the positions its labels fill."""
    model = _model("t5")
    optimizer = _from_model("t5", model)
    batch = _batches("t5", 1, seed=5)[0]
    encoder_tokens = int(batch["attention_mask"].sum())
    # Shifted right: the start token, then every label but the last; row 1 ignores labels 4 and 5,
    # so its position 5 (holding label 4) is padding.
    decoder_tokens = 6 + (1 + 4)
    counts: dict[str, int] = {}
    original = HessianCollector.hinv

    def spy(self, damping=0.01):
        counts.update({n: self.num_tokens(n) for n in optimizer.hpa_layers})
        return original(self, damping)

    HessianCollector.hinv = spy
    try:
        calibrate(model, optimizer, [batch])
    finally:
        HessianCollector.hinv = original
    assert counts["encoder.block.1.layer.0.SelfAttention.q"] == encoder_tokens
    assert counts["decoder.block.2.layer.1.EncDecAttention.k"] == encoder_tokens
    assert counts["decoder.block.2.layer.1.EncDecAttention.q"] == decoder_tokens
    assert counts["decoder.block.0.layer.2.DenseReluDense.wo"] == decoder_tokens


def test_generate_style_calibration_counts_prompt_and_answer() -> None:
    """calibrate(forward=generate) on LLaVA: the prompt's unpadded positions, then one position per
    generated token fed back (a KV cache: each step's mask is the cached mask plus one)."""
    model = _model("llava")
    optimizer = _from_model("llava", model)
    batch = _batches("llava", 1, seed=6)[0]
    new_tokens = 3
    with HessianCollector(model, optimizer.hpa_layers) as collector, torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    expected = int(batch["attention_mask"].sum()) + BATCH * (new_tokens - 1)
    assert collector.num_tokens("model.language_model.layers.2.mlp.down_proj") == expected
    hinv = calibrate(
        model,
        optimizer,
        [batch],
        forward=lambda m, b: m.generate(**b, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0),
    )
    assert set(hinv) == set(optimizer.hpa_layers)


# ------------------------------------------------------------------ Conv1D, MoE, frozen, PEFT


def _as_linear(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Conv1D replaced by the equivalent nn.Linear (weight transposed)."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, transformers.pytorch_utils.Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, linear)
    return twin


def test_conv1d_calibration_equals_the_linear_one() -> None:
    """HPA's columns of a Conv1D are its input features: the same hinv as the equivalent nn.Linear."""
    model = _model("gpt2").eval()  # no dropout
    twin = _as_linear(model)
    layers = find_hpa_layers(model)
    assert layers["transformer.h.0.attn.c_attn"].transposed and layers["transformer.h.0.attn.c_attn"].in_features == 16
    batches = _batches("gpt2", 2, seed=7)
    hinvs = []
    for m in (model, twin):
        with torch.no_grad(), HessianCollector(m, list(layers)) as collector:
            for batch in batches:
                m(**{k: v for k, v in batch.items() if k != "labels"})
        hinvs.append(collector.hinv())
    for n in layers:
        assert hinvs[0][n].shape == (layers[n].in_features,)
        torch.testing.assert_close(hinvs[0][n], hinvs[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_conv1d_edit_equals_the_linear_edit() -> None:
    """The end-of-task edit of GPT-2's Conv1D layers is the edit of the equivalent nn.Linear layers."""
    model = _model("gpt2")
    twin = _as_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizers = [HPAOptimizer.from_model(m, lr=1e-2, backend="torch") for m in (model, twin)]
    generator = torch.Generator().manual_seed(8)
    hinv = {
        n: torch.rand(layer.in_features, generator=generator) + 0.5 for n, layer in optimizers[0].hpa_layers.items()
    }
    delta = {
        n: torch.randn(layer.hpa_view(layer.module.weight).shape, generator=generator) * 0.01
        for n, layer in optimizers[0].hpa_layers.items()
    }
    for optimizer in optimizers:
        optimizer.begin_task(hinv)
        with torch.no_grad():  # the task's update, the same for both layouts
            for n, layer in optimizer.hpa_layers.items():
                layer.hpa_view(layer.module.weight).add_(delta[n])
        optimizer.end_task({n: 2 * h for n, h in hinv.items()})
    for n, layer in optimizers[0].hpa_layers.items():
        twin_layer = optimizers[1].hpa_layers[n]
        torch.testing.assert_close(layer.module.weight.T, twin_layer.module.weight, rtol=0, atol=1e-6, msg=n)


def _quiet_from_model(model: nn.Module, **kwargs) -> HPAOptimizer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HPAOptimizer.from_model(model, **kwargs)


def _state_index(optimizer: HPAOptimizer, name: str) -> int:
    """The key of managed layer ``name``'s weight in ``optimizer.state_dict()["state"]``."""
    weight = optimizer.hpa_layers[name].module.weight
    return next(i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if p is weight)


@pytest.mark.parametrize("master_weights", [False, True], ids=["fp32", "bf16-master"])
def test_conv1d_task_with_steps_and_a_saved_state_equals_the_linear_one(master_weights: bool) -> None:
    """AdamW steps, a state dict saved mid-task and loaded into a fresh optimizer, then end_task on
    the default backend: GPT-2's Conv1D layers end bit-equal to the equivalent nn.Linear layers,
    with the same reports (bf16 parameters: the edit acts on the fp32 master copy, the parameter
    receives its rounding)."""
    dtype = torch.bfloat16 if master_weights else torch.float32
    model = _model("gpt2")
    twin = _as_linear(model).to(dtype)
    model.to(dtype)
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "master_weights": master_weights}
    optimizers = [_quiet_from_model(m, **kwargs) for m in (model, twin)]
    layers = optimizers[0].hpa_layers
    generator = torch.Generator().manual_seed(12)
    hinv = {n: torch.rand(layer.in_features, generator=generator) + 0.5 for n, layer in layers.items()}
    grads = [
        {n: torch.randn(layer.hpa_view(layer.module.weight).shape, generator=generator) for n, layer in layers.items()}
        for _ in range(3)
    ]
    results = []
    for m, optimizer in zip((model, twin), optimizers):
        optimizer.begin_task(hinv)
        for step_grads in grads:
            optimizer.zero_grad()
            for n, layer in optimizer.hpa_layers.items():  # the same (out, in) gradient in both layouts
                grad = step_grads[n].T if layer.transposed else step_grads[n]
                layer.module.weight.grad = grad.to(dtype).contiguous()
            optimizer.step()
        saved = copy.deepcopy(optimizer.state_dict())
        assert saved["state"][_state_index(optimizer, "transformer.h.0.attn.c_attn")]["hpa_hinv_safety"].shape == (16,)
        resumed = _quiet_from_model(m, **kwargs)
        resumed.load_state_dict(saved)
        results.append(resumed.end_task({n: 2 * h for n, h in hinv.items()}))
    assert sum(report.num_retained for report in results[0].values()) > 0
    for n, layer in layers.items():
        assert layer.transposed and not optimizers[1].hpa_layers[n].transposed
        assert results[0][n] == results[1][n], n
        assert torch.equal(layer.module.weight.T, optimizers[1].hpa_layers[n].module.weight), n


def test_conv1d_saved_state_is_checked_by_input_features() -> None:
    """A snapshot's safety statistics of a Conv1D are (in_features,): c_attn's (16,), not its (48,)
    output features; a state dict holding the wrong length is refused, naming the layer."""
    model = _model("gpt2")
    optimizer = _quiet_from_model(model)
    optimizer.begin_task({n: torch.ones(layer.in_features) for n, layer in optimizer.hpa_layers.items()})
    saved = copy.deepcopy(optimizer.state_dict())
    param_index = _state_index(optimizer, "transformer.h.0.attn.c_attn")
    assert saved["state"][param_index]["hpa_hinv_safety"].shape == (16,)
    saved["state"][param_index]["hpa_hinv_safety"] = torch.ones(48)
    with pytest.raises(ValueError, match=r"hpa_hinv_safety.*transformer\.h\.0\.attn\.c_attn.*expected \(16,\)"):
        _quiet_from_model(model).load_state_dict(saved)


def test_conv1d_online_mode_and_sharding_are_refused_naming_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The online step works on (out, in) row-major weights: begin_task refuses a Conv1D in online
    mode, and a sharded (DTensor) Conv1D in any mode, before storing anything."""
    from hpa_kernels import distributed

    model = _model("gpt2")
    online = _quiet_from_model(model, hpa=HPAConfig(online=True, refresh_every=2))
    hinv = {n: torch.ones(layer.in_features) for n, layer in online.hpa_layers.items()}
    with pytest.raises(ValueError, match=r"online mode does not support 'transformer\.h\.0\.attn\.c_attn'.*Conv1D"):
        online.begin_task(hinv)
    assert not online.in_task and not any("hpa_prev" in state for state in online.state.values())
    offline = _quiet_from_model(model)
    c_fc = offline.hpa_layers["transformer.h.1.mlp.c_fc"].module.weight
    monkeypatch.setattr(distributed, "is_sharded", lambda tensor: tensor is c_fc)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.mlp\.c_fc' is a sharded \(DTensor\) Conv1D"):
        offline.begin_task(hinv)
    assert not offline.in_task and not any("hpa_prev" in state for state in offline.state.values())


def test_a_named_frozen_layer_is_managed_by_from_model() -> None:
    """A frozen vision tower named in include: from_model manages its layers (not refused), their
    weights join the optimizer without gradients, and their edit leaves them as they were."""
    model = _model("llava")
    model.model.vision_tower.requires_grad_(False)
    optimizer = _quiet_from_model(
        model, lr=2e-2, backend="torch", hpa=HPAConfig(include=("*vision_tower.encoder.layers.1.mlp.*",))
    )
    named = [n for n, layer in optimizer.hpa_layers.items() if layer.part == "vision"]
    assert named == ["model.vision_tower.encoder.layers.1.mlp.fc1", "model.vision_tower.encoder.layers.1.mlp.fc2"]
    before = {n: optimizer.hpa_layers[n].module.weight.detach().clone() for n in named}
    optimizer.begin_task(calibrate(model, optimizer, _batches("llava", 1, seed=13)))
    model.train()
    for batch in _batches("llava", 2, seed=14):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    reports = optimizer.end_task(calibrate(model, optimizer, _batches("llava", 1, seed=15)))
    assert set(reports) == set(optimizer.hpa_layers)
    for n in named:
        assert torch.equal(optimizer.hpa_layers[n].module.weight, before[n]), n
        assert reports[n].coef == 0.0


def test_mixtral_experts_are_named_in_a_warning_and_left_alone() -> None:
    model = _model("mixtral")
    with pytest.warns(UserWarning, match=r"MixtralExperts\.gate_up_proj \(4, 48, 16\): model\.layers\.0\.mlp"):
        layers = find_hpa_layers(model)
    assert {n.split(".")[-1] for n in layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_frozen_vision_tower_and_frozen_blocks() -> None:
    """The usual set-up: a frozen vision tower is not managed and not refused; a frozen decoder
    layer is skipped with a warning; a frozen layer named in include is managed."""
    model = _model("llava")
    model.model.vision_tower.requires_grad_(False)
    optimizer = _from_model("llava", model)
    assert all(layer.part == "language" for layer in optimizer.hpa_layers.values())
    frozen = model.model.language_model.layers[0].self_attn.q_proj
    frozen.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"skips 1 frozen layer.*layers\.0\.self_attn\.q_proj"):
        layers = find_hpa_layers(model)
    assert "model.language_model.layers.0.self_attn.q_proj" not in layers
    named = find_hpa_layers(model, HPAConfig(include=("*vision_tower*",)))
    assert "model.language_model.layers.0.self_attn.q_proj" not in named
    assert named["model.vision_tower.encoder.layers.1.mlp.fc2"].block == 1


def test_peft_lora_on_a_vlm_manages_every_wrapped_decoder_linear() -> None:
    """from_model(peft_model): the base_layer of every LoRA wrapper in the text decoder (frozen by
    PEFT) is managed; wrappers in the vision tower are not; the edit runs."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(_model("llava"), config)
    optimizer = _from_model("llava", model)
    wrapped = [
        n + ".base_layer"
        for n, m in model.named_modules()
        if hasattr(m, "base_layer") and ".language_model.layers." in n
    ]
    assert len(wrapped) == 3 * 3 and sorted(optimizer.hpa_layers) == sorted(wrapped)
    optimizer.begin_task(calibrate(model, optimizer, _batches("llava", 1, seed=9)))
    model.train()
    for batch in _batches("llava", 2, seed=10):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    reports = optimizer.end_task(calibrate(model, optimizer, _batches("llava", 1, seed=11)))
    assert set(reports) == set(wrapped)


def test_nothing_managed_warns_with_the_reason() -> None:
    model = _model("llava")
    with pytest.warns(UserWarning, match=r"manages no layer.*frozen or excluded"):
        assert find_hpa_layers(model, HPAConfig(exclude=("*language_model*",))) == {}
