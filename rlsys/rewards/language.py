"""DeepSeek-R1's language-consistency reward: the share of chain-of-thought words in one language.

R1 found that RL on multilingual prompts makes the reasoning drift between languages; rewarding
the proportion of target-language words in the chain of thought keeps it readable.

    language_consistency = (#words whose script belongs to the target) / (#words)

and 1.0 when there are no words at all (an empty or purely numeric reasoning is not
inconsistent). Languages are identified by Unicode script only, which is cheap, deterministic
and dependency-free; it cannot tell English from French (both Latin), which is acceptable for a
shaping reward whose job is to stop script mixing.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

# Scripts recognised by the prefix of a character's Unicode name ("LATIN SMALL LETTER A",
# "CJK UNIFIED IDEOGRAPH-4E00", "HANGUL SYLLABLE GA"...). Letters of any other script count as
# words in the script "other", so they still dilute the proportion.
_SCRIPT_PREFIXES: tuple[str, ...] = (
    "LATIN",
    "CJK",
    "HIRAGANA",
    "KATAKANA",
    "HANGUL",
    "CYRILLIC",
    "ARABIC",
    "GREEK",
    "DEVANAGARI",
    "HEBREW",
    "THAI",
)
SCRIPTS: tuple[str, ...] = tuple(prefix.lower() for prefix in _SCRIPT_PREFIXES)
_OTHER = "other"

# Scripts written without spaces between words: each character is counted as one word, since a
# run of them may be a whole sentence and would otherwise weigh as little as one English word.
_PER_CHARACTER_SCRIPTS = frozenset({"cjk", "hiragana", "katakana", "hangul"})

# Language codes map to the set of scripts a well-formed text in that language uses; Japanese
# mixes kanji with both kana. Every script name is also accepted as a target on its own.
TARGETS: dict[str, frozenset[str]] = {
    "en": frozenset({"latin"}),
    "zh": frozenset({"cjk"}),
    "ja": frozenset({"cjk", "hiragana", "katakana"}),
    "ko": frozenset({"hangul"}),
    "ru": frozenset({"cyrillic"}),
    **{script: frozenset({script}) for script in SCRIPTS},
}

# Width variants ("FULLWIDTH LATIN CAPITAL LETTER A", "HALFWIDTH KATAKANA LETTER A") belong to
# the script named after the width prefix.
_WIDTH_PREFIXES = ("FULLWIDTH ", "HALFWIDTH ")


def _script_of(char: str) -> str:
    """The lowercase script name of a letter, from the prefix of its Unicode name."""
    name = unicodedata.name(char, "")
    for width in _WIDTH_PREFIXES:
        if name.startswith(width):
            name = name[len(width) :]
    # Ideographic marks such as 々 (IDEOGRAPHIC ITERATION MARK) are part of CJK writing.
    if name.startswith("IDEOGRAPHIC"):
        return "cjk"
    for prefix, script in zip(_SCRIPT_PREFIXES, SCRIPTS, strict=True):
        if name.startswith(prefix):
            return script
    return _OTHER


def word_scripts(text: str) -> list[str]:
    """The script of every word of `text`, in order.

    A word is a maximal run of letters (Unicode category L*) of one script; combining marks
    (M*) extend the current word, because Devanagari and Thai vowel signs or Latin accents are
    marks, not letters. Each CJK ideograph, kana or hangul character is a word by itself.
    Digits, punctuation, whitespace and symbols (math included) end a word and count for
    nothing, so "x^2 + 1 = 5" is one Latin word.
    """
    scripts: list[str] = []
    current: str | None = None  # script of the word being read, None between words
    for char in text:
        category = unicodedata.category(char)
        if category.startswith("M"):
            # A mark without a preceding letter (e.g. after a digit) is not a word.
            continue
        if not category.startswith("L"):
            current = None
            continue
        script = _script_of(char)
        if script in _PER_CHARACTER_SCRIPTS:
            scripts.append(script)
            current = None
        elif script != current:
            # A change of script inside a run of letters starts a new word ("abcабв" is two).
            scripts.append(script)
            current = script
    return scripts


def _target_scripts(target: str) -> frozenset[str]:
    try:
        return TARGETS[target.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unknown language-consistency target {target!r}; supported: {', '.join(TARGETS)}"
        ) from None


def language_consistency(text: str, target: str = "en") -> float:
    """(#words of `text` in the target's scripts) / (#words), or 1.0 if `text` has no words.

    `target` is a language code ("en", "zh", "ja", "ko", "ru") or a script name ("latin",
    "cjk", "cyrillic", ...; see SCRIPTS). Raises ValueError for any other target. Scores the
    given text as is; `language_consistency_reward` first extracts the chain of thought.
    """
    allowed = _target_scripts(target)
    scripts = word_scripts(text)
    if not scripts:
        return 1.0
    return sum(script in allowed for script in scripts) / len(scripts)


_THINK_BLOCK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_TAG_RE = re.compile(r"</?think>")


def extract_reasoning(response: str) -> str:
    """The chain of thought of a response, which is what language consistency is measured on.

    The contents of all complete <think>...</think> blocks, joined by newlines; without one,
    the text before the first <answer> (the whole response if there is none), with any stray
    <think> or </think> tag removed: a truncated response never closes its think block, and a
    completion whose prompt pre-filled "<think>" only has the closing tag. The tags themselves
    are removed because their letters would count as English words.
    """
    blocks = _THINK_BLOCK_RE.findall(response)
    if blocks:
        return "\n".join(blocks)
    before_answer = response.split("<answer>", 1)[0]
    return _TAG_RE.sub(" ", before_answer)


@dataclass(frozen=True)
class LanguageReward:
    """A reward part `(response, gold) -> float` scoring language consistency for one target.

    A class rather than a closure so the configured part pickles (by value) to reward actors.
    The target is validated on construction, so a bad config fails at startup.
    """

    target: str = "en"

    def __post_init__(self) -> None:
        _target_scripts(self.target)
        object.__setattr__(self, "target", self.target.lower())
        # Reward parts are logged by name; give instances one like a function's.
        object.__setattr__(self, "__name__", f"language_{self.target}")

    def __call__(self, response: str, gold: str) -> float:
        # gold is unused: consistency depends on the reasoning only.
        return language_consistency(extract_reasoning(response), self.target)


def make_language_reward(target: str) -> LanguageReward:
    """A picklable language-consistency reward part for `target` (see language_consistency)."""
    return LanguageReward(target)


def language_consistency_reward(response: str, gold: str) -> float:
    """Language consistency of the response's chain of thought with English (Latin script)."""
    return language_consistency(extract_reasoning(response), "en")
