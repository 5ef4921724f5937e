"""PEFT LoRA (merge, edit, fresh adapters) and the Hugging Face Trainer callback, on tiny Llama
models built from a config (offline, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers import tiny_llama  # noqa: E402

from hpa_kernels import HPAOptimizer, functional  # noqa: E402
from hpa_kernels.integrations import HPACallback, calibrate, decoder_attention_mask  # noqa: E402

VOCAB, LENGTH = 64, 8


def batches(count: int, seed: int, size: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    result = []
    for _ in range(count):
        input_ids = torch.randint(0, VOCAB, (size, LENGTH), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, LENGTH // 2 :] = 0  # one padded row: padding must not count
        result.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone()})
    return result


def lora_model(seed: int = 0) -> torch.nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return peft.get_peft_model(tiny_llama(VOCAB, seed), config)


def train(model, optimizer, data) -> None:
    model.train()
    for batch in data:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def test_lora_merge_edit_and_fresh_adapters() -> None:
    """end_task on a PEFT model edits W + scale·BA (peft's own merge) from the merged snapshot,
    and leaves zero-B adapters whose moments are dropped; begin_task snapshots merged weights."""
    model = lora_model()
    optimizer = HPAOptimizer.from_model(model, lr=2e-2, backend="torch")
    names = list(optimizer.hpa_layers)
    assert names and all(name.endswith(".base_layer") for name in names)
    assert {name.split(".")[-2] for name in names} == {"q_proj", "v_proj", "down_proj"}

    safety, task = batches(2, seed=1), batches(2, seed=2)
    hinv_safety = calibrate(model, optimizer, safety)
    w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    optimizer.begin_task(hinv_safety)
    train(model, optimizer, batches(3, seed=3))
    hinv_task = calibrate(model, optimizer, task)

    merged = copy.deepcopy(model).merge_and_unload()  # peft's merge: the reference W_new
    merged_weights = dict(merged.named_parameters())
    reports = optimizer.end_task(hinv_task)

    for name, layer in optimizer.hpa_layers.items():
        w_new = merged_weights[name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"]
        expected = functional.hpa_layer_update(
            w_prev[name], w_new, hinv_safety[name], hinv_task[name], layer.retain_ratio, backend="torch"
        ).weight
        torch.testing.assert_close(layer.module.weight, expected, rtol=0, atol=1e-6, msg=name)
        for lora_b in layer.adapter.lora_B.values():
            assert not lora_b.weight.any() and lora_b.weight not in optimizer.state
    assert sum(report.num_retained for report in reports.values()) > 0

    # The next task trains fresh adapters; begin_task snapshots base + scale·BA, without writing.
    train(model, optimizer, batches(1, seed=4))
    optimizer.begin_task(calibrate(model, optimizer, safety))
    merged = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for name, layer in optimizer.hpa_layers.items():
        key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
        torch.testing.assert_close(optimizer.state[layer.module.weight]["hpa_prev"], merged[key], rtol=0, atol=1e-6)
        assert not torch.equal(layer.module.weight, merged[key])


class _Spy(transformers.TrainerCallback):
    """Placed before HPACallback: records W_new and the task statistics HPACallback will see."""

    def __init__(self, optimizer, task) -> None:
        self.optimizer, self.task = optimizer, task

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.w_new = {name: layer.module.weight.detach().clone() for name, layer in self.optimizer.hpa_layers.items()}
        self.hinv_task = calibrate(model, self.optimizer, self.task)


def test_trainer_callback_runs_the_lifecycle_per_task(tmp_path) -> None:
    """Two tasks through Trainer.train() with HPAOptimizer as its optimizer: each run is one
    HPA task, and the weights after it equal the functional edit of (W_prev, W_new)."""
    model = tiny_llama(VOCAB)
    optimizer = HPAOptimizer.from_model(model, lr=1e-2, weight_decay=0.0, backend="torch")
    safety = batches(2, seed=1)
    callback = HPACallback(optimizer, safety_data=safety)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    for task_index in range(2):
        train_set = [
            {key: value[row] for key, value in batch.items()}
            for batch in batches(3, seed=10 + task_index)
            for row in range(4)
        ]
        task = batches(1, seed=20 + task_index)
        callback.task_data = task
        spy = _Spy(optimizer, task)
        w_prev = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
        hinv_safety = calibrate(model, optimizer, safety)
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=train_set, optimizers=(optimizer, None), callbacks=[spy, callback]
        )
        trainer.train()
        assert optimizer.tasks_completed == task_index + 1 and not optimizer.in_task
        assert len(callback.reports) == task_index + 1
        for name, layer in optimizer.hpa_layers.items():
            assert not torch.equal(spy.w_new[name], w_prev[name]), "the Trainer did not train"
            expected = functional.hpa_layer_update(
                w_prev[name],
                spy.w_new[name],
                hinv_safety[name],
                spy.hinv_task[name],
                layer.retain_ratio,
                backend="torch",
            ).weight
            torch.testing.assert_close(layer.module.weight, expected, rtol=0, atol=1e-6, msg=name)


def test_callback_defaults_to_the_training_data(tmp_path) -> None:
    """Without task_data the callback calibrates on the first task_samples training examples."""
    model = tiny_llama(VOCAB)
    optimizer = HPAOptimizer.from_model(
        model, lr=1e-2, backend="torch", hpa=__import__("hpa_kernels").HPAConfig(task_samples=6)
    )
    callback = HPACallback(optimizer, safety_data=batches(1, seed=1))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    train_set = [{key: value[row] for key, value in batch.items()} for batch in batches(2, seed=5) for row in range(4)]
    transformers.Trainer(
        model=model, args=args, train_dataset=train_set, optimizers=(optimizer, None), callbacks=[callback]
    ).train()
    assert optimizer.tasks_completed == 1 and len(callback.reports) == 1


def test_decoder_attention_mask_follows_the_shift_of_the_labels() -> None:
    """Decoder input t holds labels[t - 1] (t ≥ 1) or the start token (t = 0): padding is where the
    shifted label is ignored (-100)."""
    labels = torch.tensor([[5, 6, 7, 8], [5, 6, -100, -100]])
    assert decoder_attention_mask(labels).tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
