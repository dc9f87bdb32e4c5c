"""The template renders exactly upstream's strings (docs/architecture.md §7), and images are placed
and counted as the CLI promises."""

import pytest

from owl2_edge.errors import PromptError
from owl2_edge.prompt import Turn, render


def test_single_turn_with_image_matches_upstream_cli():
    assert render([Turn("Describe the image.")], n_images=1) == \
        "USER: <|image|>Describe the image. ASSISTANT:"


def test_multi_turn_separates_answers_with_eos_string():
    turns = [Turn("What is this?", "A striped banner."), Turn("Is it colorful?")]
    assert render(turns, n_images=1) == (
        "USER: <|image|>What is this? ASSISTANT: A striped banner.</s>USER: Is it colorful? ASSISTANT:")


def test_text_only_still_uses_the_template():
    assert render([Turn("What is the capital of France?")]) == \
        "USER: What is the capital of France? ASSISTANT:"


def test_several_images_go_before_the_first_question_unless_placed():
    assert render([Turn("Compare.")], n_images=2) == "USER: <|image|><|image|>Compare. ASSISTANT:"
    placed = render([Turn("Left <|image|> right <|image|>?")], n_images=2)
    assert placed == "USER: Left <|image|> right <|image|>? ASSISTANT:"


@pytest.mark.parametrize("question,n", [("<|image|><|image|>x", 1), ("<|image|>x", 2)])
def test_mark_count_must_equal_image_count(question, n):
    with pytest.raises(PromptError, match="mark"):
        render([Turn(question)], n_images=n)


def test_open_turn_must_be_last():
    with pytest.raises(ValueError):
        render([Turn("a"), Turn("b", "c")])
