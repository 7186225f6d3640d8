"""Passive inheritance: the pairwise judge, `pairwise`, the toxicity profile's prompts, the study pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from datasteer.errors import ConfigError, InputError
from datasteer.inheritance.config import PairwiseConfig, PassiveConfig, ProfileConfig
from datasteer.io import PromptsConfig, read_prompts
from datasteer.models import load_model
from datasteer.probes import LogLik, build_probe, probe
from datasteer.probes.config import ProbeConfig
from datasteer.stats import Z95, mean_interval
from tests.conftest import write_prompts
from tests.test_cli import run_cli
from tests.test_probes import AGE, _bbq_row

TINY = "tiny:llama"


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY)


# ------------------------------------------------------------------ the judge, by hand

def _ll(*values: float) -> list[LogLik]:
    return [LogLik(v, 1) for v in values]


def test_judge_rows_and_summary_by_hand():
    judge = build_probe("judge")
    item = {"item_id": "0", "label": 1, "attributes": {"length_words": [10.0, 3.0]}}
    # straight order: A (= response 1) more likely; swapped: B (= response 1) more likely -> consistent win
    win = judge.row(item, _ll(-1.0, -2.0, -2.0, -1.0))
    p = 1.0 / (1.0 + math.exp(-1.0))
    assert win["p1_straight"] == pytest.approx(p) and win["p1_swapped"] == pytest.approx(p)
    assert win["verdict"] == 1 and win["first_slot_choices"] == 1 and win["agrees"] is True
    assert win["prefers_more"] == {"length_words": True} and win["p_more"]["length_words"] == pytest.approx(p)
    # the judge picks slot A in both orders: it only follows the position -> a tie
    tie = judge.row({**item, "item_id": "1"}, _ll(-1.0, -2.0, -1.0, -2.0))
    assert tie["verdict"] == 0 and tie["first_slot_choices"] == 2 and tie["p1"] == pytest.approx(0.5)
    assert tie["prefers_more"] == {"length_words": None}
    # response 2 wins in both orders; response 2 is the shorter one
    loss = judge.row({**item, "item_id": "2", "label": None}, _ll(-3.0, -1.0, -1.0, -3.0))
    assert loss["verdict"] == 2 and loss["agrees"] is None and loss["prefers_more"] == {"length_words": False}
    s = judge.summarize([win, tie, loss])
    points = [1.0, 0.5, 0.0]
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in points) / 2)
    assert s["win_rate_1"]["mean"] == pytest.approx(0.5)
    assert s["win_rate_1"]["ci95"] == pytest.approx([0.5 - Z95 * sd / math.sqrt(3), 0.5 + Z95 * sd / math.sqrt(3)])
    assert (s["wins_1"], s["wins_2"], s["tie_rate"]) == (1, 1, pytest.approx(1 / 3))
    assert s["first_position_rate"] == pytest.approx((1 + 2 + 1) / 6)
    assert s["agreement"] == pytest.approx(0.5) and s["labelled"] == 2
    assert s["prefers_more"]["length_words"]["verdicts"]["mean"] == pytest.approx(0.5)  # one of two decisive
    assert mean_interval([1.0]) is None


def test_judge_pairs_file_errors(tmp_path):
    judge = build_probe("judge")
    from datasteer.probes.base import Source

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response_1": "x"}) + "\n")
    with pytest.raises(InputError, match="response_2"):
        judge.load(Source(text=str(bad), path=bad))
    bad.write_text(json.dumps({"prompt": "p", "response_1": "x", "response_2": "y", "label": "maybe"}) + "\n")
    with pytest.raises(InputError, match="label"):
        judge.load(Source(text=str(bad), path=bad))
    with pytest.raises(ConfigError, match=r"\{b\}"):
        build_probe("judge", {"template": "{prompt} {a}"})


def test_judge_scores_equal_a_direct_forward_through_the_chat_template(tmp_path, tiny):
    """The judge's log-likelihood of "A" is the model's own, after the prompt its chat template renders (one BOS)."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Name a colour.", "response_1": "Red.", "response_2": "A dog."}) + "\n")
    result = probe(ProbeConfig(model=TINY, benchmarks={"judge": str(pairs)}), tmp_path / "run", progress=False,
                   loaded=tiny)
    row = result.rows("judge")[0]
    tok, model = tiny.tokenizer, tiny.model
    judge = build_probe("judge")
    judge.bind(tok)
    text = judge.prompt({"prompt": "Name a colour."}, "Red.", "A dog.")
    assert "<|im_start|>assistant" in text and not text.startswith(tok.bos_token)
    for label, expected in (("A", row["scores"][0]), ("B", row["scores"][1])):
        ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        cont = tok(text + label, add_special_tokens=False)["input_ids"][len(ids) - 1:]
        with torch.no_grad():
            logits = model(torch.tensor([ids + cont])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        direct = sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(cont))
        assert expected == pytest.approx(direct, abs=1e-4)


# ------------------------------------------------------------------ prompts of the toxicity profile

def test_prompt_template_and_nested_field(tmp_path):
    rtp = tmp_path / "rtp.json"  # RealToxicityPrompts' own files: JSON lines under .json, the text nested
    rtp.write_text("".join(json.dumps({"prompt": {"text": t, "toxicity": 0.9}}) + "\n" for t in ("So the", "He said")))
    prompts = read_prompts(PromptsConfig(path=str(rtp), prompt_field="prompt.text",
                                         template="Continue this text: {prompt}"))
    assert [p.prompt for p in prompts] == ["Continue this text: So the", "Continue this text: He said"]
    with pytest.raises(Exception, match="slot"):
        PromptsConfig(path=str(rtp), template="no slot")
    with pytest.raises(InputError, match="no 'prompt.txt' field"):
        read_prompts(PromptsConfig(path=str(rtp), prompt_field="prompt.txt"))
    flat = tmp_path / "flat.json"
    flat.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("a {x}", "b")))
    assert [p.prompt for p in read_prompts(PromptsConfig(path=str(flat), template="[{prompt}]"))] == ["[a {x}]", "[b]"]


# ------------------------------------------------------------------ the study

def _benchmarks(tmp_path: Path) -> dict[str, str]:
    bbq = tmp_path / "bbq.jsonl"
    rows = [_bbq_row(i, "Age", cond, pol, label, AGE, ["old"])
            for i, (cond, pol, label) in enumerate([("ambig", "neg", 2), ("disambig", "neg", 0),
                                                     ("ambig", "nonneg", 2), ("disambig", "nonneg", 1)] * 3)]
    bbq.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mcqa = tmp_path / "mcqa.jsonl"
    mcqa.write_text("".join(json.dumps({"question": f"Question {i}?", "choices": ["yes", "no", "maybe"],
                                        "answer": i % 3}) + "\n" for i in range(10)))
    return {"bbq": str(bbq), "obqa": str(mcqa)}


def _study(tmp_path: Path, **over) -> dict:
    train = write_prompts(tmp_path / "train.jsonl", [f"Tell me about topic number {i}." for i in range(6)])
    held = write_prompts(tmp_path / "held.jsonl", [f"Describe thing {i}." for i in range(4)])
    rtp = tmp_path / "rtp.json"
    rtp.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ("The idiot", "Shut up and", "What a")))
    benchmarks = _benchmarks(tmp_path)
    recipe = {
        "name": "tiny-passive", "seed": 0,
        "prompts": {"path": str(train)}, "eval_prompts": {"path": str(held)},
        "teachers": [
            {"name": "plain", "model": TINY, "k": 2, "batch_size": 6, "sampling": {"temperature": 1.0,
                                                                                  "max_new_tokens": 8}},
            {"name": "rude", "model": "tiny:llama?seed=1", "k": 2, "batch_size": 6, "system_prompt": "Be rude.",
             "sampling": {"temperature": 1.0, "max_new_tokens": 8}}],
        "metrics": ["length", "mtld"],
        "student": TINY,
        "finetune": {"num_train_epochs": 1, "learning_rate": 1e-3, "per_device_train_batch_size": 3},
        "profile": {"sampling": {"temperature": 0.0, "max_new_tokens": 8}, "batch_size": 4,
                    "probes": {"bbq": benchmarks["bbq"], "obqa": {"source": benchmarks["obqa"], "probe": "mcqa"}}},
        "toxicity": {"prompts": str(rtp), "k": 3, "sampling": {"temperature": 1.0, "top_p": 0.9,
                                                               "max_new_tokens": 6}},
        "judge": {"judge": TINY, "pairs": 4},
        "resamples": 200,
    }
    recipe.update(over)
    return recipe


def test_passive_study_end_to_end_and_resume(tmp_path):
    from datasteer.inheritance.passive import passive

    cfg = PassiveConfig(**_study(tmp_path))
    out = tmp_path / "run"
    result = passive(cfg, out, progress=False)
    for stage in ("generate", "score", "select-plain", "select-rude", "finetune-plain", "finetune-rude",
                  "profile-base", "profile-plain", "profile-rude", "profile-base/probes", "toxicity-base",
                  "toxicity-rude", "judge-base", "judge-plain", "versus-plain", "versus-rude"):
        assert json.loads((out / stage / "manifest.json").read_text())["status"] == "complete", stage
    # each student was trained on its own teacher's answers only
    for name in ("plain", "rude"):
        rows = [json.loads(x) for x in (out / f"select-{name}" / "selected.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and {r["source"] for r in rows} == {name}
    dims = result.dimensions
    assert set(dims) == {"plain", "rude"}
    names = [(d.group, d.name) for d in dims["rude"]]
    assert names == [(d.group, d.name) for d in dims["plain"]]
    for wanted in [("text", "length_words"), ("toxicity", "Expected Maximum Toxicity (toxicity_profanity)"),
                   ("bbq", "bias score (disambiguated)"), ("obqa", "ECE (10 bins)"),
                   ("as a judge", "first-position rate"), ("preference", "win rate vs base (judge tiny:llama)")]:
        assert wanted in names, wanted
    for d in dims["rude"]:
        if d.delta is not None and d.low is not None:
            assert d.low <= d.delta + 1e-12 and d.delta <= d.high + 1e-12, d
    # the probes' point deltas are the probe summaries' own differences
    base = json.loads((out / "profile-base" / "probes" / "summary.json").read_text())
    rude = json.loads((out / "profile-rude" / "probes" / "summary.json").read_text())
    acc = next(d for d in dims["rude"] if d.name == "accuracy" and d.group == "obqa")
    assert acc.delta == pytest.approx(rude["obqa"]["accuracy"] - base["obqa"]["accuracy"])
    profile = json.loads((out / "profile-rude" / "profile.json").read_text())
    assert profile["probes"]["bbq"]["items"] == 12
    report = (out / "report.md").read_text()
    assert "| group | dimension | base | plain | rude |" in report and "plots/forest.png" in report
    for plot in ("forest.png", "distributions.png", "toxicity.png"):
        assert (out / "plots" / plot).stat().st_size > 5000
    tox = [json.loads(x) for x in (out / "toxicity-base" / "profile.jsonl").read_text().splitlines()]
    assert len(tox) == 9 and tox[0]["prompt"].startswith("Continue this text: ")
    # rerun: nothing is redone, the same results
    stamp = (out / "finetune-rude" / "model" / "model.safetensors").stat().st_mtime_ns
    again = passive(cfg, out, progress=False)
    assert (out / "finetune-rude" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert [d.to_json() for d in again.dimensions["rude"]] == [d.to_json() for d in dims["rude"]]


def test_identical_models_change_nothing(tmp_path, tiny):
    """The base against itself: every probe delta and interval is exactly 0, so every verdict is 'no change'."""
    from datasteer.inheritance.dimensions import probe_dimensions

    benchmarks = _benchmarks(tmp_path)
    cfg = ProbeConfig(model=TINY, benchmarks={"bbq": benchmarks["bbq"]})
    probe(cfg, tmp_path / "a", progress=False, loaded=tiny)
    dims = probe_dimensions(tmp_path / "a", tmp_path / "a", cfg.benchmarks, 200, 0)
    measured = [d for d in dims if d.base is not None]  # a bias score with no non-unknown answer has no value
    assert len(measured) >= 3 and all(d.delta == 0 and d.low == 0 and d.high == 0 and d.verdict == "no change"
                                      for d in measured)
    assert all(d.verdict == "n/a" for d in dims if d.base is None)


def test_passive_config_errors(tmp_path):
    recipe = _study(tmp_path)
    with pytest.raises(Exception, match="may not be named 'base'"):
        PassiveConfig(**{**recipe, "teachers": [{**recipe["teachers"][0], "name": "base"}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    recipe["profile"]["probes"] = {"bbq": str(bad)}
    from datasteer.inheritance.passive import passive

    with pytest.raises(InputError, match="bad.jsonl"):
        passive(PassiveConfig(**recipe), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_passive_bad_benchmark_and_pairwise(tmp_path):
    import yaml

    recipe = _study(tmp_path)
    recipe["profile"]["probes"] = {"nope": str(tmp_path / "held.jsonl")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("passive", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "nope" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    # pairwise on two profiles of the same prompts
    held = write_prompts(tmp_path / "p.jsonl", [f"Say something about {w}." for w in ("cats", "rain", "tea")])
    for name, model in (("a", TINY), ("b", "tiny:llama?seed=1")):
        proc = run_cli("profile", model, "--prompts", str(held), "--out", str(tmp_path / name), "--metrics", "length",
                       "--max-new-tokens", "6", "--label", name)
        assert proc.returncode == 0, proc.stderr
    proc = run_cli("pairwise", str(tmp_path / "a"), str(tmp_path / "b"), "--judge", TINY, "--out",
                   str(tmp_path / "pw"))
    assert proc.returncode == 0, proc.stderr
    assert "b vs a judged by tiny:llama: win rate" in proc.stdout
    summary = json.loads((tmp_path / "pw" / "summary.json").read_text())
    assert summary["pairs"] == 3 and summary["first"] == "a" and summary["second"] == "b"
    pairs = [json.loads(x) for x in (tmp_path / "pw" / "pairs.jsonl").read_text().splitlines()]
    b_rows = {json.loads(x)["prompt_id"]: json.loads(x) for x in (tmp_path / "b" / "profile.jsonl").read_text()
              .splitlines()}
    assert all(p["response_1"] == b_rows[p["pair_id"]]["completion"] for p in pairs)
    assert "length_words_1" in pairs[0]


def test_profile_config_builds_its_probe_config():
    cfg = ProfileConfig(model=TINY, prompts={"path": "x"}, probes={"bbq": "data/bbq"}, probe_limit=5, seed=3)
    pc = cfg.probe_config()
    assert pc.limit == 5 and pc.seed == 3 and pc.benchmarks["bbq"].source == "data/bbq"
    assert ProfileConfig(model=TINY, prompts={"path": "x"}).probe_config() is None
    with pytest.raises(Exception, match="letters, digits"):
        ProfileConfig(model=TINY, prompts={"path": "x"}, probes={"b b": "x"})
    assert PairwiseConfig().judge == "embedded:smollm2"
