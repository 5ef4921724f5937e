"""``hpa-calibrate`` / ``hpa-adjust`` on checkpoints whose tensors are not stored as their modules:
GPT-2 (``Conv1D`` weights stored (in_features, out_features)) and LLaVA (a vision tower and a
projector in front of a Llama decoder; calibration with images read by the model's own processor;
tensor names that differ from module names, in both layouts ``save_pretrained`` writes). Tiny
models built from configs, a processor built offline, PNG images written with PIL."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
PIL_Image = pytest.importorskip("PIL.Image")

from hpa_kernels import HPAConfig, HPAOptimizer  # noqa: E402
from hpa_kernels.checkpoint import (  # noqa: E402
    adjust_checkpoint,
    adjust_main,
    calibrate_checkpoint,
    calibrate_main,
    checkpoint_files,
    load_hinv,
)
from hpa_kernels.integrations import calibrate  # noqa: E402


def stored(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(set(checkpoint_files(directory).values())):
        tensors.update(safetensors_torch.load_file(str(path)))
    return tensors


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def ids_records(count: int, seed: int, vocab: int, length: int = 6) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (length,), generator=generator).tolist()} for _ in range(count)]


# ---------------------------------------------------------------------------------------- GPT-2

GPT2_VOCAB = 40


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=32, n_embd=16, n_layer=3, n_head=2, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_checkpoint_edit_equals_end_task(tmp_path) -> None:
    """GPT-2's Conv1D weights are stored (in, out): hpa-calibrate + hpa-adjust take each one's
    columns from its input features (c_attn (16, 48), mlp.c_proj (64, 16), the square
    attn.c_proj (16, 16) not transposed by mistake) and give bit for bit the weights of
    HPAOptimizer.end_task on the same model and statistics, whose Conv1D edit is that of the
    equivalent nn.Linear (tests/test_model_families.py)."""
    model = tiny_gpt2()
    optimizer = HPAOptimizer.from_model(model, lr=2e-2, backend="torch")
    conv1d = {f"{name}.weight" for name, layer in optimizer.hpa_layers.items() if layer.transposed}
    assert len(conv1d) == 12 and len(optimizer.hpa_layers) == 12
    write_jsonl(tmp_path / "safety.jsonl", ids_records(3, seed=1, vocab=GPT2_VOCAB))
    write_jsonl(tmp_path / "task.jsonl", ids_records(3, seed=2, vocab=GPT2_VOCAB))
    model.save_pretrained(tmp_path / "before")

    safety_file, task_file = str(tmp_path / "safety.safetensors"), str(tmp_path / "task.safetensors")
    argv = ["--model", str(tmp_path / "before"), "--data", str(tmp_path / "safety.jsonl"), "--out", safety_file]
    assert calibrate_main(argv) == 0
    hinv_safety = load_hinv(safety_file)
    assert set(hinv_safety) == conv1d
    in_memory = calibrate(model, optimizer, [{"input_ids": torch.tensor([r["input_ids"]])} for r in
                                             ids_records(3, seed=1, vocab=GPT2_VOCAB)])  # fmt: skip
    for name, vec in in_memory.items():
        assert vec.shape == (optimizer.hpa_layers[name].in_features,)
        torch.testing.assert_close(hinv_safety[f"{name}.weight"], vec, rtol=1e-5, atol=0, msg=name)

    optimizer.begin_task({name.removesuffix(".weight"): vec for name, vec in hinv_safety.items()})
    for record in ids_records(4, seed=3, vocab=GPT2_VOCAB):
        ids = torch.tensor([record["input_ids"]])
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path / "after")
    argv = ["--model", str(tmp_path / "after"), "--data", str(tmp_path / "task.jsonl"), "--out", task_file]
    assert calibrate_main(argv) == 0
    reports = optimizer.end_task({name.removesuffix(".weight"): vec for name, vec in load_hinv(task_file).items()})
    expected = {f"{name}.weight": layer.module.weight.detach() for name, layer in optimizer.hpa_layers.items()}

    argv = ["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--out", str(tmp_path / "out")]
    assert adjust_main([*argv, "--safety", safety_file, "--task", task_file, "--backend", "torch"]) == 0
    after, out = stored(tmp_path / "after"), stored(tmp_path / "out")
    assert set(out) == set(after)
    for name, tensor in out.items():
        if name in expected:
            assert tensor.shape == after[name].shape, name  # written back in storage layout (in, out)
            assert torch.equal(tensor, expected[name]), name
            assert not torch.equal(tensor, after[name]), name  # an edit, not a copy
        else:
            assert torch.equal(tensor, after[name]), name
    # The reports count input features (the rows of the stored tensor).
    direct = adjust_checkpoint(
        tmp_path / "before", tmp_path / "after", safety_file, task_file, tmp_path / "out2", backend="torch"
    )
    for name, report in direct.items():
        assert report == reports[name.removesuffix(".weight")], name
    assert direct["transformer.h.0.attn.c_attn.weight"].num_columns == 16
    assert direct["transformer.h.0.mlp.c_proj.weight"].num_columns == 64


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_transposed_tensors_of_a_bare_checkpoint(tmp_path, backend: str) -> None:
    """Without a config.json the layout comes from ``transposed=``: the edit of an (in, out) tensor is
    the transpose of the edit of its (out, in) form (the kernels plan and write on strided views)."""
    from hpa_kernels import functional, ops

    try:
        ops.resolve_backend(backend, torch.device("cpu"))
    except ValueError as error:
        pytest.skip(str(error))

    generator = torch.Generator().manual_seed(0)
    names = [f"h.{i}.proj.weight" for i in range(2)]
    before = {name: torch.randn(7, 5, generator=generator) for name in names}  # (in 7, out 5)
    after = {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in before.items()}
    for directory, tensors in (("before", before), ("after", after)):
        (tmp_path / directory).mkdir()
        safetensors_torch.save_file(tensors, str(tmp_path / directory / "model.safetensors"))
    hinv_s = {name: torch.rand(7, generator=generator) + 0.5 for name in names}
    hinv_t = {name: torch.rand(7, generator=generator) + 0.5 for name in names}
    with pytest.raises(ValueError, match=r"stored \(out, in\) \(7, 5\)\) must be \(5,\)"):
        adjust_checkpoint(tmp_path / "before", tmp_path / "after", hinv_s, hinv_t, tmp_path / "x")
    reports = adjust_checkpoint(
        tmp_path / "before", tmp_path / "after", hinv_s, hinv_t, tmp_path / "out", transposed=names, backend=backend
    )
    out = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    ratios = functional.retention_schedule(2)
    for block, name in enumerate(names):
        linear = functional.hpa_layer_update(
            before[name].T.contiguous(),
            after[name].T.contiguous(),
            hinv_s[name],
            hinv_t[name],
            ratios[block],
            backend=backend,
        )
        assert torch.equal(out[name], linear.weight.T), name
        assert reports[name].num_columns == 7


# ---------------------------------------------------------------------------------------- LLaVA

VOCAB, IMAGE_TOKEN = 64, 63
WORDS = [f"w{i}" for i in range(60)]
VISION_AND_PROJECTOR = HPAConfig(include=("*vision_tower*", "*multi_modal_projector*"))
LEGACY_LLAVA_RULES = {  # LlavaForConditionalGeneration._checkpoint_conversion_mapping of transformers 4.5x
    "^language_model.model": "model.language_model",
    "^vision_tower": "model.vision_tower",
    "^multi_modal_projector": "model.multi_modal_projector",
    "^language_model.lm_head": "lm_head",
}


def tiny_llava(seed: int = 0) -> torch.nn.Module:
    """CLIP vision tower (8×8 images in 4×4 patches) + projector + 3-block Llama decoder."""
    torch.manual_seed(seed)
    vision = transformers.CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
        projection_dim=16,
    )
    text = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    return transformers.LlavaForConditionalGeneration(config)


def tiny_processor():
    """A LlavaProcessor built offline: a word-level tokenizer with ``<image>`` (id 63) and a CLIP
    image processor to 8×8 (the PIL backend, which needs no torchvision)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(WORDS)}, "<image>": IMAGE_TOKEN}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<image>"])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[UNK]")
    image_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    images = image_cls(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return transformers.LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=4,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def write_images(folder) -> None:
    """Small PNGs of different sizes and modes (the processor resizes, crops and converts them)."""
    import numpy as np

    folder.mkdir()
    generator = np.random.default_rng(0)
    for name, shape in (("a.png", (10, 12, 3)), ("b.png", (8, 8, 3)), ("c.png", (16, 9))):
        PIL_Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)


def llava_records(seed: int) -> list[dict]:
    """Image + text (the image token in the text, or not), text only, two images and no text, and
    token ids that hold the image's tokens already."""
    generator = torch.Generator().manual_seed(seed)

    def words(count: int) -> str:
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (count,), generator=generator))

    ids = [1, 2, *([IMAGE_TOKEN] * 4), *torch.randint(1, 60, (3,), generator=generator).tolist()]
    return [
        {"text": f"{words(2)} <image> {words(3)}", "image": "img/a.png"},
        {"text": words(4), "image": "img/c.png"},
        {"text": words(5)},
        {"image": ["img/a.png", "img/b.png"]},
        {"input_ids": ids, "image": "img/b.png"},
    ]


def processor_batches(processor, records, folder) -> list[dict[str, torch.Tensor]]:
    """What hpa-calibrate should run, built by hand with the same processor."""
    batches = []
    for record in records:
        paths = record.get("image", [])
        images = [PIL_Image.open(folder / p).convert("RGB") for p in ([paths] if isinstance(paths, str) else paths)]
        if "input_ids" in record:
            ids = torch.tensor([record["input_ids"]])
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            batch.update(processor.image_processor(images=images, return_tensors="pt"))
        else:
            text = record.get("text", "")
            if images and "<image>" not in text:
                text = "<image>" * len(images) + ("\n" if text else "") + text
            batch = dict(processor(text=text, images=images or None, return_tensors="pt"))
        batches.append(batch)
    return batches


def save_llava(model, processor, directory, layout: str) -> None:
    """``original``: the names save_pretrained writes by default (``language_model.model.layers.…``);
    ``modules``: the module names (``save_original_format=False``)."""
    if layout == "original":
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, save_original_format=False)
    processor.save_pretrained(directory)


def test_llava_saved_names_differ_from_module_names(tmp_path) -> None:
    """The premise: in the installed transformers the default save writes names that are not the
    module names, and both layouts load into the same modules."""
    model = tiny_llava()
    for layout in ("original", "modules"):
        save_llava(model, tiny_processor(), tmp_path / layout, layout)
    original, modules = set(stored(tmp_path / "original")), set(stored(tmp_path / "modules"))
    if original == modules:
        pytest.skip("this transformers saves LLaVA under its module names")
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in modules
    assert "model.language_model.layers.0.self_attn.q_proj.weight" not in original
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in original


@pytest.mark.parametrize("layout", ["original", "modules"])
def test_calibrate_with_images_equals_the_in_memory_path(tmp_path, layout: str) -> None:
    """hpa-calibrate on a JSONL with images (paths relative to the file) reads them with the
    processor saved with the checkpoint: its hinv vectors are those of integrations.calibrate on
    the processor's batches, pixel values included (the decoder counts the image tokens), for the
    decoder, the vision tower and the projector; keyed by module weight name in both layouts."""
    model, processor = tiny_llava(), tiny_processor()
    save_llava(model, processor, tmp_path / "model", layout)
    data = tmp_path / "data"
    data.mkdir()
    write_images(data / "img")
    records = llava_records(seed=1)
    write_jsonl(data / "cal.jsonl", records)

    optimizer = HPAOptimizer.from_model(model, hpa=VISION_AND_PROJECTOR)
    batches = processor_batches(processor, records, data)
    assert [int((b["input_ids"] == IMAGE_TOKEN).sum()) for b in batches] == [4, 4, 0, 8, 4]
    expected = calibrate(model, optimizer, batches)
    decoder_only = HPAOptimizer.from_model(model)
    blind = calibrate(model, decoder_only, [{k: v for k, v in b.items() if k != "pixel_values"} for b in batches])
    out = tmp_path / "hinv.safetensors"
    argv = ["--model", str(tmp_path / "model"), "--data", str(data / "cal.jsonl"), "--out", str(out)]
    assert calibrate_main([*argv, "--include", "*vision_tower*", "--include", "*multi_modal_projector*"]) == 0
    written = load_hinv(out)
    assert set(written) == {f"{name}.weight" for name in optimizer.hpa_layers}
    parts = {layer.part for layer in optimizer.hpa_layers.values()}
    assert parts == {"language", "vision", "other"}
    for name, vec in expected.items():
        torch.testing.assert_close(written[f"{name}.weight"], vec, rtol=1e-5, atol=0, msg=name)
    decoder = "model.language_model.layers.0.self_attn.q_proj"
    assert not torch.allclose(blind[decoder], expected[decoder], rtol=1e-3)  # the images matter

    # --max-length cuts each sample, never inside its image tokens (they stay with their pixel values).
    def cut(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        images = (batch["input_ids"][0] == IMAGE_TOKEN).nonzero()
        keep = max(length, int(images[-1]) + 1 if images.numel() else 0)
        return {k: v[:, :keep] if k in ("input_ids", "attention_mask") else v for k, v in batch.items()}

    short = [cut(batch, 3) for batch in batches]
    assert [b["input_ids"].shape[1] for b in short] == [6, 4, 3, 8, 6]
    expected_short = calibrate(model, optimizer, short)
    written_short = calibrate_checkpoint(
        tmp_path / "model", data / "cal.jsonl", max_length=3, config=VISION_AND_PROJECTOR
    )
    for name, vec in expected_short.items():
        torch.testing.assert_close(written_short[f"{name}.weight"], vec, rtol=1e-5, atol=0, msg=name)

    # Text-only lines alone still work (the tokenizer saved by the processor), decoder layers only.
    write_jsonl(data / "text.jsonl", [r for r in records if "image" not in r])
    text_only = calibrate_checkpoint(tmp_path / "model", data / "text.jsonl")
    for name, vec in calibrate(model, decoder_only, batches[2:3]).items():
        torch.testing.assert_close(text_only[f"{name}.weight"], vec, rtol=1e-5, atol=0, msg=name)


def test_calibrate_refuses_images_it_cannot_read(tmp_path) -> None:
    model = tiny_llava()
    model.save_pretrained(tmp_path / "model")
    tiny_processor().tokenizer.save_pretrained(tmp_path / "model")  # a tokenizer, no processor
    write_images(tmp_path / "img")
    write_jsonl(tmp_path / "cal.jsonl", [{"text": "w1 w2", "image": "img/a.png"}])
    with pytest.raises(ValueError, match="processor"):
        calibrate_checkpoint(tmp_path / "model", tmp_path / "cal.jsonl")
    tiny_processor().save_pretrained(tmp_path / "model")
    write_jsonl(tmp_path / "cal.jsonl", [{"text": "w1 w2", "image": "img/none.png"}])
    with pytest.raises(ValueError, match="does not exist"):
        calibrate_checkpoint(tmp_path / "model", tmp_path / "cal.jsonl")


@pytest.mark.parametrize(
    "layouts",
    [("original", "original"), ("modules", "modules"), ("original", "modules")],
    ids=["original", "modules", "mixed"],
)
def test_llava_checkpoint_edit_equals_end_task(tmp_path, layouts: tuple[str, str]) -> None:
    """hpa-calibrate (images) + hpa-adjust on LLaVA checkpoints, whose stored names map to module
    names by the model's own conversion rules (before and after may use different layouts): the
    edited checkpoint loads into the weights HPAOptimizer.end_task gives in memory, bit for bit,
    for the decoder, the vision tower and the projector; every other tensor is copied as is."""
    model, processor = tiny_llava(), tiny_processor()
    optimizer = HPAOptimizer.from_model(model, hpa=VISION_AND_PROJECTOR, lr=2e-2, backend="torch")
    data = tmp_path / "data"
    data.mkdir()
    write_images(data / "img")
    write_jsonl(data / "safety.jsonl", llava_records(seed=1))
    write_jsonl(data / "task.jsonl", llava_records(seed=2))
    include = ["--include", "*vision_tower*", "--include", "*multi_modal_projector*"]

    def hpa_calibrate(checkpoint: str, jsonl: str) -> dict[str, torch.Tensor]:
        out = str(tmp_path / f"{checkpoint}.safetensors")
        argv = ["--model", str(tmp_path / checkpoint), "--data", str(data / jsonl), "--out", out, *include]
        assert calibrate_main(argv) == 0
        return {name.removesuffix(".weight"): vec for name, vec in load_hinv(out).items()}

    save_llava(model, processor, tmp_path / "before", layouts[0])
    optimizer.begin_task(hpa_calibrate("before", "safety.jsonl"))
    for batch in processor_batches(processor, llava_records(seed=3), data):
        labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_TOKEN, -100)
        optimizer.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
    save_llava(model, processor, tmp_path / "after", layouts[1])
    trained = {name: layer.module.weight.detach().clone() for name, layer in optimizer.hpa_layers.items()}
    optimizer.end_task(hpa_calibrate("after", "task.jsonl"))
    edited = [
        name for name, layer in optimizer.hpa_layers.items() if not torch.equal(layer.module.weight, trained[name])
    ]
    assert {name.split(".")[1] for name in edited} == {"language_model", "vision_tower", "multi_modal_projector"}

    argv = ["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--out", str(tmp_path / "out")]
    argv += ["--safety", str(tmp_path / "before.safetensors"), "--task", str(tmp_path / "after.safetensors")]
    assert adjust_main([*argv, "--backend", "torch"]) == 0
    after, out = stored(tmp_path / "after"), stored(tmp_path / "out")
    assert set(out) == set(after)  # the after checkpoint's names and files
    changed = [name for name in out if not torch.equal(out[name], after[name])]
    assert len(changed) == len(edited)  # (the last vision block, unused by LLaVA, has no update: Ŵ = W)
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "out"), local_files_only=True)
    expected = dict(model.named_parameters())
    for name, param in loaded.named_parameters():
        assert torch.equal(param, expected[name]), name


def test_legacy_conversion_rules_give_the_same_names(tmp_path, monkeypatch) -> None:
    """transformers < 5 keeps the renamings in ``_checkpoint_conversion_mapping``: that path maps
    LLaVA's original names to the same module names as the installed transformers' rules."""
    import sys

    from hpa_kernels.checkpoint.names import loading_names, meta_model

    save_llava(tiny_llava(), tiny_processor(), tmp_path / "ckpt", "original")
    skeleton = meta_model(tmp_path / "ckpt")
    names = list(stored(tmp_path / "ckpt"))
    current = loading_names(skeleton, names)
    assert {module for module, _ in current.values()} == set(skeleton.state_dict())
    monkeypatch.setitem(sys.modules, "transformers.core_model_loading", None)  # the import fails
    monkeypatch.setattr(type(skeleton), "_checkpoint_conversion_mapping", LEGACY_LLAVA_RULES, raising=False)
    assert loading_names(skeleton, names) == current
