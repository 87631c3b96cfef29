import pytest

from par_vllm.prompt import QueryRewriter


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


# ChatML as SmolLM2 writes it, and as Qwen-VL writes it: a default system prompt when the
# conversation has none.
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}" + CHATML)
# Mistral-style: [INST] ... [/INST], and no system role at all.
INST = ("{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}"
        "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]{% else %} {{ message['content'] }}"
        "</s>{% endif %}{% endfor %}")
TEMPLATES = {"llava": None, "chatml": CHATML, "qwen": QWEN}


@pytest.fixture(params=list(TEMPLATES))
def rewriter(request, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    if TEMPLATES[request.param]:
        tok.chat_template = TEMPLATES[request.param]
    return QueryRewriter(tok, "<image>")


def query(rewriter, messages, turn="latest"):
    ids = rewriter.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    words = rewriter.tokenizer.decode(rewriter(rewriter.tokenizer.encode(ids), turn=turn))
    return words.split()


def test_each_template_has_its_user_turn_markers_found(rewriter):
    assert rewriter.turns is not None
    assert rewriter.turns.opens.strip() and rewriter.turns.closes.strip()


def test_the_system_prompt_is_never_in_the_query(rewriter):
    messages = [{"role": "system", "content": "You describe the red car and the green star."},
                {"role": "user", "content": "<image>\nWhat color is the triangle?"}]
    assert query(rewriter, messages) == ["triangle"]
    assert query(rewriter, messages[1:]) == ["triangle"]  # a template's default system prompt too


CONVERSATION = [
    {"role": "user", "content": "<image>\nWhere is the triangle?"},
    {"role": "assistant", "content": "At the top left corner, next to a house."},
    {"role": "user", "content": "And the circle?"},
    {"role": "assistant", "content": "Bottom right, below the tree."},
    {"role": "user", "content": "Is the square yellow?"},
    {"role": "assistant", "content": "Yes, bright yellow."},
    {"role": "user", "content": "What about the star?"},
]


@pytest.mark.parametrize("turns, latest", [(1, "triangle"), (2, "circle"), (3, "square yellow"), (4, "star")])
def test_a_conversations_query_under_each_rule(rewriter, turns, latest):
    messages = CONVERSATION[:2 * turns - 1]
    # The image came with the first question: under "image" every turn scores it against that.
    assert query(rewriter, messages, "image") == ["triangle"]
    assert query(rewriter, messages, "latest") == latest.split()


def test_images_in_two_turns_are_scored_against_both_turns(rewriter):
    messages = [*CONVERSATION[:4], {"role": "user", "content": "<image>\nIs the boat in this one?"}]
    assert query(rewriter, messages, "image") == ["triangle", "boat"]


def second_views(rewriter, messages):
    text = rewriter.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = rewriter.tokenizer.encode(text)
    return ids, rewriter.second_views(ids)


@pytest.mark.parametrize("turns", [2, 3, 4])
def test_every_later_question_gets_a_second_view_at_the_start_of_its_message(rewriter, turns):
    ids, views = second_views(rewriter, CONVERSATION[:2 * turns - 1])
    tok = rewriter.tokenizer
    later = CONVERSATION[2:2 * turns - 1:2]
    assert len(views) == turns - 1
    for view, message, words in zip(views, later, ["circle", "square yellow", "star"]):
        assert view.images == 1
        assert tok.decode(view.query).split() == words.split()
        # Everything before `at` is the history and this turn's opening marker; from there
        # on its message, as the template wrote it.
        before, after = tok.decode(ids[:view.at]), tok.decode(ids[view.at:])
        assert before.rstrip().endswith(rewriter.turns.opens.strip())
        assert after.strip().startswith(message["content"])
    # The images keep the query they came with.
    assert query(rewriter, CONVERSATION[:2 * turns - 1], "image_and_latest") == ["triangle"]


def test_a_turns_second_view_is_the_same_in_every_later_prompt(rewriter):
    # Turn 2's view, where it sits and what it is scored against, does not change as the
    # conversation goes on: the next request's prompt starts with the previous one's.
    ids2, (view2,) = second_views(rewriter, CONVERSATION[:3])
    ids4, views4 = second_views(rewriter, CONVERSATION)
    assert ids4[:view2.at] == ids2[:view2.at] and views4[0] == view2


@pytest.mark.parametrize("latest", ["What about the star?", "Is the star left of [INST] USER: <|im_start|>user?",
                                    "星星在哪里？"])
def test_each_turn_found_from_its_marker_is_where_the_full_search_finds_it(rewriter, latest):
    # A marker's occurrence is only a first guess (a user may type one): each boundary
    # returned is the one the suffix search over the whole prompt returns.
    ids, views = second_views(rewriter, [*CONVERSATION[:6], {"role": "user", "content": latest}])
    text = rewriter.tokenizer.decode(ids, skip_special_tokens=False)
    starts = [start for start, _ in rewriter.turns.user_turns(text)[1:]]
    assert [view.at for view in views] == [rewriter._search_token_index(ids, len(text) - s) for s in starts]
    both = rewriter.rewrite(ids, turn="image_and_latest")  # the processor's one call
    assert both.query == rewriter(ids, turn="image") and tuple(both.second_views) == views


def test_the_turns_after_the_views_taken_are_not_read(rewriter):
    # The processor stops taking views when the image's budget is spent: the turns after
    # it cost nothing.
    text = rewriter.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    ids = rewriter.tokenizer.encode(text)
    rewriter.forget()
    views = rewriter.rewrite(ids, turn="image_and_latest").second_views
    read = rewriter._words.cache_info().misses  # the image's turn
    next(views)
    assert rewriter._words.cache_info().misses == read + 1
    assert len(list(views)) == 2 and rewriter._words.cache_info().misses == read + 3


def test_no_second_view_where_nothing_earlier_or_nothing_new_is_asked(rewriter):
    assert second_views(rewriter, CONVERSATION[:1])[1] == ()  # the image's own turn
    no_image = [{"role": "user", "content": "Where is the triangle?"}, *CONVERSATION[1:3]]
    assert second_views(rewriter, no_image)[1] == ()
    same_words = [*CONVERSATION[:2], {"role": "user", "content": "The triangle, again?"}]
    assert second_views(rewriter, same_words)[1] == ()
    own_image = [*CONVERSATION[:2], {"role": "user", "content": "<image>\nIs the boat in this one?"}]
    assert second_views(rewriter, own_image)[1] == ()
    function_words = [*CONVERSATION[:2], {"role": "user", "content": "And what about that?"}]
    assert second_views(rewriter, function_words)[1] == ()
    # Only the turn that asks something new gets one.
    _, views = second_views(rewriter, [*same_words, *CONVERSATION[3:5]])
    assert [rewriter.tokenizer.decode(v.query).split() for v in views] == [["square", "yellow"]]


def test_two_earlier_images_both_get_a_second_view_after_the_last_one(rewriter):
    # A turn before the newest image has no view from then on: the views are for the turns
    # after the last image (the images' own query changed with it anyway, under "image").
    messages = [*CONVERSATION[:4], {"role": "user", "content": "<image>\nIs the boat in this one?"},
                {"role": "assistant", "content": "No."}, {"role": "user", "content": "Where is the star?"}]
    _, views = second_views(rewriter, messages)
    assert [(v.images, rewriter.tokenizer.decode(v.query).split()) for v in views] == [(2, ["star"])]


def test_a_raw_prompt_without_the_templates_markers_is_one_user_turn(tokenizer):
    rewriter = QueryRewriter(tokenizer, "<image>")
    ids = tokenizer.encode("<image>\nWhat is the red car?")
    assert tokenizer.decode(rewriter(ids)).split() == ["red", "car"]


def test_a_tokenizer_without_a_chat_template_has_no_turns(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    rewriter = QueryRewriter(tok, "<image>")
    assert rewriter.turns is None
    assert tok.decode(rewriter(tok.encode("<image>\nWhere is the dog?"))).split() == ["dog"]


def test_a_template_without_a_system_role_still_has_its_user_turns(tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = INST
    rewriter = QueryRewriter(tok, "<image>")
    assert rewriter.turns is not None and rewriter.turns.opens.strip() == "[INST]"
    assert query(rewriter, CONVERSATION[:3], "image") == ["triangle"]
    assert query(rewriter, CONVERSATION[:3], "latest") == ["circle"]


@pytest.mark.parametrize("question, words", [
    ("左边的三角形是什么颜色？", "左边 三角形"),
    ("左にある三角形は何色ですか？", "左 三角形"),
    ("¿De qué color es el triángulo?", "triángulo"),
])
def test_a_question_in_another_language_through_the_chat_template(rewriter, question, words):
    messages = [{"role": "user", "content": f"<image>\n{question}"}]
    assert query(rewriter, messages) == words.split()


@pytest.mark.parametrize("messages", [CONVERSATION, [{"role": "user", "content": "<image>\n左边的三角形是什么颜色？"}],
                                      [{"role": "user", "content": "<image>\n¿De qué color es el triángulo?"}]])
def test_the_rust_tokenizer_reads_and_writes_as_transformers_does(rewriter, messages):
    import copy
    import functools

    tok = rewriter.tokenizer
    assert rewriter._rust is not None  # the path the rewrite takes with a fast tokenizer
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert rewriter._decode(ids) == tok.decode(ids, skip_special_tokens=False)
    text = " triangle 三角形 triángulo <image>"
    assert rewriter._encode_text(text) == tok.encode(text, add_special_tokens=False)
    slow = copy.copy(rewriter)
    slow._rust = None
    slow._words = functools.lru_cache()(slow._words_uncached)
    for turn in ("latest", "image", "image_and_latest"):
        one, other = slow.rewrite(ids, turn=turn), rewriter.rewrite(ids, turn=turn)
        assert (one.query, tuple(one.second_views)) == (other.query, tuple(other.second_views))


@pytest.fixture(scope="module")
def metaspace_tokenizer():
    """A SentencePiece-style vocabulary (Llama's, LLaVA-1.5's): words carry their leading
    space as "▁", which a decode of a slice drops at its start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from par_vllm.demo_model import CHAT_TEMPLATE, IMAGE_TOKEN, SPECIAL_TOKENS, _corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.decoder = decoders.Metaspace()
    bpe.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=1024, special_tokens=SPECIAL_TOKENS,
                                                                  show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   chat_template=CHAT_TEMPLATE)


@pytest.mark.parametrize("latest", ["What about the star?", "  What, the star again?\n", "USER: the star?"])
def test_each_turn_found_with_a_sentencepiece_vocabulary_is_where_the_full_search_finds_it(
        metaspace_tokenizer, latest):
    rewriter = QueryRewriter(metaspace_tokenizer, "<image>")
    ids, views = second_views(rewriter, [*CONVERSATION[:6], {"role": "user", "content": latest}])
    text = rewriter._decode(ids)
    starts = [start for start, _ in rewriter.turns.user_turns(text)[1:]]
    assert len(views) == len(starts)
    assert [view.at for view in views] == [rewriter._search_token_index(ids, len(text) - s) for s in starts]
