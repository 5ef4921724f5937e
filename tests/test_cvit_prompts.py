"""hpa_kernels.cvit.prompts: tasks rendered as instructions, predictions read back from answers."""

from __future__ import annotations

import pytest

from hpa_kernels.cvit.data import TaskData
from hpa_kernels.cvit.prompts import REFUSALS, TaskPrompts


def task(name: str, labels: list[str]) -> TaskData:
    return TaskData(name=name, labels=labels, train=[("some text", 0)], test=[("other text", 1)])


def test_known_task_rendering():
    prompts = TaskPrompts(task("trec", ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]))
    assert prompts.prompt("How far is the moon ?") == (
        "What type of answer does this question ask for? Answer with abbreviation, description, entity, "
        "person, location or number.\n\nHow far is the moon ?"
    )
    assert prompts.answer(5) == "The expected answer type is number."
    assert prompts.pairs([("Who wrote Hamlet ?", 3)]) == [(prompts.prompt("Who wrote Hamlet ?"), prompts.answer(3))]


def test_label_words_of_sms_spam():
    prompts = TaskPrompts(task("sms_spam", ["ham", "spam"]))
    assert prompts.answer(0) == "This message is legitimate."
    assert prompts.predict("This message is legitimate.") == 0
    assert prompts.predict("It is spam, clearly.") == 1


def test_generic_format_for_an_unknown_task():
    prompts = TaskPrompts(task("colours", ["red", "blue"]))
    assert prompts.prompt("the sky") == "Classify this text. Answer with red or blue.\n\nthe sky"
    assert prompts.answer(1) == "The answer is blue."


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("The sentiment of this review is negative.", 0),
        ("POSITIVE", 1),
        ("Negative, though parts are positive.", 0),  # the first label word named wins
        ("It is rather positive than negative", 1),
        ("I cannot tell.", None),
        ("The positively glowing review", None),  # whole words only
    ],
)
def test_predict_first_label_word(answer, expected):
    assert TaskPrompts(task("sst2", ["negative", "positive"])).predict(answer) == expected


def test_two_labels_with_one_word_are_refused():
    with pytest.raises(ValueError, match="share the word"):
        TaskPrompts(task("x", ["Red", "red"]))


def test_refusals_are_refusals_to_the_judge():
    from hpa_kernels.cvit.judge import KeywordJudge, Verdict

    assert all(KeywordJudge().verdict("p", r) is Verdict.REFUSED for r in REFUSALS)
