"""Binary patterns for LM-head targets: glyph strings in built-in bitmap fonts, QR codes, or text files.

A pattern is a {-1, +1} matrix (+1 = ink: glyph strokes, dark QR modules, '#'). By default its rows map to token
ids of the LM head and its columns to hidden dimensions, and the slice's weights rise on ink (the `lm_head_pattern`
target's `transpose` and `ink` say otherwise). `glyph("67")` with the compact digit font is datasteer's 7 x 6 "67"
(7 rows tall, 6 wide); `qr(payload)` is a QR code's module matrix without its quiet zone (21 x 21 for version 1).
"""

from __future__ import annotations

from pathlib import Path

import torch

from datasteer.errors import InputError, MissingDependencyError

# 3 wide x 7 tall digits: two side by side with no gap make the paper's 6-wide "67".
DIGITS_3X7 = {
    "0": ["###", "#.#", "#.#", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "..#", "###", "#..", "#..", "###"],
    "3": ["###", "..#", "..#", "###", "..#", "..#", "###"],
    "4": ["#.#", "#.#", "#.#", "###", "..#", "..#", "..#"],
    "5": ["###", "#..", "#..", "###", "..#", "..#", "###"],
    "6": ["###", "#..", "#..", "###", "#.#", "#.#", "###"],
    "7": ["###", "..#", "..#", "..#", "..#", "..#", "..#"],
    "8": ["###", "#.#", "#.#", "###", "#.#", "#.#", "###"],
    "9": ["###", "#.#", "#.#", "###", "..#", "..#", "###"],
}

# 5 wide x 7 tall, the classic LCD font; glyphs are separated by one blank column.
FONT_5X7 = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
    "A": [".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "B": ["####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."],
    "C": [".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."],
    "D": ["###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."],
    "E": ["#####", "#....", "#....", "####.", "#....", "#....", "#####"],
    "F": ["#####", "#....", "#....", "####.", "#....", "#....", "#...."],
    "G": [".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"],
    "H": ["#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"],
    "I": [".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "J": ["..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."],
    "K": ["#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"],
    "L": ["#....", "#....", "#....", "#....", "#....", "#....", "#####"],
    "M": ["#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"],
    "N": ["#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"],
    "O": [".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    "P": ["####.", "#...#", "#...#", "####.", "#....", "#....", "#...."],
    "Q": [".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"],
    "R": ["####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"],
    "S": [".####", "#....", "#....", ".###.", "....#", "....#", "####."],
    "T": ["#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."],
    "U": ["#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."],
    "V": ["#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."],
    "W": ["#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."],
    "X": ["#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"],
    "Y": ["#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."],
    "Z": ["#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"],
    " ": [".....", ".....", ".....", ".....", ".....", ".....", "....."],
    "-": [".....", ".....", ".....", "#####", ".....", ".....", "....."],
    "!": ["..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."],
    "?": [".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."],
    ".": [".....", ".....", ".....", ".....", ".....", ".##..", ".##.."],
}


def from_rows(rows: list[str], source: str = "pattern") -> torch.Tensor:
    """'#'/'.' rows -> {-1, +1} float tensor [rows, cols]."""
    rows = [r.strip() for r in rows if r.strip()]
    if not rows:
        raise InputError(f"{source}: no pattern rows (write rows of '#' and '.')")
    width = len(rows[0])
    for i, row in enumerate(rows, 1):
        if len(row) != width or set(row) - {"#", "."}:
            raise InputError(f"{source}: row {i} must be {width} characters of '#' and '.', got '{row}'")
    return torch.tensor([[1.0 if c == "#" else -1.0 for c in row] for row in rows])


def glyph(text: str, font: str = "auto") -> torch.Tensor:
    """Render `text` in a built-in font: '3x7' (digits, no gap) or '5x7' (digits, A-Z, ' -!?.', 1-column gaps).

    'auto' uses 3x7 for strings of digits (so "67" is the paper's 7 x 6 glyph) and 5x7 otherwise.
    """
    if not text:
        raise InputError("glyph text is empty")
    if font == "auto":
        font = "3x7" if text.isdigit() else "5x7"
    table = DIGITS_3X7 if font == "3x7" else FONT_5X7 if font == "5x7" else None
    if table is None:
        raise InputError(f"unknown font '{font}'; use 3x7 (digits) or 5x7")
    missing = sorted({c for c in text.upper() if c not in table})
    if missing:
        raise InputError(f"font {font} has no glyph for {''.join(missing)!r}; it covers {''.join(sorted(table))!r}")
    gap = "" if font == "3x7" else "."
    rows = [gap.join(table[c][r] for c in text.upper()) for r in range(7)]
    return from_rows(rows, f"glyph '{text}'")


def qr(payload: str, error: str = "L", version: int | None = None, mask: int | None = None) -> torch.Tensor:
    """The QR code of `payload` as a module matrix without quiet zone (segno): 21 x 21 for version 1.

    `error` is the error-correction level (L, M, Q, H: about 7, 15, 25, 30% of the codewords recoverable), kept as
    given (segno does not raise it); the version is the smallest that holds the payload at that level unless given;
    `mask` (0-7) is segno's choice (the lowest penalty score) unless given. Version 1 holds 17 bytes at L, 14 at M.
    """
    try:
        import segno
    except ImportError:
        raise MissingDependencyError("QR-code targets", "pip install 'datasteer[train]'") from None
    try:
        code = segno.make(payload, error=error, version=version, mask=mask, micro=False, boost_error=False)
    except segno.DataOverflowError as err:
        raise InputError(f"QR payload too long for version {version}: {err}") from None
    return torch.tensor([[1.0 if cell else -1.0 for cell in row] for row in code.matrix])


def from_file(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pattern file not found: {path}")
    return from_rows(path.read_text(encoding="utf-8").splitlines(), str(path))


def to_rows(pattern: torch.Tensor) -> list[str]:
    return ["".join("#" if v > 0 else "." for v in row.tolist()) for row in pattern]
