import pytest

from par_vllm.prompt import QUESTION_TYPE_WORDS, QueryRewriter, query_words


def test_llava_template_markers_and_stop_words_go():
    text = "USER: <image>\nWhat color is the triangle in the top left?\nASSISTANT:"
    assert query_words(text.replace("<image>", " ")) == ["triangle", "top", "left"]


@pytest.mark.parametrize("question, subject", [
    ("What color is the triangle?", ["triangle"]),
    ("What is the colour of the car?", ["car"]),
    ("What shape is red?", ["red"]),
    ("What is the red shape?", ["red"]),
    ("What kind of dog is this?", ["dog"]),
    ("What type of Shapes are blue?", ["blue"]),
])
def test_question_type_words_go_unless_kept(question, subject):
    assert query_words(question) == subject
    kept = query_words(question, drop_question_type=False)
    assert [w for w in kept if w.lower() not in QUESTION_TYPE_WORDS] == subject
    assert len(kept) > len(subject)


def test_chatml_role_lines_go():
    text = "system\nYou are a helpful assistant.\nuser\nHow many dogs are there?\nassistant\n"
    assert query_words(text) == ["helpful", "assistant", "many", "dogs"]


def test_a_question_of_question_type_words_only_has_no_query():
    # Nothing names a region: PAR falls back to its prompt-agnostic score and counts it.
    assert query_words("What color is it?") == []
    assert query_words("What color is it?", drop_question_type=False) == ["color"]


def test_image_only_prompt_has_no_query(tokenizer):
    rewriter = QueryRewriter(tokenizer, "<image>")
    ids = tokenizer.encode("USER: <image>\n\nASSISTANT:", add_special_tokens=False)
    assert rewriter(ids) == []


def test_query_ids_are_the_content_words(tokenizer):
    rewriter = QueryRewriter(tokenizer, "<image>")
    ids = tokenizer.encode("USER: <image>\nWhat color is the circle?\nASSISTANT:")
    assert tokenizer.decode(rewriter(ids)).split() == ["circle"]
    assert tokenizer.decode(rewriter(ids, drop_question_type=False)).split() == ["color", "circle"]
    assert tokenizer.convert_tokens_to_ids("<image>") not in rewriter(ids)
