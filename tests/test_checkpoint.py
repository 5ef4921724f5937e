"""Checkpoint-level HPA: ``hpa-calibrate`` and ``hpa-adjust`` against the in-memory lifecycle,
on a tiny Llama saved with ``save_pretrained`` (sharded and single-file), offline."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from helpers import tiny_llama  # noqa: E402

from hpa_kernels import HPAOptimizer  # noqa: E402
from hpa_kernels.checkpoint import (  # noqa: E402
    adjust_main,
    block_depths,
    calibrate_main,
    checkpoint_files,
    load_hinv,
    save_hinv,
)
from hpa_kernels.integrations import calibrate  # noqa: E402
from hpa_kernels.layers import find_hpa_layers  # noqa: E402

VOCAB = 40
WORDS = [f"w{i}" for i in range(VOCAB - 1)]


def word_tokenizer():
    """A whitespace word-level tokenizer over WORDS, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: index + 1 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def samples(count: int, seed: int, length: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (1, length), generator=generator) for _ in range(count)]


def stored(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(set(checkpoint_files(directory).values())):
        tensors.update(safetensors_torch.load_file(str(path)))
    return tensors


@pytest.mark.parametrize("shard_after", [True, False], ids=["sharded", "single-file"])
def test_adjust_equals_end_task(tmp_path, shard_after: bool) -> None:
    """hpa-adjust on (before, after) checkpoints writes what end_task writes in memory, copies
    every other tensor and file unchanged, and keeps the after checkpoint's layout."""
    model = tiny_llama(VOCAB)
    optimizer = HPAOptimizer.from_model(model, lr=2e-2, backend="torch")
    safety, task = samples(3, seed=1), samples(3, seed=2)
    as_batches = [{"input_ids": ids} for ids in safety], [{"input_ids": ids} for ids in task]
    model.save_pretrained(tmp_path / "before", max_shard_size="20KB")  # before sharded, always
    hinv_safety = calibrate(model, optimizer, as_batches[0])
    optimizer.begin_task(hinv_safety)
    for ids in samples(4, seed=3):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    model.save_pretrained(tmp_path / "after", max_shard_size="20KB" if shard_after else "10GB")
    (tmp_path / "after" / "notes.txt").write_text("kept as is")
    hinv_task = calibrate(model, optimizer, as_batches[1])
    save_hinv(hinv_safety, tmp_path / "safety.safetensors")
    save_hinv(hinv_task, tmp_path / "task.safetensors")
    optimizer.end_task(hinv_task)
    edited = {f"{name}.weight": layer.module.weight.detach() for name, layer in optimizer.hpa_layers.items()}

    argv = ["--before", "before", "--after", "after", "--safety", "safety.safetensors", "--task", "task.safetensors"]
    argv = [str(tmp_path / a) if not a.startswith("--") else a for a in argv]
    assert adjust_main([*argv, "--out", str(tmp_path / "out"), "--backend", "torch"]) == 0

    after_files, out_files = checkpoint_files(tmp_path / "after"), checkpoint_files(tmp_path / "out")
    assert {n: p.name for n, p in out_files.items()} == {n: p.name for n, p in after_files.items()}
    assert len(set(after_files.values())) > 1 if shard_after else len(set(after_files.values())) == 1
    after, out = stored(tmp_path / "after"), stored(tmp_path / "out")
    assert set(out) == set(after) and set(edited) < set(out)
    for name, tensor in out.items():
        if name in edited:
            torch.testing.assert_close(tensor, edited[name], rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(tensor, after[name]), name
    for path in (tmp_path / "after").iterdir():
        if path.suffix != ".safetensors":
            assert (tmp_path / "out" / path.name).read_bytes() == path.read_bytes(), path.name


def test_depth_from_tensor_names_matches_the_model() -> None:
    """The [decision] depth mapping of bare checkpoints gives find_hpa_layers' blocks."""
    model = tiny_llama(VOCAB)
    layers = find_hpa_layers(model)
    depths = block_depths([f"{name}.weight" for name in layers], model.state_dict())
    for name, layer in layers.items():
        assert depths[f"{name}.weight"] == (layer.block, layer.num_blocks)
    assert block_depths(["lm_head.weight"]) == {"lm_head.weight": (None, 1)}
    assert block_depths(["encoder.layer.3.attention.q.weight", "encoder.layer.0.out.weight"])[
        "encoder.layer.3.attention.q.weight"
    ] == (3, 4)


def test_calibrate_cli_equals_the_collector(tmp_path) -> None:
    """hpa-calibrate on a JSONL set (token ids, and text through the model's tokenizer) writes the
    hinv vectors HessianCollector gives in memory, keyed by weight tensor name."""
    model = tiny_llama(VOCAB)
    model.save_pretrained(tmp_path / "model")
    tokenizer = word_tokenizer()
    tokenizer.save_pretrained(tmp_path / "model")
    ids = samples(4, seed=5)
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"input_ids": s[0].tolist()}) + "\n" for s in ids))
    texts = [" ".join(WORDS[i - 1] for i in s[0].tolist()) for s in ids]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))

    optimizer = HPAOptimizer.from_model(model)
    expected = calibrate(model, optimizer, [{"input_ids": s} for s in ids])
    for data, extra in (("ids.jsonl", []), ("text.jsonl", ["--field", "prompt"])):
        out = tmp_path / f"{data}.safetensors"
        model_dir = str(tmp_path / "model")
        assert calibrate_main(["--model", model_dir, "--data", str(tmp_path / data), "--out", str(out), *extra]) == 0
        written = load_hinv(out)
        assert set(written) == {f"{name}.weight" for name in expected}
        for name, vec in expected.items():
            torch.testing.assert_close(written[f"{name}.weight"], vec, rtol=1e-5, atol=0, msg=name)


@pytest.mark.parametrize(
    "case,match",
    [
        ("no-model", "not a save_pretrained directory"),
        ("no-data", "no such file"),
        ("bad-json", r"bad\.jsonl:2: not valid JSON"),
        ("not-object", r"bad\.jsonl:1: expected a JSON object"),
        ("out-of-vocab", r"bad\.jsonl:1: input_ids outside the model's vocabulary \[0, 40\)"),
        ("no-tokenizer", "text lines need a tokenizer"),
    ],
)
def test_calibrate_cli_reports_bad_input_in_one_line(tmp_path, capsys, case: str, match: str) -> None:
    """hpa-calibrate names the file (and line) of bad input in one line on stderr, exit status 2,
    as argparse reports a bad argument, and writes nothing."""
    tiny_llama(VOCAB).save_pretrained(tmp_path / "model")  # no tokenizer files
    lines = {
        "bad-json": '{"input_ids": [1, 2]}\n{"input_ids": [1 2]}\n',
        "not-object": "[1, 2]\n",
        "out-of-vocab": json.dumps({"input_ids": [1, VOCAB]}) + "\n",
        "no-tokenizer": json.dumps({"text": "w1 w2"}) + "\n",
    }
    (tmp_path / "bad.jsonl").write_text(lines.get(case, '{"input_ids": [1, 2]}\n'))
    model = tmp_path / ("missing" if case == "no-model" else "model")
    data = tmp_path / ("missing.jsonl" if case == "no-data" else "bad.jsonl")
    out = tmp_path / "hinv.safetensors"
    capsys.readouterr()  # save_pretrained's progress bar
    assert calibrate_main(["--model", str(model), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err  # transformers' loading progress bars, then the error
    assert err.endswith("\n") and re.match(r"hpa-calibrate: error: .*" + match, err.splitlines()[-1]), err
    assert not out.exists()


def test_adjust_streams_bf16_tensors_and_checks_before_writing(tmp_path) -> None:
    """A hand-written bf16 checkpoint: each named tensor gets the functional edit with the depth of
    its name, the rest stays bit-equal; bad inputs fail before ``out`` is created."""
    from hpa_kernels import functional
    from hpa_kernels.checkpoint import adjust_checkpoint

    generator = torch.Generator().manual_seed(0)
    names = [f"blocks.{i}.proj.weight" for i in range(3)]
    before = {name: torch.randn(5, 7, generator=generator).bfloat16() for name in names}
    before["embed.weight"] = torch.randn(4, 7, generator=generator).bfloat16()
    after = {
        name: (t.float() + 0.1 * torch.randn(t.shape, generator=generator)).bfloat16() for name, t in before.items()
    }
    for directory, tensors in (("before", before), ("after", after)):
        (tmp_path / directory).mkdir()
        safetensors_torch.save_file(tensors, str(tmp_path / directory / "model.safetensors"), metadata={"format": "pt"})
    hinv_s = {name: torch.rand(7, generator=generator) + 0.5 for name in names}
    hinv_t = {name: torch.rand(7, generator=generator) + 0.5 for name in names}

    with pytest.raises(ValueError, match="different tensors"):
        adjust_checkpoint(tmp_path / "before", tmp_path / "after", hinv_s, {names[0]: hinv_t[names[0]]}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"must be \(7,\)"):
        adjust_checkpoint(
            tmp_path / "before", tmp_path / "after", hinv_s, {**hinv_t, names[1]: -hinv_t[names[1]]}, tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()

    reports = adjust_checkpoint(
        tmp_path / "before", tmp_path / "after", hinv_s, hinv_t, tmp_path / "out", backend="torch"
    )
    out = safetensors_torch.load_file(str(tmp_path / "out" / "model.safetensors"))
    ratios = functional.retention_schedule(3)
    for block, name in enumerate(names):
        expected = functional.hpa_layer_update(
            before[name], after[name], hinv_s[name], hinv_t[name], ratios[block], backend="torch"
        )
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected.weight), name
        assert reports[name].retain_ratio == ratios[block]
    assert torch.equal(out["embed.weight"], after["embed.weight"])
    with pytest.raises(FileExistsError):
        adjust_checkpoint(tmp_path / "before", tmp_path / "after", hinv_s, hinv_t, tmp_path / "out")


def _sharded_pair(tmp_path, generator):
    """before / after checkpoints of four (6, 5) fp32 tensors in two shards with an index."""
    names = [f"model.layers.{i}.proj.weight" for i in range(4)]
    before = {name: torch.randn(6, 5, generator=generator) for name in names}
    after = {name: t + 0.1 * torch.randn(t.shape, generator=generator) for name, t in before.items()}
    for directory, tensors in (("before", before), ("after", after)):
        (tmp_path / directory).mkdir()
        shards = {"a.safetensors": names[:2], "b.safetensors": names[2:]}
        for file, members in shards.items():
            safetensors_torch.save_file({n: tensors[n] for n in members}, str(tmp_path / directory / file))
        weight_map = {n: file for file, members in shards.items() for n in members}
        (tmp_path / directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hinv = {name: torch.rand(5, generator=generator) + 0.5 for name in names}
    return names, after, hinv


@pytest.mark.parametrize("failure", ["nan", "wrong_shard", "missing_shard", "backend", "write"])
@pytest.mark.parametrize("out_exists", [False, True], ids=["no-out", "empty-out"])
def test_failed_adjust_leaves_no_checkpoint(tmp_path, monkeypatch, capsys, failure: str, out_exists: bool) -> None:
    """A failed hpa-adjust (a NaN in one tensor of the *after* checkpoint, a wrong shard in an
    index, an unknown --backend) leaves ``--out`` as it was (absent, or empty) and no temporary
    folder: every check runs before anything is written and the copy is renamed into place only
    on success, so no half-edited checkpoint can load. Bad input is reported as argparse reports
    bad arguments (``hpa-adjust: error: ...``, status 2), a failure while writing is raised."""
    from hpa_kernels import ops

    names, after, hinv = _sharded_pair(tmp_path, torch.Generator().manual_seed(0))
    backend = "torch"
    if failure == "nan":
        after[names[3]][2, 1] = float("nan")
        safetensors_torch.save_file({n: after[n] for n in names[2:]}, str(tmp_path / "after" / "b.safetensors"))
    elif failure in ("wrong_shard", "missing_shard"):
        index = tmp_path / "after" / "model.safetensors.index.json"
        weight_map = json.loads(index.read_text())["weight_map"]
        weight_map[names[3]] = "a.safetensors" if failure == "wrong_shard" else "c.safetensors"
        index.write_text(json.dumps({"weight_map": weight_map}))
    elif failure == "backend":
        backend = "no-such-backend"
    else:
        real, calls = ops.hpa_apply, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("disk full")
            return real(*args, **kwargs)

        monkeypatch.setattr(ops, "hpa_apply", failing)
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    save_hinv({name.removesuffix(".weight"): vec for name, vec in hinv.items()}, tmp_path / "hinv.safetensors")
    argv = ["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--out", str(out)]
    argv += ["--safety", str(tmp_path / "hinv.safetensors"), "--task", str(tmp_path / "hinv.safetensors")]
    match = {"nan": "NaN", "wrong_shard": "does not hold", "missing_shard": "does not exist",
             "backend": "unknown HPA kernels backend", "write": "disk full"}[failure]  # fmt: skip
    if failure == "write":  # not bad input: the error propagates
        with pytest.raises(RuntimeError, match=match):
            adjust_main([*argv, "--backend", backend])
    else:  # bad input: one line on stderr, exit status 2
        assert adjust_main([*argv, "--backend", backend]) == 2
        assert re.match(r"hpa-adjust: error: .*" + match, capsys.readouterr().err)
    assert (out.is_dir() and not any(out.iterdir())) if out_exists else not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["before", "after", "hinv.safetensors", *(["out"] if out_exists else [])]
    )
    if failure == "write":
        monkeypatch.undo()
        assert adjust_main([*argv, "--backend", backend]) == 0 and set(stored(out)) == set(names)
