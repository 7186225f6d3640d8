"""Hostile inputs against every command, checked against the CLI's contract.

A seeded generator builds bad and odd inputs (malformed rows, non-finite numbers, huge, empty and non-text texts,
odd paths, bad flag values) for every command. Each case must end in one of two ways:

- exit 0, and the run it names is complete (its manifest says so) with no temp file left anywhere, or
- exit 2 with exactly one line `datasteer: error: ...` on stderr and no traceback, with the output location as
  it was before (nothing created, nothing changed) and no temp file left anywhere.

Commands run in-process through `datasteer.cli.main` (a subprocess per case would spend most of its time importing
torch). The cases are listed in `CASES`; `test_the_generator_covers_every_command` keeps the generator honest.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from datasteer.cli import main
from tests.conftest import TINY

SEED = 0
TINY_GEN = ["--model", TINY, "--max-new-tokens", "2", "--batch-size", "4", "-q"]


@dataclass
class Case:
    command: str
    name: str
    build: Callable[[Path], list[str]]  # writes the inputs under the folder, returns argv (without `datasteer`)
    outputs: list[str] = field(default_factory=lambda: ["out"])  # paths (relative) whose state must hold on error


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


# ---------------------------------------------------------------- the generator

TEXTS = {
    "empty": "",
    "blank": "   \n\t ",
    "huge": "word " * 20000,
    "emoji": "🙂" * 50,
    "rtl": "مرحبا بالعالم. هذا نص.",
    "nul": "a\x00b",
    "control": "\x1b[31mred\x1b[0m",
    "newlines": "\n" * 30,
}
NUMBERS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "big": 1e308, "text": "7", "bool": True,
           "null": None}
ROW_FILES: dict[str, Callable[[Path], Path]] = {
    "missing file": lambda d: d / "absent.jsonl",
    "empty file": lambda d: _write(d / "rows.jsonl", ""),
    "malformed line": lambda d: _write(d / "rows.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n'),
    "not an object": lambda d: _write(d / "rows.jsonl", "[1, 2]\n"),
    "not utf-8": lambda d: _write(d / "rows.jsonl", b'{"prompt": "\xff\xfe", "completion": "x"}\n'),
    "a directory": lambda d: (d / "rows.jsonl").mkdir(parents=True) or d / "rows.jsonl",
    "unknown suffix": lambda d: _write(d / "rows.txt", "hello\n"),
    "bad csv": lambda d: _write(d / "rows.csv", "prompt,completion\na,b,c\n"),
    "bad parquet": lambda d: _write(d / "rows.parquet", b"PAR1 not really"),
    "bad json": lambda d: _write(d / "rows.json", '{"rows": 3}'),
}


def _text_rows(kind: str) -> list[dict]:
    return [{"prompt_id": "1", "prompt": "Say something.", "completion": TEXTS[kind]},
            {"prompt_id": "2", "prompt": "Say more.", "completion": "An ordinary answer here."}]


def _number_rows(kind: str) -> list[dict]:
    return [{"prompt_id": "1", "prompt": "p", "completion": "a", "s": NUMBERS[kind]},
            {"prompt_id": "1", "prompt": "p", "completion": "b", "s": 1.0},
            {"prompt_id": "2", "prompt": "q", "completion": "c", "s": 2.0}]


def generate_cases(seed: int = SEED) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []
    # malformed row files, for every command that reads rows or prompts
    for defect, make in ROW_FILES.items():
        cases += [
            Case("generate", defect, lambda d, m=make: [str(m(d)), *TINY_GEN, "--out", str(d / "out")]),
            Case("score", defect, lambda d, m=make: [str(m(d)), "-M", "length_words", "--out", str(d / "out"), "-q"]),
            Case("select", defect, lambda d, m=make: [str(m(d)), "-O", "length_words:max", "--out", str(d / "out")]),
            Case("finetune", defect, lambda d, m=make: [str(m(d)), "--model", TINY, "--out", str(d / "out"), "-q"]),
            Case("attribute", defect, lambda d, m=make: [str(m(d)), "--model", "tiny:gpt2", "--eval-texts",
                                                           str(_write(d / "held.txt", "held out text\n")),
                                                           "--out", str(d / "out.jsonl"), "-q"],
                 outputs=["out.jsonl"]),
        ]
    # odd texts: scored and selected (must work), generated from (as prompts) and trained on
    for kind in TEXTS:
        cases += [
            Case("score", f"text {kind}", lambda d, k=kind: [str(_jsonl(d / "rows.jsonl", _text_rows(k))), "-M",
                                                             "length,mtld,readability", "--out", str(d / "out"), "-q"]),
            Case("generate", f"prompt {kind}", lambda d, k=kind: [
                str(_jsonl(d / "p.jsonl", [{"prompt": TEXTS[k]}, {"prompt": "hello"}])), *TINY_GEN,
                "--out", str(d / "out")]),
        ]
    # non-finite and non-numeric scores, for select (any objective, any combination)
    for kind in NUMBERS:
        objectives = rng.choice([["s:max"], ["s:min"], ["s:max", "completion_len:max"], ["s:max:2"]])
        rows = [{**r, "completion_len": len(r["completion"])} for r in _number_rows(kind)]
        argv_objectives = [x for o in objectives for x in ("-O", o)]
        cases.append(Case("select", f"score {kind} {objectives}", lambda d, r=rows, o=argv_objectives: [
            str(_jsonl(d / "scored.jsonl", r)), *o, "--out", str(d / "out")]))
    # bad flag values and bad recipes, command by command
    bad_flags = {
        "generate": [["--k", "0"], ["--temperature", "-1"], ["--top-p", "0"], ["--backend", "openai"],
                     ["--set", "teachers.0.k=many"], ["--set", "nonsense"], ["--set", "teachers.9.k=1"]],
        "score": [["-M", "nope"], ["-M", "length[color=red]"], ["-M", "toxicity[backend=psychic]"],
                  ["--chunk-size", "0"], ["--set", "text_field=nothere"]],
        "select": [["-O", "s:upward"], ["-O", "nothere:max"], ["-C", "s>>1"], ["-C", "s>=nan"],
                   ["-O", "random", "-O", "s:max"], ["--combine", "lexicographic", "-O", "s:max:2", "-O", "t:max"]],
        "finetune": [["--lr", "-1"], ["--epochs", "0"], ["--method", "full", "--lora-r", "4"],
                     ["--set", "trl={no_such_argument: 1}"], ["--set", "trl={seed: 3}"]],
        "profile": [["--k", "3"], ["--metrics", "nope"], ["--prompts", "absent.jsonl"], ["--limit", "0"]],
        "attribute": [["--set", "training.optimizer=rmsprop"], ["--set", "training.trainable=['(unclosed']"]],
        "inherit": [["--set", "finetune.epochs=1"], ["--set", "selection.objectives=[mtdl:max]"],
                    ["--set", "teachers.0.model=tiny:nope"], ["--set", "student=./no/such/model"]],
        "dpg": [["--set", "grpo.steps=3"], ["--set", "target.kind=colour"], ["--set", "inner.learning_rate=1"],
                ["--set", "target.pattern={file: absent.txt}"]],
    }
    scored = [{"prompt_id": "1", "prompt": "p", "completion": "a", "s": 1.0, "t": 2.0},
              {"prompt_id": "1", "prompt": "p", "completion": "b", "s": 3.0, "t": 1.0}]
    for command, variants in bad_flags.items():
        for flags in variants:
            name = " ".join(flags)
            if command == "generate":
                build = lambda d, f=flags: [str(_jsonl(d / "p.jsonl", [{"prompt": "hi"}])), *TINY_GEN, *f,
                                            "--out", str(d / "out")]
            elif command in ("score", "select"):
                base = ["-M", "length_words"] if command == "score" else []
                quiet = ["-q"] if command == "score" else []
                build = lambda d, f=flags, b=base, q=quiet: [str(_jsonl(d / "rows.jsonl", scored)), *b, *f,
                                                             "--out", str(d / "out"), *q]
            elif command == "finetune":
                build = lambda d, f=flags: [str(_jsonl(d / "rows.jsonl", scored)), "--model", TINY, *f,
                                            "--out", str(d / "out"), "-q"]
            elif command == "profile":
                build = lambda d, f=flags: [TINY, *f, "--max-new-tokens", "2", "--out", str(d / "out"), "-q"]
            elif command == "attribute":
                build = lambda d, f=flags: [str(_jsonl(d / "rows.jsonl", [{"text": "some text here"}])), "--model",
                                            "tiny:gpt2", "--eval-texts", str(_write(d / "held.txt", "held out\n")),
                                            *f, "--out", str(d / "out.jsonl"), "-q"]
            else:  # inherit, dpg: a built-in recipe with a bad override; must fail before any model loads
                recipe = "demo-inherit" if command == "inherit" else "demo-dpg-67"
                build = lambda d, f=flags, r=recipe: [r, *f, "--out", str(d / "out"), "-q"]
            cases.append(Case(command, name, build, outputs=["out.jsonl"] if command == "attribute" else ["out"]))
    # odd output locations
    for command in ("score", "select"):
        flags = ["-M", "length_words", "-q"] if command == "score" else ["-O", "s:max"]
        cases += [
            Case(command, "out is a file", lambda d, f=flags: [str(_jsonl(d / "rows.jsonl", scored)), *f,
                                                              "--out", str(_write(d / "out", "a file\n"))]),
            Case(command, "out's parent is a file", lambda d, f=flags: [
                str(_jsonl(d / "rows.jsonl", scored)), *f, "--out", str(_write(d / "out", "x") / "sub")]),
            Case(command, "out with spaces and unicode", lambda d, f=flags: [
                str(_jsonl(d / "rows.jsonl", scored)), *f, "--out", str(d / "out" / "ünï cödé run")]),
        ]
    cases.append(Case("compare", "not a profile", lambda d: [str(d / "nothing"), str(d / "nothing")]))
    cases.append(Case("compare", "markdown into a directory", lambda d: [
        str(d / "nothing"), "--markdown", str((d / "out").mkdir() or d / "out")]))
    return cases


CASES = generate_cases()


# ---------------------------------------------------------------- the contract

def _state(paths: list[Path]) -> dict[str, object]:
    """What exists at each output location: files with their size and mtime, recursively."""
    state: dict[str, object] = {}
    for path in paths:
        if path.is_dir():
            state[str(path)] = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                      for p in path.rglob("*"))
        elif path.exists():
            state[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns)
        else:
            state[str(path)] = None
    return state


def _run(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
        raise SystemExit(0)
    return int(exit_info.value.code or 0), capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[f"{c.command}: {c.name}" for c in CASES])
def test_hostile_input_keeps_the_contract(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # in-process runs: a library's logging handler may still hold an earlier test's captured (closed) stderr;
    # its "--- Logging error ---" report would read as a traceback of ours
    monkeypatch.setattr("logging.raiseExceptions", False)
    argv = [case.command, *case.build(tmp_path)]
    outputs = [tmp_path / o for o in case.outputs]
    before = _state(outputs)
    code, err = _run(argv, capsys)
    temps = [str(p) for p in tmp_path.rglob("*.tmp-*")]
    assert not temps, f"temp files left behind: {temps}"
    assert "Traceback" not in err, err
    if code == 0:
        manifests = [p for o in outputs if o.is_dir() for p in [o / "manifest.json"] if p.is_file()]
        for manifest in manifests:
            assert json.loads(manifest.read_text())["status"] == "complete", manifest
        return
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("datasteer: error: "), err
    assert _state(outputs) == before, "a failed command changed its output location"


def test_the_generator_covers_every_command():
    commands = {c.command for c in CASES}
    assert {"generate", "score", "select", "finetune", "profile", "attribute", "inherit", "dpg",
            "compare"} <= commands
    assert len(CASES) >= 100
    assert [c.name for c in generate_cases()] == [c.name for c in CASES]  # seeded: the same cases every run
