"""Content words: what is left of a user's text once its function words are gone.

PAR scores an image against the words that say what to look at. Function words ("the",
"是", "の") and words about the request itself ("image", "answer") match every image
alike, so they go. Languages covered: English, Spanish, French, German (Latin script,
told apart by which language's stop words a sentence uses most), Chinese (segmented by
jieba) and Japanese (any kana in the text; segmented by TinySegmenter). Stop words come
from stopwords-iso. Words in any other script are kept: an unknown language loses
nothing.
"""

from __future__ import annotations

import logging
import re
from functools import lru_cache

import stopwordsiso

logger = logging.getLogger("vllm.plugins." + __name__)

LATIN_LANGUAGES = ("en", "es", "fr", "de")
LANGUAGES = (*LATIN_LANGUAGES, "zh", "ja")

# Nouns that name the kind of answer asked for, not the thing to look at: in "what color
# is the triangle?" the triangle is where the answer is, while "color" is close to every
# coloured patch alike and, under max-over-words relevance, can outscore the word that
# picks the object out (the measurement: docs/how-it-works.md). Dropped unless the
# `drop_question_type_words` setting is off.
QUESTION_TYPE_WORDS = {
    "en": "color colour colors colours shape shapes kind kinds type types sort",
    "es": "color colores forma formas tipo tipos clase clases",
    "fr": "couleur couleurs forme formes type types sorte sortes genre",
    "de": "farbe farben form formen art arten sorte sorten typ typen",
    "zh": "颜色 顏色 形状 種類 种类 类型 類型 什么颜色 什么形状",
    "ja": "色 何色 形 図形 形状 種類 タイプ どんな",
}
# Words about the request rather than the image (every patch is part of "the image").
REQUEST_WORDS = {
    "en": "image images picture pictures photo photos photograph answer question word words single",
    "es": "imagen imágenes foto fotos fotografía respuesta responde responda pregunta palabra palabras",
    "fr": "image images photo photos réponse réponds répondez question mot mots",
    "de": "bild bilder foto fotos antwort antworte antworten frage wort wörter",
    "zh": "图片 圖片 图像 圖像 照片 图 圖 回答 问题 問題 词 詞 请 請",
    "ja": "画像 写真 絵 答え 回答 質問 単語 一言 ください",
}

_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
# Han (with 々 and ー, which join Japanese words) and kana: scripts written without spaces.
_CJK = re.compile(r"[\u3005\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_KANA = re.compile(r"[\u3040-\u30ff]")
_HIRAGANA = re.compile(r"[\u3040-\u309f]+")
_PARTS = re.compile(r"['-]")
# Latin script: Basic Latin through IPA Extensions (U+0000-U+024F).
_NOT_LATIN = re.compile(r"[^\u0000-\u024f]")
_SENTENCE_END = re.compile(r"[.!?;:\n。！？；：]+")
# French elision: l'image, d'un, qu'est-ce.
_ELIDED = re.compile(r"^(?:c|d|j|l|m|n|s|t|qu|jusqu|lorsqu|puisqu)'(?=\w)", re.IGNORECASE)


@lru_cache(maxsize=None)
def function_words(language: str) -> frozenset[str]:
    """stopwords-iso's list for `language`."""
    return frozenset(stopwordsiso.stopwords(language))


@lru_cache(maxsize=None)
def stop_words(language: str, drop_question_type: bool = True) -> frozenset[str]:
    """Everything dropped from `language` text."""
    words = function_words(language) | set(REQUEST_WORDS[language].split())
    if drop_question_type:
        words |= set(QUESTION_TYPE_WORDS[language].split())
    return frozenset(words)


@lru_cache(maxsize=1)
def _jieba():
    import warnings

    with warnings.catch_warnings():  # jieba imports pkg_resources where it exists, which warns
        warnings.simplefilter("ignore", DeprecationWarning)
        import jieba

    jieba.setLogLevel(logging.WARNING)
    tokenizer = jieba.Tokenizer()
    tokenizer.initialize()
    return tokenizer


@lru_cache(maxsize=1)
def _tiny_segmenter():
    import tinysegmenter

    return tinysegmenter.TinySegmenter()


def warm_up() -> None:
    """Load the segmenters' dictionaries now (jieba's takes about a second), so no request
    waits for them."""
    _jieba()
    _tiny_segmenter()
    for language in LANGUAGES:
        stop_words(language)
    _languages_of()


@lru_cache(maxsize=1)
def _languages_of() -> dict[str, tuple[str, ...]]:
    """Each Latin-script function word -> the languages whose list has it: one lookup per
    word instead of one per word and language (every request reads every user turn)."""
    languages: dict[str, list[str]] = {}
    for language in LATIN_LANGUAGES:
        for word in function_words(language):
            languages.setdefault(word, []).append(language)
    return {word: tuple(found) for word, found in languages.items()}


def latin_language(words: list[str], default: str = "en") -> str:
    """The Latin-script language whose stop words `words` use most; `default` on a tie."""
    return _most_used(_hits(map(_latin_word, words)), default)


def _hits(facts) -> dict[str, int]:
    """How many stop words of each Latin-script language `_latin_word`'s `facts` have."""
    hits = dict.fromkeys(LATIN_LANGUAGES, 0)
    for fact in facts:
        for language in fact[1] if fact else ():
            hits[language] += 1
    return hits


# Words up to this long are remembered, at most this many: a bound on memory.
_REMEMBERED_WORD_CHARS, _REMEMBERED_WORDS = 32, 1 << 14


def _latin_word(word: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """A word's lower-cased parts ("qu'est-ce": qu, est, ce) and, for each part, the
    languages whose stop words have it; None for a word not in Latin script. Remembered:
    every request reads every user turn again, and conversations repeat their words."""
    return _remembered_latin_word(word) if len(word) <= _REMEMBERED_WORD_CHARS else _read_latin_word(word)


def _read_latin_word(word: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if _NOT_LATIN.search(word):
        return None
    parts = tuple(_PARTS.split(word.lower()))
    languages_of = _languages_of()
    return parts, tuple(language for part in parts for language in languages_of.get(part, ()))


_remembered_latin_word = lru_cache(maxsize=_REMEMBERED_WORDS)(_read_latin_word)


def forget() -> None:
    """Forget the words read so far (benchmarks time text never seen)."""
    _remembered_latin_word.cache_clear()


def _most_used(hits: dict[str, int], default: str) -> str:
    best = max(hits.values())
    return default if hits.get(default, 0) == best else max(LATIN_LANGUAGES, key=hits.__getitem__)


def _only_function_kana(token: str, stops: frozenset[str]) -> bool:
    """A hiragana token that is nothing but stop words run together ("ますか" is ます + か):
    TinySegmenter leaves some such runs whole."""
    if not _HIRAGANA.fullmatch(token):
        return False
    longest = max(map(len, stops))
    ends = {0}
    for end in range(1, len(token) + 1):
        if any(start in ends and token[start:end] in stops for start in range(max(0, end - longest), end)):
            ends.add(end)
    return len(token) in ends


_KANJI = re.compile(r"[\u3005\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_KATAKANA = re.compile(r"[\u30a0-\u30ff]+")


def _japanese_tokens(run: str) -> list[str]:
    """TinySegmenter's tokens, with the compounds it splits joined again: adjacent tokens
    all in kanji (三 + 角形) or all in katakana are one word. "ください" (please) goes
    first, as TinySegmenter cuts it mid-word."""
    tokens: list[str] = []
    for token in _tiny_segmenter().tokenize(run.replace("ください", " ")):
        token = token.strip()
        if not token:
            continue
        if tokens and any(script.fullmatch(token) and script.fullmatch(tokens[-1]) for script in (_KANJI, _KATAKANA)):
            tokens[-1] += token
        else:
            tokens.append(token)
    return tokens


# Segmenters see a run of unspaced text this many characters at a time: jieba's unknown-word
# model is superlinear on one long run of unknown characters, and a word cut at a piece's
# edge costs the query little.
SEGMENT_CHARS = 200


def _cjk_words(run: str, japanese: bool, drop_question_type: bool) -> list[str]:
    pieces = [run[i:i + SEGMENT_CHARS] for i in range(0, len(run), SEGMENT_CHARS)]
    if japanese:
        stops = stop_words("ja", drop_question_type)
        # A lone kana is never a word on its own: a particle or a fragment of one.
        return [t for piece in pieces for t in _japanese_tokens(piece)
                if t not in stops and not _only_function_kana(t, stops) and not (len(t) == 1 and _KANA.match(t))]
    stops = stop_words("zh", drop_question_type)
    return [t for piece in pieces for t in _jieba().lcut(piece) if t.strip() and t not in stops]


def content_words(text: str, drop_question_type: bool = True) -> list[str]:
    """The content words of `text`, in order. Never fails a request: should a segmenter
    raise, every word is kept (logged)."""
    try:
        return _content_words(text, drop_question_type)
    except Exception:  # noqa: BLE001 - third-party segmenters on arbitrary user text
        logger.warning("PAR: content words could not be found; scoring against every word", exc_info=True)
        return _WORD.findall(text)


def _content_words(text: str, drop_question_type: bool) -> list[str]:
    text = text.replace("\u2019", "'")
    japanese = bool(_KANA.search(text))
    sentences = [_segments(s) for s in _SENTENCE_END.split(text) if s.strip()]
    # Each sentence's stop-word counts, summed for the whole text's language.
    hits_by_sentence = [_hits(fact for pairs, _ in segments for _, fact in pairs) for segments in sentences]
    prompt_language = _most_used({lang: sum(h[lang] for h in hits_by_sentence) for lang in LATIN_LANGUAGES}, "en")
    kept: list[str] = []
    for segments, hits in zip(sentences, hits_by_sentence):
        language = _most_used(hits, default=prompt_language)
        stops = stop_words(language, drop_question_type)
        for pairs, cjk_run in segments:
            for word, fact in pairs:
                if fact is None:
                    kept.append(word)  # a script with no stop list here: keep it
                # "c'est", "qu'est-ce": dropped when every part is a stop word.
                elif not stops.issuperset(fact[0]):
                    kept.append(_ELIDED.sub("", word) if language == "fr" else word)
            if cjk_run:
                kept.extend(w for w in _cjk_words(cjk_run, japanese, drop_question_type) if _WORD.fullmatch(w))
    return kept


def _segments(sentence: str) -> list[tuple[list[tuple[str, tuple | None]], str | None]]:
    """`sentence` in order as its runs of CJK text and the words before each, every word
    with its `_latin_word` facts: (word-fact pairs, the CJK run after them or None)."""
    segments, at = [], 0
    for match in [*_CJK.finditer(sentence), None]:
        words = _WORD.findall(sentence, at, match.start() if match else len(sentence))
        segments.append(([(w, _latin_word(w)) for w in words], match and match.group()))
        at = match and match.end()
    return segments
