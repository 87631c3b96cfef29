from par_vllm.prompt import QueryRewriter, query_words


def test_llava_template_markers_and_stop_words_go():
    text = "USER: <image>\nWhat color is the triangle in the top left?\nASSISTANT:"
    assert query_words(text.replace("<image>", " ")) == ["color", "triangle", "top", "left"]


def test_chatml_role_lines_go():
    text = "system\nYou are a helpful assistant.\nuser\nHow many dogs are there?\nassistant\n"
    assert query_words(text) == ["helpful", "assistant", "many", "dogs"]


def test_image_only_prompt_has_no_query(tokenizer):
    rewriter = QueryRewriter(tokenizer, "<image>")
    ids = tokenizer.encode("USER: <image>\n\nASSISTANT:", add_special_tokens=False)
    assert rewriter(ids) == []


def test_query_ids_are_the_content_words(tokenizer):
    rewriter = QueryRewriter(tokenizer, "<image>")
    ids = tokenizer.encode("USER: <image>\nWhat color is the circle?\nASSISTANT:")
    assert tokenizer.decode(rewriter(ids)).split() == ["color", "circle"]
    assert tokenizer.convert_tokens_to_ids("<image>") not in rewriter(ids)
