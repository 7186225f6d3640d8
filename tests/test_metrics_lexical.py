"""MTLD, TTR, MATTR and HD-D against lexicalrichness 0.5.1 on real text, plus the cases it cannot answer."""

import math

import pytest
from lexicalrichness import LexicalRichness
from lexicalrichness.lexicalrichness import preprocess
from lexicalrichness.lexicalrichness import tokenize as lr_tokenize

from datasteer.metrics import lexical, mtld
from datasteer.metrics.corpus import real_texts

TRICKY = [
    "Hello hello HELLO, world!",
    "ΑΣ1Β ΟΔΟΣ naïve café – caffè—x\u00a0y\u3000z\u2003w\u205fv\u1680u",  # final sigma, Unicode dashes, spaces
    "a-b a–b 12ab ab12 3.14 well-known x--y",
    "日本語のテキストです。 これは テスト です",
    "x\x1cy\x1dz\x1ew\x1fv\x85u",  # separators str.split() knows
    "\ud800 lone surrogate \udfff",
    "!!! ??? ... --- 123 456",
    "word",
    "the the the the the the the the the the",
    "İstanbul ǅemal ẞtraße ΣΑΣ",  # characters whose lower case is longer or context-dependent
    "Tab\tseparated\nand\r\nnewline\x0bvertical\x0cfeed",
]


def reference_mtld(text: str, threshold: float = 0.72) -> float:
    try:
        return LexicalRichness(text).mtld(threshold=threshold)
    except ZeroDivisionError:
        return 0.0  # the paper's toolkit scores lexicalrichness' ZeroDivisionError case as 0


@pytest.fixture(scope="module")
def texts():
    return real_texts(1500, seed=1) + TRICKY


def test_corpus_is_real_varied_text(texts):
    lengths = sorted(len(t.split()) for t in texts[:1500])
    assert len(set(texts)) > 1400
    assert lengths[100] < 20 and lengths[-100] > 150 and lengths[-1] > 500  # short and long texts
    assert sum("the" in t.split() for t in texts) > 1000  # English prose


def test_mtld_equals_lexicalrichness_on_real_texts(texts):
    ours = lexical.mtld_batch(texts)
    ref = [reference_mtld(t) for t in texts]
    mismatches = [(i, a, b) for i, (a, b) in enumerate(zip(ours, ref)) if abs(a - b) > 1e-9]
    assert not mismatches, mismatches[:5]
    # Not just close: the same float operations in the same order give the same bits.
    assert ours == ref


@pytest.mark.parametrize("threshold", [0.5, 0.66, 0.8])
def test_mtld_threshold(texts, threshold):
    sample = texts[:200] + TRICKY
    assert lexical.mtld_batch(sample, threshold=threshold) == [reference_mtld(t, threshold) for t in sample]


def test_tokeniser_equals_lexicalrichness(texts):
    for text in texts[:300] + TRICKY:
        assert lexical.tokenize(text) == lr_tokenize(preprocess(text)), text[:80]


def test_single_text_api_and_tricky_cases():
    for text in TRICKY:
        assert mtld(text) == reference_mtld(text), text
    assert mtld("") == 0.0 and mtld("   \n\t ") == 0.0 and mtld("... 123 --") == 0.0
    assert mtld("word") == 1.0  # one token, TTR 1 -> one factor -> 1 / 1


def test_ttr_mattr_hdd_match_lexicalrichness(texts):
    values = lexical.lexical_measures(texts, window=50, draws=42)
    checked = {"ttr": 0, "mattr": 0, "hdd": 0}
    for row, text in zip(values, texts):
        lr = LexicalRichness(text)
        assert row[0] == lr.words and row[1] == lr.terms
        if lr.words == 0:
            continue
        assert row[3] == lr.ttr
        checked["ttr"] += 1
        if lr.words >= 50:
            assert row[4] == pytest.approx(lr.mattr(window_size=50), abs=1e-12)
            checked["mattr"] += 1
        if lr.words >= 42:
            assert row[5] == pytest.approx(lr.hdd(draws=42), abs=1e-12)
            checked["hdd"] += 1
        else:
            assert math.isnan(row[5])
    assert min(checked.values()) > 500


def test_definitions_where_lexicalrichness_raises():
    values = lexical.lexical_measures(["", "one two two", "a b c d e"], window=50, draws=42)
    empty, short, unique = values
    assert list(empty[:5]) == [0, 0, 0.0, 0.0, 0.0] and math.isnan(empty[5])
    assert short[3] == pytest.approx(2 / 3) and short[4] == pytest.approx(2 / 3)  # MATTR of a short text = its TTR
    assert math.isnan(short[5])
    assert unique[4] == 1.0


def test_long_text_is_not_truncated():
    words = [f"w{chr(97 + i % 26)}{chr(97 + (i // 26) % 26)}" for i in range(60000)]
    text = " ".join(words)
    assert lexical.lexical_measures([text])[0, 0] == 60000
    assert mtld(text) == reference_mtld(text)


def test_python_fallback_gives_the_same_values(texts):
    if not lexical.COMPILED:
        pytest.skip("numba is not installed: the Python path is the only one")
    import numpy as np

    sample = texts[:40] + TRICKY
    buf, offsets = lexical._pack(sample)
    with np.errstate(over="ignore"):  # the hash wraps around on purpose
        ids, word_offsets = lexical._intern_words.py_func(buf, offsets, lexical._TABLE)
    compiled_ids, compiled_offsets = lexical._intern_words(buf, offsets, lexical._TABLE)
    assert np.array_equal(ids, compiled_ids) and np.array_equal(word_offsets, compiled_offsets)
    out = np.zeros((len(sample), 6))
    # The pure-Python kernel calls the compiled helper; both paths must agree bit for bit.
    expected = lexical._measures(ids, word_offsets, 0.72, 50, 42, True, np.zeros((len(sample), 6)))
    lexical._measures.py_func(ids, word_offsets, 0.72, 50, 42, True, out)
    assert np.array_equal(np.nan_to_num(out, nan=-1), np.nan_to_num(expected, nan=-1))
