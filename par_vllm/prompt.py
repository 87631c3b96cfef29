"""Prompt rewriting: from a full chat prompt to the words an image is scored against.

PAR scores visual tokens against what the user asked, not against the system prompt,
the assistant's replies, the chat template, the image placeholder or function words
("what", "the", "is"), which would match every image alike. Which parts of a prompt are
the user's is read from the model's own chat template (`ChatTurns`), not from role names.
The rewrite works on words, not token ids, because a marker like "ASSISTANT:" is several
sub-word tokens in most vocabularies.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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
    """The content words of a text, in order (stop words gone, and the question-type words
    unless `drop_question_type` is false)."""
    drop = STOP_WORDS | QUESTION_TYPE_WORDS if drop_question_type else STOP_WORDS
    return [w for w in _WORD.findall(text) if w.lower() not in drop]


# Private-use characters: no real message contains them, so they locate a template's markers.
_PROBE = {name: f"\ue000{name}\ue001" for name in ("system", "user1", "assistant1", "user2")}


@dataclass(frozen=True)
class ChatTurns:
    """Where user turns start and end in a prompt rendered by one chat template: the text
    the template writes before every user message (`opens`) and after it (`closes`),
    found by rendering a probe conversation through the template itself."""

    opens: str
    closes: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> ChatTurns | None:
        """None where the tokenizer has no chat template, or its markers cannot be told."""
        if not getattr(tokenizer, "chat_template", None):
            return None

        def render(*roles: str, generation: bool = True) -> str:
            messages = [{"role": role.rstrip("12"), "content": _PROBE[role]} for role in roles]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

        try:
            two_turns = render("user1", "assistant1", "user2")
        except Exception:  # noqa: BLE001 - a template that cannot render a plain chat: no structure
            return None
        # What every user message follows: at the start, after a reply, after a system prompt.
        before = [two_turns.split(_PROBE["user1"])[0],
                  two_turns.split(_PROBE["assistant1"])[1].split(_PROBE["user2"])[0]]
        try:
            before.append(render("system", "user1").split(_PROBE["user1"])[0].split(_PROBE["system"])[-1])
        except Exception:  # noqa: BLE001 - some templates refuse a system role
            pass
        after_user = two_turns.split(_PROBE["user1"])[1].split(_PROBE["assistant1"])[0]
        at_end = two_turns.split(_PROBE["user2"])[1]
        opens = os.path.commonprefix([b[::-1] for b in before])[::-1]
        closes = os.path.commonprefix([after_user, at_end])
        if not opens.strip() or not closes.strip():
            return None
        return cls(opens, closes)

    def user_turns(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every user message in a rendered prompt, in order."""
        spans, at = [], 0
        while (start := text.find(self.opens, at)) >= 0:
            start += len(self.opens)
            end = text.find(self.closes, start)
            end = len(text) if end < 0 else end
            spans.append((start, end))
            at = end
        return spans


class QueryRewriter:
    """Turns a tokenized chat prompt into the token ids of the content words its images are
    scored against.

    `turn` says which user words: "image", those of the user turns that carry an image (in
    a conversation about one image, the words that came with it, so its reduced tokens do
    not change as the conversation goes on and the prefix cache is reused), or "latest",
    the last user turn (the image follows the conversation, at the price of a new prefill
    every turn). A prompt the template's markers do not structure (a raw completion
    prompt) is one user turn."""

    def __init__(self, tokenizer, image_token: str):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.turns = ChatTurns.from_tokenizer(tokenizer)
        self._special = [t for t in tokenizer.all_special_tokens if t]

    def __call__(self, prompt_ids: list[int], drop_question_type: bool = True, turn: str = "image") -> list[int]:
        text = self.tokenizer.decode(prompt_ids, skip_special_tokens=False)
        spans = self.turns.user_turns(text) if self.turns else []
        users = [text[start:end] for start, end in spans] or [text]
        if turn == "latest":
            chosen = users[-1:]
        else:
            chosen = [t for t in users if self.image_token in t] or users[-1:]
        return self._encode(" ".join(chosen), drop_question_type)

    def _encode(self, text: str, drop_question_type: bool) -> list[int]:
        for token in self._special:
            text = text.replace(token, " ")
        words = query_words(text.replace(self.image_token, " "), drop_question_type)
        if not words:
            return []
        # A leading space makes BPE vocabularies pick their word-initial pieces.
        return self.tokenizer.encode(" " + " ".join(words), add_special_tokens=False)
