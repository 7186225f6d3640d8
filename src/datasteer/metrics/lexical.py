"""Lexical diversity: MTLD, type-token ratio, MATTR and HD-D, exactly as `lexicalrichness` computes them.

The reference is `lexicalrichness` 0.5.1, which the "LLM See, LLM Do" profiling toolkit uses as
`LexicalRichness(text).mtld(threshold=0.72)`. Its tokenisation, reproduced here bit for bit:

1. lower-case (it runs its preprocessor twice; `str.lower` is idempotent, so once is the same);
2. delete ASCII digits and the three dashes `-`, `–` (en), `—` (em): "well-known" -> "wellknown";
3. replace every ASCII punctuation character (`string.punctuation`) by a space;
4. split on Unicode whitespace (`str.split()`).

MTLD (McCarthy & Jarvis 2010) walks the tokens, keeping the type-token ratio (TTR) of the
current segment; when it drops to the threshold or below a factor is counted and a new segment
starts. The leftover segment adds the partial factor (1 - TTR) / (1 - threshold); the score is
tokens / factors, averaged over a forward and a backward pass. A text with no tokens has no
MTLD (lexicalrichness raises ZeroDivisionError); it scores 0, as the paper's toolkit does.

Speed: the tokeniser and all measures run in one compiled pass per text (numba), about 25x
faster than lexicalrichness on the same texts with identical values (benchmarks/metrics.py).
Words are interned per text with an exact hash table (hash, then a byte-by-byte comparison),
so no hash collision can change a value. Without numba the same algorithm runs in Python.

Definitions where lexicalrichness raises instead of answering (documented, tested):
  - TTR of a text with no tokens: 0.
  - MATTR (Covington & McFall 2010, window `w`, default 50): the mean TTR over every window of
    `w` consecutive tokens; a text shorter than the window has a single window, itself (its TTR).
  - HD-D (McCarthy & Jarvis 2007, 42 draws): sum over types of P(type seen in 42 draws without
    replacement) / 42; a text with fewer than 42 tokens has no HD-D (missing, NaN).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import numpy as np

from datasteer.errors import ConfigError
from datasteer.metrics.base import BaseScorer, as_float, as_int, register, register_group

MTLD_THRESHOLD = 0.72
MATTR_WINDOW = 50
HDD_DRAWS = 42

# What the compiled tokeniser does with each ASCII byte: keep it lower-cased (0..127), end a
# word (_SEP) or drop it (_DELETE). Non-ASCII bytes are word bytes, except the UTF-8 sequences
# of Unicode whitespace (separators) and of the en and em dashes (dropped).
_SEP, _DELETE = -1, -2


def _ascii_table() -> np.ndarray:
    table = np.arange(128, dtype=np.int16)
    table[ord("A"):ord("Z") + 1] += 32
    for ch in string.punctuation:
        table[ord(ch)] = _SEP
    for ch in " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f":  # the ASCII characters str.split() splits on
        table[ord(ch)] = _SEP
    for ch in "0123456789-":
        table[ord(ch)] = _DELETE
    return table


_TABLE = _ascii_table()


def _pack(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts as one UTF-8 buffer with byte offsets. Only non-ASCII texts are lower-cased here
    (str.lower knows Unicode case rules such as the final sigma); ASCII case, punctuation, digits,
    dashes and Unicode whitespace are handled byte-wise by the kernel."""
    pieces = [t.encode("ascii") if t.isascii() else t.lower().encode("utf-8", "surrogatepass") for t in texts]
    offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), out=offsets[1:])
    return np.frombuffer(b"".join(pieces), dtype=np.uint8), offsets


_TOKEN_TABLE = {**{ord(c): " " for c in string.punctuation}, **{ord(c): None for c in "0123456789-–—"}}


def tokenize(text: str) -> list[str]:
    """lexicalrichness' tokens of `text` (for inspection; the measures use the compiled tokeniser)."""
    return text.lower().translate(_TOKEN_TABLE).split()


# ---------------------------------------------------------------- kernels (plain Python; compiled by numba below)

def _multibyte_class(b0, b1, b2):
    """_SEP or _DELETE for the 3-byte UTF-8 sequences that are whitespace or a dash, else b0 (a word byte)."""
    if b0 == 0xE2 and b1 == 0x80:
        if b2 == 0x93 or b2 == 0x94:  # en and em dash
            return _DELETE
        if b2 <= 0x8A or b2 == 0xA8 or b2 == 0xA9 or b2 == 0xAF:  # U+2000..U+200A, U+2028, U+2029, U+202F
            return _SEP
    elif (b0 == 0xE1 and b1 == 0x9A and b2 == 0x80) or (b0 == 0xE2 and b1 == 0x81 and b2 == 0x9F) or (
            b0 == 0xE3 and b1 == 0x80 and b2 == 0x80):  # U+1680, U+205F, U+3000
        return _SEP
    return b0


def _intern_words(buf, offsets, table):
    """Per text, the id of each token (ids are 0, 1, 2... in order of first appearance within the text)."""
    n_texts = offsets.shape[0] - 1
    total = offsets[n_texts]
    ids = np.empty(total + 1, dtype=np.int64)
    word_offsets = np.zeros(n_texts + 1, dtype=np.int64)
    max_bytes = 1
    for t in range(n_texts):
        size = offsets[t + 1] - offsets[t]
        if size > max_bytes:
            max_bytes = size
    cap = 16
    while cap < max_bytes:  # at most one word per two bytes, so the table stays at most half full
        cap *= 2
    slot_stamp = np.full(cap, -1, dtype=np.int64)
    slot_id = np.zeros(cap, dtype=np.int64)
    slot_hash = np.zeros(cap, dtype=np.uint64)
    word_start = np.zeros(max_bytes + 1, dtype=np.int64)  # per id: where its bytes start in `chars`
    word_len = np.zeros(max_bytes + 1, dtype=np.int64)
    chars = np.empty(max_bytes + 1, dtype=np.uint8)
    length_seed = 0x9E3779B97F4A7C15
    n = 0
    for t in range(n_texts):
        word_offsets[t] = n
        n_types = 0
        pos = 0
        start = -1
        h = np.uint64(length_seed)
        end = offsets[t + 1]
        i = offsets[t]
        size = 16  # a table sized for this text (a small one stays in cache)
        while size < end - i:
            size *= 2
        mask = np.uint64(size - 1)
        while i <= end:
            if i < end:
                b = buf[i]
                i += 1
                if b < 128:
                    c = table[b]
                elif i < end and b == 0xC2 and (buf[i] == 0x85 or buf[i] == 0xA0):
                    c = _SEP  # U+0085, U+00A0: whitespace for str.split()
                    i += 1
                elif i + 1 < end and b >= 0xE1 and b <= 0xE3:
                    c = _multibyte_class(b, buf[i], buf[i + 1])
                    if c < 0:
                        i += 2
                else:
                    c = b
                if c >= 0:  # a word byte
                    if start < 0:
                        start = pos
                        h = np.uint64(length_seed)
                    chars[pos] = c
                    pos += 1
                    h = ((h << np.uint64(7)) | (h >> np.uint64(57))) ^ np.uint64(c)  # cheap; mixed below
                    continue
                if c == _DELETE:
                    continue
            else:
                i += 1  # past the end: a separator closes the last word
            if start < 0:
                continue
            length = pos - start
            h ^= h >> np.uint64(33)  # murmur3's finaliser: every input bit reaches the low (slot) bits
            h *= np.uint64(0xFF51AFD7ED558CCD)
            h ^= h >> np.uint64(33)
            h *= np.uint64(0xC4CEB9FE1A85EC53)
            h ^= h >> np.uint64(33)
            slot = h & mask
            while True:
                if slot_stamp[slot] != t:  # empty for this text: a new type
                    slot_stamp[slot] = t
                    slot_hash[slot] = h
                    slot_id[slot] = n_types
                    word_start[n_types] = start
                    word_len[n_types] = length
                    ids[n] = n_types
                    n_types += 1
                    break
                if slot_hash[slot] == h:
                    other = slot_id[slot]
                    if word_len[other] == length:
                        a = word_start[other]
                        same = True
                        for j in range(length):
                            if chars[a + j] != chars[start + j]:
                                same = False
                                break
                        if same:
                            ids[n] = other
                            pos = start  # the bytes of a known type need not be kept
                            break
                slot = (slot + np.uint64(1)) & mask
            n += 1
            start = -1
    word_offsets[n_texts] = n
    return ids[:n], word_offsets


def _mtld_one_direction(ids, lo, hi, step, threshold, n_types, seen, stamp, limit):
    # Mirrors lexicalrichness' sub_mtld operation for operation (same float rounding); the test
    # `terms / count <= threshold` is `terms <= limit[count]`, precomputed with the same division.
    words = hi - lo
    count = 0
    terms = 0
    factors = 0
    ttr = 1.0
    i = lo if step > 0 else hi - 1
    for _ in range(words):
        w = ids[i]
        i += step
        count += 1
        if seen[w] != stamp:
            seen[w] = stamp
            terms += 1
        if terms <= limit[count]:
            ttr = terms / count
            count = 0
            terms = 0
            factors += 1
            stamp += 1
    total = float(factors)
    if count > 0:
        ttr = terms / count
        total = factors + (1.0 - ttr) / (1.0 - threshold)
    if total == 0.0:
        whole = n_types / words
        if whole == 1.0:
            total = total + 1.0
        else:
            total = total + (1.0 - whole) / (1.0 - threshold)
    return words / total, stamp + 1


def _measures(ids, word_offsets, threshold, window, draws, extra, out):
    """out[t] = (tokens, types, mtld, ttr, mattr, hdd) for every text (MATTR and HD-D only if `extra`)."""
    n_texts = word_offsets.shape[0] - 1
    max_words = 1
    max_id = 1
    for t in range(n_texts):
        size = word_offsets[t + 1] - word_offsets[t]
        if size > max_words:
            max_words = size
    for j in range(ids.shape[0]):
        if ids[j] + 1 > max_id:
            max_id = ids[j] + 1
    seen = np.full(max_id, -1, dtype=np.int64)
    limit = np.empty(max_words + 1, dtype=np.int64)  # limit[c]: the most types with types / c <= threshold
    for c in range(1, max_words + 1):
        m = int(threshold * c) + 1
        while m > 0 and m / c > threshold:
            m -= 1
        limit[c] = m
    counts = np.zeros(max_id, dtype=np.int64)
    by_freq = np.zeros(max_words + 1, dtype=np.int64)
    stamp = 0
    for t in range(n_texts):
        lo = word_offsets[t]
        hi = word_offsets[t + 1]
        words = hi - lo
        n_types = 0
        for j in range(lo, hi):
            if ids[j] + 1 > n_types:
                n_types = ids[j] + 1
        out[t, 0] = words
        out[t, 1] = n_types
        if words == 0:
            out[t, 2] = 0.0
            out[t, 3] = 0.0
            out[t, 4] = 0.0
            out[t, 5] = np.nan
            continue
        forward, stamp = _mtld_one_direction(ids, lo, hi, 1, threshold, n_types, seen, stamp, limit)
        backward, stamp = _mtld_one_direction(ids, lo, hi, -1, threshold, n_types, seen, stamp, limit)
        out[t, 2] = (forward + backward) / 2.0  # == statistics.mean of two floats (exact halving)
        out[t, 3] = n_types / words
        if not extra:
            out[t, 4] = np.nan
            out[t, 5] = np.nan
            continue
        # MATTR: TTR of every window of `w` tokens, kept with type counts as the window slides.
        w = window if window < words else words
        for j in range(n_types):
            counts[j] = 0
        distinct = 0
        for j in range(lo, lo + w):
            if counts[ids[j]] == 0:
                distinct += 1
            counts[ids[j]] += 1
        acc = distinct / w
        for j in range(lo + w, hi):
            counts[ids[j - w]] -= 1
            if counts[ids[j - w]] == 0:
                distinct -= 1
            if counts[ids[j]] == 0:
                distinct += 1
            counts[ids[j]] += 1
            acc += distinct / w
        out[t, 4] = acc / (words - w + 1)
        # HD-D: P(no copy of a type among `draws` tokens drawn without replacement) = C(N-f, n) / C(N, n).
        if words < draws:
            out[t, 5] = np.nan
            continue
        for j in range(n_types):
            counts[j] = 0
        for j in range(lo, hi):
            counts[ids[j]] += 1
        # Types share few distinct frequencies: walk f = 1, 2, ... with
        # C(N-f-1, n) / C(N, n) = C(N-f, n) / C(N, n) * (N-f-n) / (N-f), adding each frequency's share.
        max_f = 0
        for j in range(n_types):
            if counts[j] > max_f:
                max_f = counts[j]
        for j in range(max_f + 1):
            by_freq[j] = 0
        for j in range(n_types):
            by_freq[counts[j]] += 1
        p_none = 1.0
        for i in range(draws):  # f = 1: (N-1-i) / (N-i) over the draws
            p_none *= (words - 1 - i) / (words - i)
        hdd = 0.0
        for f in range(1, max_f + 1):
            if f > 1:
                p_none = p_none * (words - f + 1 - draws) / (words - f + 1) if words - f + 1 > draws else 0.0
            if by_freq[f]:
                hdd += by_freq[f] * (1.0 - p_none) / draws
        out[t, 5] = hdd
    return out


try:  # numba compiles the kernels once per machine (cached next to this file or in NUMBA_CACHE_DIR)
    import numba as _numba
except ImportError:  # pragma: no cover - numba is a dependency; kept for platforms without its wheels
    _numba = None
    COMPILED = False
else:
    _multibyte_class = _numba.njit(cache=True, nogil=True, inline="always")(_multibyte_class)
    _intern_words = _numba.njit(cache=True, nogil=True)(_intern_words)
    _mtld_one_direction = _numba.njit(cache=True, nogil=True)(_mtld_one_direction)
    _measures = _numba.njit(cache=True, nogil=True)(_measures)
    COMPILED = True

_CHUNK = 256
COLUMNS = ("tokens", "types", "mtld", "ttr", "mattr", "hdd")


def lexical_measures(texts: Sequence[str], *, threshold: float = MTLD_THRESHOLD, window: int = MATTR_WINDOW,
                     draws: int = HDD_DRAWS, extra: bool = True) -> np.ndarray:
    """An array [len(texts), 6] with the columns of `COLUMNS` for every text, in one pass.

    `extra=False` skips MATTR and HD-D (NaN columns), for callers that need MTLD or TTR only.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"MTLD threshold must be between 0 and 1, got {threshold}")
    if window < 1 or draws < 1:
        raise ValueError("MATTR window and HD-D draws must be positive integers")
    out = np.zeros((len(texts), len(COLUMNS)), dtype=np.float64)
    with np.errstate(over="ignore"):  # the word hash wraps around on purpose (only the Python fallback notices)
        for lo in range(0, len(texts), _CHUNK):  # chunks keep the buffers in cache
            buf, offsets = _pack(texts[lo:lo + _CHUNK])
            ids, word_offsets = _intern_words(buf, offsets, _TABLE)
            _measures(ids, word_offsets, float(threshold), int(window), int(draws), bool(extra),
                      out[lo:lo + _CHUNK])
    return out


def mtld(text: str, threshold: float = MTLD_THRESHOLD) -> float:
    """MTLD of one text: exactly `lexicalrichness.LexicalRichness(text).mtld(threshold)` (0 for no tokens)."""
    return float(lexical_measures([text], threshold=threshold, extra=False)[0, 2])


def mtld_batch(texts: Sequence[str], threshold: float = MTLD_THRESHOLD) -> list[float]:
    return lexical_measures(texts, threshold=threshold, extra=False)[:, 2].tolist()


def ttr(text: str) -> float:
    return float(lexical_measures([text], extra=False)[0, 3])


def hdd(text: str, draws: int = HDD_DRAWS) -> float:
    return float(lexical_measures([text], draws=draws)[0, 5])


def mattr(text: str, window: int = MATTR_WINDOW) -> float:
    return float(lexical_measures([text], window=window)[0, 4])


# ---------------------------------------------------------------- scorers

class LexicalScorer(BaseScorer):
    def __init__(self, column: str, description: str, **options: Any):
        super().__init__(name=column, higher_is_better=True, batched=True, batch_size=4096, description=description)
        self._index = COLUMNS.index(column)
        self._options = options

    def score(self, texts: Sequence[str], prompts: Sequence[str] | None = None) -> list[float]:
        return lexical_measures(texts, extra=self._index >= 4, **self._options)[:, self._index].tolist()


@register("mtld", "MTLD lexical diversity, exactly lexicalrichness mtld(threshold=0.72)", params=("threshold",))
def _mtld_scorer(threshold: str = str(MTLD_THRESHOLD)) -> LexicalScorer:
    value = as_float(threshold, "mtld threshold")
    if not 0.0 < value < 1.0:
        raise ConfigError(f"mtld threshold must be between 0 and 1, got {threshold}")
    return LexicalScorer("mtld", f"MTLD (threshold {value}), lexicalrichness tokenisation", threshold=value)


@register("ttr", "type-token ratio (lexicalrichness tokens)")
def _ttr_scorer() -> LexicalScorer:
    return LexicalScorer("ttr", "type-token ratio")


@register("mattr", "moving-average type-token ratio", params=("window",))
def _mattr_scorer(window: str = str(MATTR_WINDOW)) -> LexicalScorer:
    value = _positive_int(window, "mattr window")
    return LexicalScorer("mattr", f"MATTR (window {value})", window=value)


@register("hdd", "HD-D lexical diversity (missing for texts under `draws` tokens)", params=("draws",))
def _hdd_scorer(draws: str = str(HDD_DRAWS)) -> LexicalScorer:
    value = _positive_int(draws, "hdd draws")
    return LexicalScorer("hdd", f"HD-D ({value} draws)", draws=value)


def _positive_int(text: str, where: str) -> int:
    value = as_int(text, where)
    if value < 1:
        raise ConfigError(f"{where} must be a positive integer, got {text}")
    return value


register_group("lexical", ("mtld", "ttr", "mattr", "hdd"))
