"""Prompt rewriting: from a full chat prompt to the words an image is scored against.

PAR scores visual tokens against what the user asked, not against the system prompt,
the assistant's replies, the chat template, the image placeholder or function words
("what", "the", "is"), which would match every image alike. Which parts of a prompt are
the user's is read from the model's own chat template (`ChatTurns`), not from role names;
which of the user's words count is `words.content_words`'s job. The rewrite works on
words, not token ids, because a marker like "ASSISTANT:" is several sub-word tokens in
most vocabularies.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from par_vllm.words import content_words, forget as forget_words, warm_up

# What the rewriter remembers of the turns it has read: a bound on its memory, not a
# condition of correctness (a turn not remembered is read again).
_REMEMBERED_TURNS, _REMEMBERED_CHARS = 4096, 2000

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


def _end_of_last(ids: list[int], part: list[int]) -> int | None:
    """The index just after the last occurrence of `part` in `ids`, or None."""
    if not part:
        return None
    backwards, j = ids[::-1], 0
    while True:
        try:
            j = backwards.index(part[-1], j)
        except ValueError:
            return None
        end = len(ids) - j
        if ids[max(0, end - len(part)):end] == part:
            return end
        j += 1


@dataclass(frozen=True)
class SecondView:
    """Under `turn="image_and_latest"`, a later user turn that carries no image or video of
    its own and asks about something the image turns did not: the images to show again at
    its start. `images`: how many of the prompt's first images (those of the turns before
    it); `at`: the token index where its message starts; `query`: its content words' token
    ids, which these views are scored against."""

    images: int
    at: int
    query: list[int]


@dataclass(frozen=True)
class Rewrite:
    """What one prompt's images are scored against: `query`, the content words' token ids
    (empty: no words to score against), and under `turn="image_and_latest"` the
    `second_views`, one per later turn that gets one, in prompt order, read as they are
    taken: a caller that stops early leaves the later turns unread."""

    query: list[int]
    second_views: Iterator[SecondView] = field(default_factory=lambda: iter(()))


class QueryRewriter:
    """Turns a tokenized chat prompt into the token ids of the content words its images are
    scored against.

    `placeholders`: the image token (or the image and video tokens), never a content word.
    `turn` says which user words: "latest", the last user turn (the image follows the
    conversation, at the price of a new prefill every turn), or "image", those of the user
    turns that carry an image or video (in a conversation about one image, the words that
    came with it, so its reduced tokens do not change as the conversation goes on and the
    prefix cache is reused). "image_and_latest" scores images as "image" does and shows the
    earlier images again at each later question, scored against it (`second_views`): every
    such turn after the prompt's last image or video, not only the newest, so that each
    turn's prompt is the previous one's with the reply and the new turn appended, and the
    prefix cache holds all of it. A prompt the template's markers do not structure (a raw
    completion prompt) is one user turn."""

    def __init__(self, tokenizer, placeholders: str | Sequence[str]):
        self.tokenizer = tokenizer
        self.placeholders = (placeholders,) if isinstance(placeholders, str) else tuple(placeholders)
        self.turns = ChatTurns.from_tokenizer(tokenizer)
        self._special = [t for t in tokenizer.all_special_tokens if t]
        # A user message's opening marker as tokens: where a turn starts is searched from
        # the marker's occurrences, not by decoding a possibly long history.
        self._opens_ids = tokenizer.encode(self.turns.opens.strip(), add_special_tokens=False) if self.turns else []
        # transformers wraps a fast tokenizer's Rust decode and encode in per-token Python
        # work that costs more than the rest of the rewrite; the Rust tokenizer itself gives
        # the same ids and text wherever transformers adds no clean-up of its own.
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._rust = None if getattr(tokenizer, "clean_up_tokenization_spaces", False) else backend
        # A conversation sends its earlier turns again with every request; under
        # "image_and_latest" each of them is read for its words again.
        self._words = lru_cache(maxsize=_REMEMBERED_TURNS)(self._words_uncached)
        warm_up()

    def forget(self) -> None:
        """Forget the turns and words read so far (they are read again when next seen)."""
        self._words.cache_clear()
        forget_words()

    def __call__(self, prompt_ids: list[int], drop_question_type: bool = True, turn: str = "latest") -> list[int]:
        return self.rewrite(prompt_ids, drop_question_type, turn).query

    def second_views(self, prompt_ids: list[int], drop_question_type: bool = True) -> tuple[SecondView, ...]:
        """Where `turn="image_and_latest"` shows earlier images again: at every user turn
        after the prompt's last image or video whose content words are not the image
        turns' own (none in a single turn, or where no earlier turn has an image)."""
        return tuple(self.rewrite(prompt_ids, drop_question_type, "image_and_latest").second_views)

    def rewrite(self, prompt_ids: list[int], drop_question_type: bool = True, turn: str = "latest") -> Rewrite:
        """The query under `turn`, and the second views where `turn="image_and_latest"`
        shows some: one decode of the prompt for all of them."""
        text, spans = self._user_turns(prompt_ids)
        query = self._encode(self._query_text(text, spans, turn), drop_question_type)
        if turn != "image_and_latest" or len(spans) < 2:
            return Rewrite(query)
        return Rewrite(query, self._second_views(prompt_ids, text, spans, query, drop_question_type))

    def _second_views(self, prompt_ids: list[int], text: str, spans: list[tuple[int, int]], query: list[int],
                      drop_question_type: bool) -> Iterator[SecondView]:
        with_media = [any(p in text[start:end] for p in self.placeholders) for start, end in spans]
        if not any(with_media[:-1]):
            return
        last_media = max(i for i, media in enumerate(with_media) if media)
        images = text[:spans[last_media][1]].count(self.placeholders[0])
        if not images:  # videos only: they are not shown again
            return
        later = spans[last_media + 1:]
        marker_ends = self._marker_ends(prompt_ids)
        # Where the template's markers and the user turns pair up one to one, each turn's
        # start is found next to its own marker; otherwise by decoding suffixes.
        paired = marker_ends[last_media + 1:] if len(marker_ends) == len(spans) else [None] * len(later)
        for (start, end), marker_end in zip(later, paired):
            words = self._encode(text[start:end], drop_question_type)
            # `query` is the image turns' own words here (an earlier turn has media).
            if words and words != query:
                at = self._start_after_marker(prompt_ids, text, start, marker_end)
                if at is None:
                    at = self._token_index(prompt_ids, start, len(text))
                yield SecondView(images, at, words)

    def _marker_ends(self, prompt_ids: list[int]) -> list[int]:
        """The index just after each occurrence of the user turns' opening marker."""
        part, ends, i = self._opens_ids, [], 0
        if not part:
            return ends
        while True:
            try:
                i = prompt_ids.index(part[0], i)
            except ValueError:
                return ends
            if prompt_ids[i:i + len(part)] == part:
                ends.append(i + len(part))
                i += len(part)
            else:
                i += 1

    def _start_after_marker(self, prompt_ids: list[int], text: str, start: int, marker_end: int | None) -> int | None:
        """The token index where the user message at character `start` begins, given where
        its opening marker's tokens end: past at most a few whitespace tokens (what the
        template writes after the marker), at the first token whose text and the next few
        tokens' is where the message begins. None where that is not found."""
        if marker_end is None:
            return None
        for skip in range(4):
            at = marker_end + skip
            if at > len(prompt_ids) or (skip and self._decode(prompt_ids[marker_end:at]).strip()):
                return None
            ahead = self._decode(prompt_ids[at:at + 8])
            if ahead and text.startswith(ahead, start):
                return at
        return None

    def _user_turns(self, prompt_ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
        text = self._decode(prompt_ids)
        return text, self.turns.user_turns(text) if self.turns else []

    def _query_text(self, text: str, spans: list[tuple[int, int]], turn: str) -> str:
        users = [text[start:end] for start, end in spans] or [text]
        if turn == "latest":
            return users[-1]
        return " ".join([t for t in users if any(p in t for p in self.placeholders)] or users[-1:])

    def _suffix_length(self, prompt_ids: list[int], i: int) -> int:
        return len(self._decode(prompt_ids[i:]))

    def _decode(self, ids: list[int]) -> str:
        if self._rust is not None:
            return self._rust.decode(ids, skip_special_tokens=False)
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def _encode_text(self, text: str) -> list[int]:
        if self._rust is not None:
            return self._rust.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _token_index(self, prompt_ids: list[int], char: int, length: int) -> int:
        """The last token boundary at or before character `char` of the decoded prompt
        (`length` characters), where a user message starts: the token after the last opening
        marker, or the next few, checked by decoding suffixes; where that fails (a marker
        tokenized with its neighbours, or the turn is not the last), the search."""
        tail = length - char
        at = _end_of_last(prompt_ids, self._opens_ids)
        if at is not None and self._suffix_length(prompt_ids, at) >= tail:
            for _ in range(4):
                if at == len(prompt_ids) or self._suffix_length(prompt_ids, at + 1) < tail:
                    return at
                at += 1
        return self._search_token_index(prompt_ids, tail)

    def _search_token_index(self, prompt_ids: list[int], tail: int) -> int:
        """`_token_index` by galloping from the end and bisecting, decoding suffixes: the
        newest turn is short, the history before it may be long."""

        def suffix(i: int) -> int:
            return self._suffix_length(prompt_ids, i)

        # Invariant: suffix(low) >= tail > suffix(high); the boundary sought is low.
        high, step = len(prompt_ids), 1
        low = max(0, high - step)
        while low > 0 and suffix(low) < tail:
            high, step = low, 2 * step
            low = max(0, len(prompt_ids) - step)
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if suffix(mid) >= tail else (low, mid)
        return low

    def _encode(self, text: str, drop_question_type: bool) -> list[int]:
        if len(text) > _REMEMBERED_CHARS:
            return list(self._words_uncached(text, drop_question_type))
        return list(self._words(text, drop_question_type))

    def _words_uncached(self, text: str, drop_question_type: bool) -> tuple[int, ...]:
        for token in self._special:
            text = text.replace(token, " ")
        for placeholder in self.placeholders:
            text = text.replace(placeholder, " ")
        words = content_words(text, drop_question_type)
        if not words:
            return ()
        # A leading space makes BPE vocabularies pick their word-initial pieces.
        return tuple(self._encode_text(" " + " ".join(words)))
