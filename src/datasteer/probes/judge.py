"""A pairwise judge: which of two responses to one prompt does a model prefer? ("preferences as a judge")

The judge reads an instruction and two responses, labelled A and B, and is scored, not sampled: its preference in
one order is the softmax over the log-likelihoods of answering "A" and "B" after the judge prompt. Every pair is
judged in both orders (response 1 as A, then response 1 as B) to cancel position bias:

    p1 = (P(A | 1 first) + P(B | 2 first)) / 2       the judge's position-debiased preference for response 1
    verdict = 1 when both orders choose response 1, 2 when both choose response 2, and a tie when the two orders
              disagree (the judge only followed the position), as MT-Bench and AlpacaEval treat inconsistent
              pairwise judgments

Format read (JSONL/JSON/Parquet/CSV, one pair per row): `prompt`, `response_1`, `response_2` (also read: the
instruction in `instruction` or `question`; the responses in `response_a`/`response_b`, `answer_1`/`answer_2` or
`output_1`/`output_2`), an optional `label` (1 or 2, a or b, or tie: the reference preference) and any numeric
attribute of both responses as `<attribute>_1` and `<attribute>_2` (for example `length_words_1`,
`length_words_2`): the summary says how often the judge prefers the response with more of each attribute.

Summary: `win_rate_1` = (wins of response 1 + ties / 2) / pairs with a 95% interval (each pair scores 1, 0.5 or 0;
normal approximation), the mean preference p1, tie rate (= inconsistent orders), first-position rate (the share of
the 2 x pairs single-order choices that picked the slot shown first; 0.5 = no position bias), agreement with
`label` over labelled pairs, and per attribute (`prefers_more`) the share of decisive verdicts won by the response
with more of it (`verdicts`) and the mean debiased preference for that response (`p`: a small judge that mostly
follows the position gives ties, yet its p still moves), each with its interval.

The judge prompt goes through the model's chat template when it has one (an instruct model is asked as its users
ask it), else it is plain text; `template` and `labels` are options. This judge needs a model datasteer loads
(log-likelihoods); an API model rates answers through the `judge` metric instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from pydantic import Field, field_validator

from datasteer.errors import InputError
from datasteer.probes.base import LogLik, ProbeOptions, Request, Score, Source, register
from datasteer.probes.data import hub_rows, local_files, read_table, unique_item_ids
from datasteer.stats import is_number, mean_interval

DEFAULT_TEMPLATE = (
    "You are judging two responses to the same instruction. Which response follows the instruction better? "
    "Answer with one letter, A or B.\n\n"
    "### Instruction:\n{prompt}\n\n### Response A:\n{a}\n\n### Response B:\n{b}\n\n"
    "### Better response (A or B):")
PROMPT_FIELDS = ("prompt", "instruction", "question")
RESPONSE_FIELDS = (("response_1", "response_2"), ("response_a", "response_b"), ("answer_1", "answer_2"),
                   ("output_1", "output_2"))
LABELS = {"1": 1, "2": 2, "a": 1, "b": 2, "tie": 0, "0": 0}


class JudgeOptions(ProbeOptions):
    score: Score | None = Field(None, description="sum (default: each label's log-probability) or mean")
    template: str = Field(DEFAULT_TEMPLATE, description="the judge prompt, with {prompt}, {a} and {b}")
    labels: tuple[str, str] = Field(("A", "B"), description="the answers that name the first and second response")
    chat: bool | None = Field(None, description="wrap the prompt in the model's chat template (default: when the "
                              "tokenizer has one)")

    @field_validator("template")
    @classmethod
    def _slots(cls, value: str) -> str:
        missing = [s for s in ("{prompt}", "{a}", "{b}") if s not in value]
        if missing:
            raise ValueError(f"the judge template needs {', '.join(missing)}")
        return value

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: tuple[str, str]) -> tuple[str, str]:
        if not all(v.strip() for v in value) or value[0].strip() == value[1].strip():
            raise ValueError(f"labels must be two different non-empty answers, got {list(value)}")
        return value


def _text(row: dict[str, Any], fields: Sequence[str], where: str, what: str, empty: bool = False) -> str:
    """The text of the first of `fields` the row has; `empty`: an empty text is allowed (a response may be empty,
    and is then judged as given)."""
    value = next((row[f] for f in fields if f in row), None)
    if not isinstance(value, str) or not (empty or value.strip()):
        raise InputError(f"{where}: no {what} text (fields {', '.join(fields)}); pairwise rows need prompt, "
                         "response_1 and response_2")
    return value.strip()


def pair_item(row: dict[str, Any], where: str, index: int) -> dict[str, Any]:
    names = next((pair for pair in RESPONSE_FIELDS if pair[0] in row and pair[1] in row), RESPONSE_FIELDS[0])
    item: dict[str, Any] = {
        "item_id": str(row.get("pair_id", row.get("id", index))),
        "prompt": _text(row, PROMPT_FIELDS, where, "prompt"),
        "response_1": _text(row, (names[0],), where, names[0], empty=True),
        "response_2": _text(row, (names[1],), where, names[1], empty=True),
        "label": None, "attributes": {}}
    label = row.get("label")
    if label is not None and str(label).strip() != "":
        key = str(label).strip().lower()
        if key not in LABELS:
            raise InputError(f"{where}: label {label!r} must be 1 or 2 (a or b), or tie")
        item["label"] = LABELS[key]
    for key, value in row.items():
        if key.endswith("_1") and key not in names and key[:-2] + "_2" in row:
            other = row[key[:-2] + "_2"]
            if is_number(value) and is_number(other):
                item["attributes"][key[:-2]] = [float(value), float(other)]
    return item


def _softmax2(x: float, y: float) -> float:
    """P(first) of a two-way softmax, stable."""
    return 1.0 / (1.0 + math.exp(y - x)) if y - x < 700 else 0.0


def _interval(values: list[float]) -> dict[str, Any]:
    found = mean_interval(values)
    if found is None:
        return {"n": len(values), "mean": values[0] if values else None, "ci95": None}
    mean, low, high = found
    return {"n": len(values), "mean": mean, "ci95": [low, high]}


@register("judge", help="pairwise judge: the model prefers response 1 or 2 (both orders, ties), win rate and "
          "attribute preferences", options=JudgeOptions, aliases=("pairwise", "preferences"))
class JudgeProbe:
    name = "judge"
    description = "pairwise preferences as a judge: win rate, position bias, ties, attribute preferences"

    def __init__(self, options: JudgeOptions):
        self.options = options
        self.score = options.score or "sum"
        self._render: Any = None  # the chat template, once bound to a tokenizer

    def bind(self, tokenizer: Any) -> None:
        """Use `tokenizer`'s chat template for the judge prompt (`chat: null` = when it has one). A leading BOS
        that the template writes is dropped: the encoder adds the model's BOS once."""
        chat = self.options.chat
        has = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has:
            raise InputError("the judge option chat: true needs a tokenizer with a chat template; this one has none "
                             "(set chat: false)")
        if not (has if chat is None else chat):
            self._render = None
            return
        bos = getattr(tokenizer, "bos_token", None)

        def render(text: str) -> str:
            out = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
            return out[len(bos):] if bos and out.startswith(bos) else out

        self._render = render

    def load(self, source: Source) -> list[dict[str, Any]]:
        if source.hub is not None:
            rows = hub_rows(source, "train")
            items = [pair_item(r, f"{source.hub} row {i + 1}", i) for i, r in enumerate(rows)]
        else:
            items = []
            for path in local_files(source):
                items += [pair_item(r, f"{path}:{i + 1}", len(items) + i) for i, r in enumerate(read_table(path))]
        return unique_item_ids(items)

    def prompt(self, item: dict[str, Any], first: str, second: str) -> str:
        text = (self.options.template.replace("{prompt}", item["prompt"]).replace("{a}", first)
                .replace("{b}", second))
        if self._render is not None:
            return self._render(text)
        return text + " "  # a plain-text judge answers after a space: " A"

    def requests(self, item: dict[str, Any]) -> list[Request]:
        a, b = self.options.labels
        straight = self.prompt(item, item["response_1"], item["response_2"])
        swapped = self.prompt(item, item["response_2"], item["response_1"])
        move = self._render is None  # a chat prompt ends where the model's answer begins
        return [Request(ctx, label, move_space=move) for ctx in (straight, swapped) for label in (a, b)]

    def row(self, item: dict[str, Any], scores: Sequence[LogLik]) -> dict[str, Any]:
        v = [s.value(self.score) for s in scores]
        p_straight = _softmax2(v[0], v[1])  # P(A) with response 1 as A
        p_swapped = _softmax2(v[3], v[2])  # P(B) with response 1 as B
        first = [p_straight > 0.5, p_swapped > 0.5]  # did each order choose response 1?
        verdict = 1 if all(first) else 2 if not any(first) else 0
        chose_first_slot = int(v[0] > v[1]) + int(v[2] > v[3])
        p1 = (p_straight + p_swapped) / 2
        attributes, p_more = {}, {}
        for name, (x1, x2) in item["attributes"].items():
            attributes[name] = None if verdict == 0 or x1 == x2 else (verdict == 1) == (x1 > x2)
            p_more[name] = None if x1 == x2 else (p1 if x1 > x2 else 1.0 - p1)
        return {"item_id": item["item_id"], "p1": p1, "p1_straight": p_straight,
                "p1_swapped": p_swapped, "verdict": verdict, "first_slot_choices": chose_first_slot,
                "label": item["label"], "agrees": None if item["label"] is None else verdict == item["label"],
                "prefers_more": attributes, "p_more": p_more, "scores": v}

    def summarize(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        n = len(rows)
        if not n:
            return {"pairs": 0}
        points = [1.0 if r["verdict"] == 1 else 0.5 if r["verdict"] == 0 else 0.0 for r in rows]
        labelled = [r for r in rows if r["label"] is not None]
        out: dict[str, Any] = {
            "pairs": n,
            "win_rate_1": _interval(points),
            "mean_p1": math.fsum(r["p1"] for r in rows) / n,
            "p1": _interval([r["p1"] for r in rows]),
            "wins_1": sum(r["verdict"] == 1 for r in rows), "wins_2": sum(r["verdict"] == 2 for r in rows),
            "tie_rate": sum(r["verdict"] == 0 for r in rows) / n,
            "first_position_rate": sum(r["first_slot_choices"] for r in rows) / (2 * n),
            "agreement": (sum(bool(r["agrees"]) for r in labelled) / len(labelled)) if labelled else None,
            "labelled": len(labelled),
            "prefers_more": {},
        }
        for name in sorted({k for r in rows for k in r["prefers_more"]}):
            decided = [float(r["prefers_more"][name]) for r in rows if r["prefers_more"].get(name) is not None]
            soft = [r["p_more"][name] for r in rows if r["p_more"].get(name) is not None]
            out["prefers_more"][name] = {"verdicts": _interval(decided), "p": _interval(soft)}
        return out

    def headline(self, summary: dict[str, Any]) -> dict[str, tuple[float | None, bool | None]]:
        """The numbers a study compares: the mean preference for response 1, ties, position bias, and the mean
        preference for the response with more of each attribute."""
        out: dict[str, tuple[float | None, bool | None]] = {
            "P(response 1)": (summary["p1"]["mean"], None), "tie rate": (summary["tie_rate"], None),
            "first-position rate": (summary["first_position_rate"], None)}
        for name, entry in summary["prefers_more"].items():
            out[f"P(prefers more {name})"] = (entry["p"]["mean"], None)
        return out
