"""Classification tasks as instruction tasks, and the refusals of the safety alignment.

Each task becomes one fixed instruction naming the options, the text, and an answer that is a
short sentence naming the label ("The sentiment of this review is negative."): close to how a
chat model answers, so that task tuning does not merely teach the model to emit one word and
stop. A prediction is the first of the task's label words named in the greedy answer
(case-insensitive, whole words); an answer naming none is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .data import TaskData


@dataclass(frozen=True)
class TaskFormat:
    """How one task is asked and answered.

    Attributes:
        instruction: the fixed instruction, naming the options (``{options}`` is filled in).
        answer: the answer sentence, ``{label}`` filled in with the label word.
        label_words: ``{label: word}`` for labels whose word is not the label itself.
    """

    instruction: str
    answer: str
    label_words: dict[str, str]


_SENTIMENT = TaskFormat(
    "What is the sentiment of this review? Answer with {options}.",
    "The sentiment of this review is {label}.",
    {},
)

# [decision] Formats of the tasks of ../shared/data and of the bundled sample; any other task gets
# GENERIC_FORMAT with its labels as the words.
TASK_FORMATS: dict[str, TaskFormat] = {
    "sst2": _SENTIMENT,
    "sentiment": _SENTIMENT,
    "trec": TaskFormat(
        "What type of answer does this question ask for? Answer with {options}.",
        "The expected answer type is {label}.",
        {
            "ABBR": "abbreviation",
            "DESC": "description",
            "ENTY": "entity",
            "HUM": "person",
            "LOC": "location",
            "NUM": "number",
        },  # fmt: skip
    ),
    "sms_spam": TaskFormat(
        "Is this text message spam or a legitimate message? Answer with {options}.",
        "This message is {label}.",
        {"ham": "legitimate", "spam": "spam"},
    ),
    "topic": TaskFormat("What is the topic of this sentence? Answer with {options}.", "The topic is {label}.", {}),
    "intent": TaskFormat(
        "Which request does this voice-assistant command make? Answer with {options}.", "The request is {label}.", {}
    ),
}
GENERIC_FORMAT = TaskFormat("Classify this text. Answer with {options}.", "The answer is {label}.", {})

# Refusals of the stage-0 alignment, written for this project; a harmful training prompt gets one
# of them, chosen by a seeded draw.
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I cannot help with this request. It is harmful, and I won't provide instructions for it.",
    "I'm sorry, I can't assist with that. If you have another question, I'm happy to help.",
    "I can't provide that. Helping with this could hurt someone or break the law.",
    "Sorry, but I won't help with this. It is dangerous and unethical.",
    "I apologize, but I cannot assist with harmful or illegal activities like this one.",
    "I'm not able to provide help with that request, because it could put people at risk.",
    "I cannot support this. Please consider a safe and legal alternative instead.",
)


class TaskPrompts:
    """Renders one task's examples as (prompt, answer) pairs and reads predictions back.

    Args:
        task: the task; ``task.name`` chooses the format (:data:`TASK_FORMATS`, else
            :data:`GENERIC_FORMAT`).
    """

    def __init__(self, task: TaskData) -> None:
        self.task = task
        self.format = TASK_FORMATS.get(task.name, GENERIC_FORMAT)
        self.words = [self.format.label_words.get(label, label) for label in task.labels]
        if len({w.lower() for w in self.words}) != len(self.words):
            raise ValueError(f"task {task.name!r}: two labels share the word of their answer: {self.words}")
        options = ", ".join(self.words[:-1]) + f" or {self.words[-1]}" if len(self.words) > 1 else self.words[0]
        self.instruction = self.format.instruction.format(options=options)
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in self.words) + r")\b", re.IGNORECASE)

    def prompt(self, text: str) -> str:
        """The user turn for ``text``: the instruction, a blank line, the text."""
        return f"{self.instruction}\n\n{text}"

    def answer(self, label: int) -> str:
        """The answer sentence for label index ``label``."""
        return self.format.answer.format(label=self.words[label])

    def pairs(self, examples: list[tuple[str, int]]) -> list[tuple[str, str]]:
        """``(prompt, answer)`` for each ``(text, label)`` example."""
        return [(self.prompt(text), self.answer(label)) for text, label in examples]

    def predict(self, answer: str) -> int | None:
        """The label index of the first label word named in ``answer`` (whole word, any case), or None."""
        match = self._pattern.search(answer)
        if match is None:
            return None
        return [w.lower() for w in self.words].index(match.group(1).lower())

    def answers(self) -> list[str]:
        """Every answer sentence of the task (one per label): what a task-tuned model says by rote."""
        return [self.answer(i) for i in range(len(self.words))]
