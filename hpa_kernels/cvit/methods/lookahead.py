"""LookAhead Tuning: the training prompts preview the beginning of their answers.

Paper: Kangwei Liu, Mengru Wang, Yujie Luo, Lin Yuan, Mengshu Sun, Ningyu Zhang, Lei Liang,
Zhiqiang Zhang, Jun Zhou, Huajun Chen, "LookAhead Tuning: Safer Language Models via Partial Answer
Previews", 2025, arXiv:2503.19041 (v1; later versions, listed for WSDM, change the author list).
Official code: ``zjunlp/LookAheadTuning``, ``main.py`` (``process_item_real``,
``process_item_virtual``), its README and ``figs/algorithm.png`` (the paper's Algorithm 1).

**The rule** (Algorithm 1; data only: model, loss and optimizer unchanged). With the fixed
connector C = " The answer begins with: " and ⊕ string concatenation, each training pair (I, O)
becomes

* *real answer* preview: (I ⊕ C ⊕ O₁:ₘ, O), O₁:ₘ the first m tokens of the answer in the model's
  tokenizer (``tokenizer.tokenize``, joined back by ``convert_tokens_to_string``, as ``main.py``
  does); an answer of m tokens or fewer is previewed whole;
* *virtual answer* preview: (I ⊕ C ⊕ P, P ⊕ O), P a fixed prefix.

Previewing the answer's beginning makes its first tokens nearly free to predict, so tuning barely
moves the distribution of the first answer tokens, where the aligned model's refusals are decided.
Evaluation prompts are unchanged (README: "Inference data is unchanged"; the paper's Figure 2).

Defaults, from the official code: m = 6 (``main.py --m``, the paper's Figure 2, "m = 6"),
P = "Let's solve this problem. " (``main.py --P``), C as above (``main.py --connector``). The
paper presents the two variants side by side (what we could read of it: abstract, Figure 2,
Algorithm 1; not its result tables) and ``main.py`` requires ``--mode``, naming no default;
[decision] the default here is the real-answer variant (the README's first example,
Algorithm 1's first branch; its training answers stay the task's own, which the runner's judge
and label reader know); ``variant="virtual"`` gives the other.

Decisions where our protocol differs:

* Every training pair of a task is rewritten, the harmful pairs of ``--harmful-mix`` included (the
  paper rewrites its whole fine-tuning set); the calibration samples of other methods and every
  evaluation prompt are left as they are.
* Our answers are one short label sentence (5–8 SmolLM2 tokens), not GSM8K / SAMSum paragraphs:
  with m = 6 the real preview holds the label itself when at most 5 tokens come before it ("The
  expected answer type is description", the first 6 of 7 tokens), and the whole answer when it has
  at most 6 tokens ("The topic is sports.", 5 tokens); of the formats of
  :data:`~hpa_kernels.cvit.prompts.TASK_FORMATS` only the sentiment sentence keeps its label out
  of the preview ("The sentiment of this review is"). That is the paper's rule at its default; the
  model then learns the label partly from the preview it will not see at evaluation.
* The virtual variant makes every trained answer start with P; the runner's keyword judge counts
  a rote task answer as a non-answer only when it starts with the task's label sentence, so P ⊕ O
  given to a harmful prompt reads as *complied* (the rote answers would need P prepended).
"""

from __future__ import annotations

from dataclasses import replace

from ... import HPAConfig
from ..prompts import TaskPrompts
from .base import Method, Pairs, RunContext

CONNECTOR = " The answer begins with: "
PREVIEW_TOKENS = 6
VIRTUAL_PREFIX = "Let's solve this problem. "
VARIANTS = ("real", "virtual")


def real_answer_preview(pairs: Pairs, tokenizer, m: int = PREVIEW_TOKENS, connector: str = CONNECTOR) -> Pairs:
    """LookAhead Tuning's real-answer preview (Algorithm 1, lines 3–6): (I ⊕ C ⊕ O₁:ₘ, O).

    Args:
        pairs: ``(prompt, answer)`` training pairs.
        tokenizer: has ``tokenize(text) -> list[str]`` and ``convert_tokens_to_string(tokens)``
            (any Hugging Face tokenizer); O₁:ₘ is the string of the answer's first ``m`` tokens.
        m: tokens previewed, m ≥ 1 (an answer of at most m tokens is previewed whole).
        connector: C, between the prompt and the preview.

    Returns:
        New pairs, in order; the answers unchanged.

    Raises:
        ValueError: m < 1.
    """
    if m < 1:
        raise ValueError(f"real_answer_preview: m must be ≥ 1, got {m}")
    return [
        (prompt + connector + tokenizer.convert_tokens_to_string(tokenizer.tokenize(answer)[:m]), answer)
        for prompt, answer in pairs
    ]


def virtual_answer_preview(pairs: Pairs, prefix: str = VIRTUAL_PREFIX, connector: str = CONNECTOR) -> Pairs:
    """LookAhead Tuning's virtual-answer preview (Algorithm 1, lines 9–11): (I ⊕ C ⊕ P, P ⊕ O).

    Returns:
        New pairs, in order: the prefix ``prefix`` (P) previewed after ``connector`` (C) in each
        prompt and prepended to each answer.
    """
    return [(prompt + connector + prefix, prefix + answer) for prompt, answer in pairs]


class LookAhead(Method):
    """LookAhead Tuning (module doc): only :meth:`training_pairs` differs from SeqFT.

    Args:
        hpa: the run's :class:`~hpa_kernels.HPAConfig` (its calibration sizes; HPA's edit is turned off).
        variant: ``"real"`` (default) or ``"virtual"``.
        m: tokens previewed by the real variant.
        prefix: P of the virtual variant.

    Raises:
        ValueError: an unknown variant, or m < 1.
    """

    def __init__(
        self, hpa: HPAConfig | None = None, variant: str = "real", m: int = PREVIEW_TOKENS, prefix: str = VIRTUAL_PREFIX
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"LookAhead: variant must be one of {VARIANTS}, got {variant!r}")
        if m < 1:
            raise ValueError(f"LookAhead: m must be ≥ 1, got {m}")
        super().__init__(
            "lookahead" if variant == "real" else "lookahead-virtual", replace(hpa or HPAConfig(), enabled=False)
        )
        self.variant, self.m, self.prefix = variant, m, prefix
        self.tokenizer = None

    def describe(self) -> dict:
        settings = {"variant": self.variant, "connector": CONNECTOR}
        return {**settings, "m": self.m} if self.variant == "real" else {**settings, "prefix": self.prefix}

    def before_tasks(self, run: RunContext) -> None:
        self.tokenizer = run.chat.tokenizer

    def training_pairs(self, pairs: Pairs, prompts: TaskPrompts) -> Pairs:
        if self.variant == "virtual":
            return virtual_answer_preview(pairs, self.prefix)
        if self.tokenizer is None:
            raise RuntimeError("LookAhead.training_pairs: no tokenizer (before_tasks was not called)")
        return real_answer_preview(pairs, self.tokenizer, self.m)
