"""Prompt rewriting: from a full chat prompt to the words the image is scored against.

PAR scores visual tokens against the user's question, not against the chat
template, the image placeholder or function words ("what", "the", "is"), which
would match every image alike. The rewrite works on words, not token ids, because a
role marker like "ASSISTANT:" is several sub-word tokens in most vocabularies.
"""

from __future__ import annotations

import re

# Role markers of the common chat templates: "USER:", "ASSISTANT:" (LLaVA-1.5/Vicuna),
# "Human:", and ChatML's bare role names left at a line start once special tokens go.
_ROLE_MARKERS = re.compile(
    r"\b(?:USER|ASSISTANT|SYSTEM|Human|Assistant|User|System|GPT)\s*:"
    r"|^\s*(?:user|assistant|system)\s*$",
    flags=re.MULTILINE,
)
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")

# English function words, plus question words that every VQA prompt carries.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do
    does doesn't doing don't down during each few for from further had hadn't has hasn't
    have haven't having he he'd he'll he's her here here's hers herself him himself his how
    how's i i'd i'll i'm i've if in into is isn't it it's its itself let's me more most
    mustn't my myself no nor not of off on once only or other ought our ours ourselves out
    over own same shan't she she'd she'll she's should shouldn't so some such than that
    that's the their theirs them themselves then there there's these they they'd they'll
    they're they've this those through to too under until up very was wasn't we we'd we'll
    we're we've were weren't what what's when when's where where's which while who who's
    whom why why's with won't would wouldn't you you'd you'll you're you've your yours
    yourself yourselves please tell describe answer question image picture photo shown
    show see look one word single short briefly
    """.split()
)

# Nouns that name the kind of answer asked for, not the thing to look at: in "what color
# is the triangle?" the triangle is where the answer is, while "color" is close to every
# coloured patch alike and, under max-over-words relevance, can outscore the word that
# picks the object out (the measurement: docs/how-it-works.md).
QUESTION_TYPE_WORDS = frozenset("color colour colors colours shape shapes kind kinds type types sort".split())


def query_words(text: str, drop_question_type: bool = True) -> list[str]:
    """The content words of a prompt's text, in order (template markers and stop words
    gone, and the question-type words unless `drop_question_type` is false)."""
    text = _ROLE_MARKERS.sub(" ", text)
    drop = STOP_WORDS | QUESTION_TYPE_WORDS if drop_question_type else STOP_WORDS
    return [w for w in _WORD.findall(text) if w.lower() not in drop]


class QueryRewriter:
    """Turns a tokenized chat prompt into the token ids of its content words."""

    def __init__(self, tokenizer, image_token: str):
        self.tokenizer = tokenizer
        self.image_token = image_token

    def __call__(self, prompt_ids: list[int], drop_question_type: bool = True) -> list[int]:
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        words = query_words(text.replace(self.image_token, " "), drop_question_type)
        if not words:
            return []
        # A leading space makes BPE vocabularies pick their word-initial pieces.
        return self.tokenizer.encode(" " + " ".join(words), add_special_tokens=False)
