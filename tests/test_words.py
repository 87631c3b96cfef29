import pytest

from benchmarks.composite_vqa import COLOR_QUESTIONS, COLORS, SHAPE_QUESTIONS, SHAPES
from par_vllm.words import QUESTION_TYPE_WORDS, content_words, latin_language

# The same question in each language: what is dropped and what is kept.
QUESTIONS = {
    "en": ("What color is the triangle on the left? Answer with one word.", ["triangle", "left"], ["color"]),
    "es": ("¿De qué color es el triángulo de la izquierda? Responde con una palabra.",
           ["triángulo", "izquierda"], ["color"]),
    "fr": ("De quelle couleur est le triangle à gauche dans l'image ? Réponds en un mot.",
           ["triangle", "gauche"], ["couleur"]),
    "de": ("Welche Farbe hat das Dreieck links auf dem Bild? Antworte mit einem Wort.",
           ["Dreieck", "links"], ["Farbe"]),
    "zh": ("左边的三角形是什么颜色？请用一个词回答。", ["左边", "三角形"], ["颜色"]),
    "ja": ("左にある三角形は何色ですか？一言で答えてください。", ["左", "三角形"], ["何色"]),
}


@pytest.mark.parametrize("language", list(QUESTIONS))
def test_each_language_keeps_its_content_words(language):
    question, content, question_type = QUESTIONS[language]
    assert content_words(question) == content
    kept = content_words(question, drop_question_type=False)
    assert sorted(kept) == sorted(content + question_type)


@pytest.mark.parametrize("language", ["en", "es", "fr", "de"])
def test_latin_languages_are_told_apart(language):
    question = QUESTIONS[language][0]
    assert latin_language(question.replace("?", " ").split()) == language


def test_question_type_words_exist_in_every_language():
    assert set(QUESTION_TYPE_WORDS) == set(QUESTIONS)


def test_mixed_languages_each_lose_their_own_function_words():
    # English around a Chinese noun; a Spanish question then an English instruction.
    assert content_words("What color is the 三角形 in this picture?") == ["三角形"]
    assert content_words("¿Qué forma tiene el cuadrado rojo? Answer in one word.") == ["cuadrado", "rojo"]
    # Japanese with English words in it.
    assert content_words("この red circle は何ですか？") == ["red", "circle"]


@pytest.mark.parametrize("text", ["What is it?", "Describe this image.", "它是什么？", "これは何ですか？",
                                  "¿Qué es esto?", "Qu'est-ce que c'est ?", "Was ist das?", "", "   ?!"])
def test_a_prompt_of_function_words_only_has_no_content(text):
    assert content_words(text) == []


def test_an_unknown_language_keeps_every_word():
    assert content_words("Какого цвета треугольник?") == ["Какого", "цвета", "треугольник"]
    assert content_words("삼각형은 무슨 색입니까?") == ["삼각형은", "무슨", "색입니까"]


def test_punctuation_and_apostrophes():
    assert content_words("What’s the dog's collar?") == ["dog's", "collar"]
    assert content_words("What is in the top-left tile?") == ["top-left", "tile"]
    assert content_words("Où est l'oiseau ?") == ["oiseau"]


def test_the_accuracy_benchmarks_queries_are_its_subject_words():
    # The composite task names the tile by its shape or its colour: that word, alone, is the
    # query (and was before the multilingual lists, so the accuracy figures still hold).
    for template in COLOR_QUESTIONS:
        for shape in SHAPES:
            assert content_words(template.format(shape=shape)) == [shape]
    for template in SHAPE_QUESTIONS:
        for color in COLORS:
            assert content_words(template.format(color=color)) == [color]


def test_a_failing_segmenter_keeps_every_word_instead_of_failing_the_request(monkeypatch):
    from par_vllm import words

    class Broken:
        def tokenize(self, text):
            raise RuntimeError("segmenter bug")

    monkeypatch.setattr(words, "_tiny_segmenter", lambda: Broken())
    assert content_words("この赤い丸は何ですか？") == ["この赤い丸は何ですか"]

