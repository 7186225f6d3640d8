"""Fine-tuning, profiling, comparison and the whole `inherit` pipeline on tiny models (real TRL, real files)."""

import json
import math

import pytest
import torch

from datasteer.inheritance.config import FinetuneConfig, InheritConfig, ProfileConfig
from datasteer.dpg.config import DPGConfig
from datasteer.errors import InputError
from datasteer.inheritance.compare import compare, paired_difference
from datasteer.inheritance.finetune import (
    finetune,
    restrict_to_last_layers,
    tokenize_rows,
)
from datasteer.inheritance.profile import load_profile, profile
from datasteer.models import load_model, load_tokenizer
from tests.conftest import TINY, write_prompts
from tests.test_cli import _assert_user_error, run_cli

ROWS = [
    {"prompt_id": "a", "prompt": "Say hi.", "completion": "Hi there, friend!", "finish_reason": "stop"},
    {"prompt_id": "b", "prompt": "Count to three.", "completion": "One, two, three.", "finish_reason": "stop"},
    {"prompt_id": "c", "prompt": "Name a fruit.", "completion": "An apple is a fruit that", "finish_reason": "length"},
    {"prompt_id": "d", "prompt": "Name a colour.", "completion": "Blue.", "finish_reason": "stop"},
]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tokenize_masks_the_prompt_and_ends_only_finished_completions():
    tok = load_tokenizer(TINY)
    examples, counts = tokenize_rows(ROWS, tok, FinetuneConfig(input="x"))
    eos = tok.eos_token_id
    for row, ex in zip(ROWS, examples):
        n_prompt = sum(1 for label in ex["labels"] if label == -100)
        prompt_text = tok.decode(ex["input_ids"][:n_prompt])
        assert row["prompt"] in prompt_text and "assistant" in prompt_text  # the chat template, as at generation
        trained = ex["labels"][n_prompt:]
        assert trained == ex["input_ids"][n_prompt:]
        assert (trained[-1] == eos) is (row["finish_reason"] == "stop")
        assert tok.decode([t for t in trained if t != eos]) == row["completion"]
    assert counts["cut_at_generation"] == 1 and counts["rows"] == 4
    # max_length cuts the completion (and with it the end-of-turn token)
    tight = FinetuneConfig(input="x", max_length=len(examples[0]["input_ids"]) - 2)
    short, counts = tokenize_rows(ROWS[:1], tok, tight)
    assert short[0]["labels"][-1] != eos and counts["cut_at_max_length"] == 1
    with pytest.raises(InputError, match="no row fits"):
        tokenize_rows(ROWS[:1], tok, FinetuneConfig(input="x", max_length=8))
    with pytest.raises(InputError, match="row 1 has no 'completion'"):
        tokenize_rows([{"prompt": "p"}], tok, FinetuneConfig(input="x"))


def test_restrict_to_last_layers_freezes_the_rest():
    model = load_model("tiny:llama?layers=4").model
    assert restrict_to_last_layers(model, 1) == [3]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layers.3.") or n == "model.norm.weight" for n in trainable)
    assert "model.norm.weight" in trainable and "model.embed_tokens.weight" not in trainable


@pytest.mark.parametrize("method", ["full", "lora"])
def test_finetune_lowers_the_loss_and_saves_a_loadable_model(tmp_path, method):
    data = write_rows(tmp_path / "sel.jsonl", ROWS * 2)
    lora = {"lora": {"r": 4}, "train_layers": 1} if method == "lora" else {}
    cfg = FinetuneConfig(input=str(data), model=TINY, method=method, num_train_epochs=3, learning_rate=3e-3,
                         per_device_train_batch_size=4, **lora)
    result = finetune(cfg, tmp_path / "ft", progress=False)
    assert result.steps == 6 and result.examples == 8
    losses = [e["loss"] for e in result.log]
    assert losses[-1] < losses[0], losses
    assert (result.model_dir / ".complete").is_file() and not (tmp_path / "ft" / "checkpoints").exists()
    # the saved model differs from the base and loads by path with its tokenizer (LoRA merged)
    trained = load_model(str(result.model_dir))
    base = load_model(TINY)
    assert not any("lora" in n for n, _ in trained.model.named_parameters())
    diff = sum(float((a - b).abs().sum()) for (_, a), (_, b) in zip(trained.model.state_dict().items(),
                                                                  base.model.state_dict().items()))
    assert diff > 0
    if method == "lora":  # only layer 1 (the last of 2) got adapters: layer 0 is untouched
        sd_t, sd_b = trained.model.state_dict(), base.model.state_dict()
        q0 = "model.layers.0.self_attn.q_proj.weight"
        assert torch.equal(sd_t[q0], sd_b[q0])
        assert not torch.equal(sd_t["model.layers.1.self_attn.q_proj.weight"],
                               sd_b["model.layers.1.self_attn.q_proj.weight"])
    info = json.loads((tmp_path / "ft" / "training.json").read_text())
    assert info["cut_at_generation"] == 2 and len(info["log"]) == 6
    again = finetune(cfg, tmp_path / "ft", progress=False)  # a finished run is not redone
    assert again.resumed_from == "complete" and again.steps == 6


def test_finetune_resume_mid_training_matches_uninterrupted(tmp_path):
    data = write_rows(tmp_path / "sel.jsonl", ROWS * 2)
    cfg = FinetuneConfig(input=str(data), model=TINY, num_train_epochs=2, learning_rate=1e-3,
                         per_device_train_batch_size=4, save_steps=2, keep_checkpoints=True)
    full = finetune(cfg, tmp_path / "full", progress=False)
    # the same run, killed in step 3, after its step-2 checkpoint was written
    part = tmp_path / "part"
    import datasteer.inheritance.finetune as ft

    class Stop(Exception):
        pass

    original = ft.progress_callback

    def killing_callback(tracker, label):
        cb = original(tracker, label)
        inner = cb.on_step_end

        def on_step_end(args, state, control, **kw):
            inner(args, state, control, **kw)
            if state.global_step == 3:  # after the step-2 checkpoint was written
                raise Stop()

        cb.on_step_end = on_step_end
        return cb

    ft.progress_callback = killing_callback
    try:
        with pytest.raises(Stop):
            finetune(cfg, part, progress=False)
    finally:
        ft.progress_callback = original
    assert (part / "checkpoints" / "checkpoint-2").is_dir() and not (part / "model").exists()
    resumed = finetune(cfg, part, progress=False)
    assert resumed.resumed_from == "checkpoint-2"
    a = load_model(str(full.model_dir)).model.state_dict()
    b = load_model(str(resumed.model_dir)).model.state_dict()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst


def test_profile_and_compare(tmp_path):
    prompts = write_prompts(tmp_path / "eval.jsonl", ["Say hi.", "Name a fruit.", "Count to three.", "Why?"])
    cfg = ProfileConfig(model=TINY, prompts={"path": str(prompts)}, label="base",
                        metrics=["length", "mtld"], sampling={"temperature": 0.0, "max_new_tokens": 12})
    # (a tiny random model writes sub-word noise: few whitespace words, but tokens)
    base = profile(cfg, tmp_path / "p-base", progress=False)
    assert base.label == "base" and len(base.rows) == 4 and base.summary["k"] == 1
    assert {"length_words", "mtld"} <= set(base.metrics)
    assert base.summary["sampling"]["temperature"] == 0.0
    m = base.metrics["length_words"]
    assert m["count"] == 4 and {"mean", "std", "p5", "p50", "p95"} <= set(m)
    # greedy: a second profile of the same model is identical; another model differs
    same = profile(cfg.model_copy(update={"label": "again"}), tmp_path / "p-again", progress=False)
    assert [r["completion"] for r in same.rows] == [r["completion"] for r in base.rows]
    other = profile(cfg.model_copy(update={"model": "tiny:llama?seed=3", "label": "other"}), tmp_path / "p-other",
                    progress=False)
    result = compare([load_profile(tmp_path / "p-base"), same, other])
    row = result.row("length_tokens")
    assert row.means[0] > 0 and row.delta_pct[0] == 0.0 and row.delta_pct[1] == 0.0
    assert row.paired[1].mean == 0.0 and not row.paired[1].significant
    assert "| length_tokens" in result.to_markdown()
    # sampling mode with k samples per prompt
    tox = ProfileConfig(model=TINY, prompts={"path": str(prompts)}, metrics=["length"], toxicity=True, k=3,
                        sampling={"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 6})
    pytest.importorskip("profanity_check")
    t = profile(tox, tmp_path / "p-tox", progress=False)
    assert len(t.rows) == 12 and t.summary["k"] == 3
    emt = t.metrics["toxicity_profanity"]["toxicity"]
    assert emt["prompts"] == 4 and 0.0 <= emt["expected_maximum_toxicity"] <= 1.0


def test_paired_difference_against_a_hand_computation():
    a = {"p1": 1.0, "p2": 2.0, "p3": 4.0}
    b = {"p1": 2.0, "p2": 2.5, "p3": 7.0, "extra": 100.0}
    d = paired_difference(a, b)
    diffs = [1.0, 0.5, 3.0]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 2)
    assert d.n == 3 and d.mean == pytest.approx(mean)
    assert d.high - d.mean == pytest.approx(1.959963984540054 * sd / math.sqrt(3))
    assert paired_difference({"p": 1.0}, {"p": 2.0}) is None


def test_profile_config_rules():
    with pytest.raises(Exception, match="repeat one answer"):
        ProfileConfig(model=TINY, prompts={"path": "x"}, k=3)
    tox = ProfileConfig(model=TINY, prompts={"path": "x"}, toxicity=True)
    assert tox.k == 25 and tox.sampling.temperature == 1.0 and tox.sampling.top_p == 0.9
    assert "toxicity" in tox.metrics
    assert ProfileConfig(model="runs/x/finetune-active/model", prompts={"path": "x"}).name == "finetune-active"


def tiny_recipe(tmp_path, **over):
    train = write_prompts(tmp_path / "train.jsonl", [f"Tell me about topic number {i}." for i in range(6)])
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt_id": f"h{i}", "prompt": f"Describe thing {i}."}) + "\n"
                            for i in range(4)))
    recipe = {
        "name": "tiny", "seed": 0,
        "prompts": {"path": str(train)}, "eval_prompts": {"path": str(held)},
        "teachers": [{"name": "t", "model": TINY, "k": 3, "batch_size": 6,
                      "sampling": {"temperature": 1.0, "max_new_tokens": 10}}],
        "metrics": ["length", "mtld"],
        "selection": {"objectives": ["length_words:max"]},
        "student": TINY,
        "finetune": {"num_train_epochs": 2, "learning_rate": 1e-3, "per_device_train_batch_size": 3},
        "profile": {"sampling": {"temperature": 0.0, "max_new_tokens": 10}, "batch_size": 4},
    }
    recipe.update(over)
    return recipe


def test_inherit_pipeline_end_to_end_and_resume(tmp_path):
    from datasteer.inheritance.pipeline import inherit

    mcqa = tmp_path / "mcqa.jsonl"  # the profiles' likelihood probes ride along (profile.probes)
    mcqa.write_text("".join(json.dumps({"question": f"Question {i}?", "choices": ["yes", "no"], "answer": i % 2})
                            + "\n" for i in range(8)))
    recipe = tiny_recipe(tmp_path)
    recipe["profile"]["probes"] = {"quiz": {"source": str(mcqa), "probe": "mcqa"}}
    cfg = InheritConfig(**recipe)
    result = inherit(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    for stage in ("generate", "score", "select-active", "select-random", "finetune-active", "finetune-random",
                  "profile-base", "profile-random", "profile-active"):
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
    assert result.comparison.labels == ["base", "random", "active"]
    report = (out / "report.md").read_text()
    for plot in ("distributions.png", "objectives.png", "selection-length_words.png", "training_loss.png"):
        assert (out / "plots" / plot).stat().st_size > 5000 and f"plots/{plot}" in report
    assert "## Headline" in report and "length_words (max): base" in report
    assert "## Likelihood probes" in report and "| quiz | accuracy |" in report
    assert json.loads((out / "profile-active" / "profile.json").read_text())["probes"]["quiz"]["items"] == 8
    results = json.loads((out / "results.json").read_text())
    assert set(results["comparison"]["labels"]) == {"base", "random", "active"}
    active = [json.loads(line) for line in (out / "select-active" / "selected.jsonl").read_text().splitlines()]
    assert len(active) == 6 and all(r["selection"]["objective"] == "length_words:max" for r in active)
    # rerun: everything resumes, nothing is redone
    stamp = (out / "finetune-active" / "model" / "model.safetensors").stat().st_mtime_ns
    again = inherit(cfg, out, progress=False)
    assert (out / "finetune-active" / "model" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.comparison.to_json() == result.comparison.to_json()
    assert again.seconds["generate"] < result.seconds["generate"]


def test_inherit_refuses_held_out_prompts_seen_in_training(tmp_path):
    from datasteer.inheritance.pipeline import inherit

    recipe = tiny_recipe(tmp_path)
    recipe["eval_prompts"] = recipe["prompts"]
    with pytest.raises(InputError, match="also appear in the training prompts"):
        inherit(InheritConfig(**recipe), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_inherit_errors_and_set(tmp_path):
    import yaml

    recipe = tiny_recipe(tmp_path)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**recipe, "selection": {"objectives": ["mtdl:max"]}}))
    out = tmp_path / "out"
    # an objective naming a metric that was not scored fails before any model loads
    proc = run_cli("inherit", str(path), "--out", str(out), "--set", "teachers.0.k=2")
    assert proc.returncode == 2 and "mtdl" in proc.stderr
    _assert_user_error(run_cli("inherit", str(path), "--out", str(out), "--set", "nonsense"), "--set expects KEY=VALUE",
                       out)
    _assert_user_error(run_cli("inherit", str(path), "--out", str(out), "--set", "finetune.num_train_epochs=-1"),
                       "finetune", out)


def test_cli_finetune_and_profile_errors(tmp_path):
    out = tmp_path / "out"
    _assert_user_error(run_cli("finetune", str(tmp_path / "none.jsonl"), "--out", str(out)), "file not found", out)
    bad = write_rows(tmp_path / "bad.jsonl", [{"prompt": "p", "text": "no completion column"}])
    _assert_user_error(run_cli("finetune", str(bad), "--out", str(out), "--model", TINY), "no 'completion' field",
                       out)
    prompts = write_prompts(tmp_path / "p.jsonl", ["Hi?"])
    _assert_user_error(run_cli("profile", "tiny:nope", "--prompts", str(prompts), "--out", str(out)),
                       "unknown tiny architecture", out)
    _assert_user_error(run_cli("profile", TINY, "--prompts", str(prompts), "--out", str(out), "--metrics", "nope"),
                       "nope", out)
    _assert_user_error(run_cli("compare", str(tmp_path)), "not a finished profile")


def test_every_shipped_recipe_validates_and_prompt_sets_are_disjoint():
    from datasteer.config import build
    from datasteer.generation.config import GenerateConfig
    from datasteer.recipes import load_recipe
    from datasteer.io import builtin_prompt_sets, read_rows
    from datasteer.recipes import RECIPES_DIR, recipe_path

    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert {"demo-inherit", "mtld-max", "length-max", "toxicity-min", "multi-source"} <= set(names)
    assert any(n.startswith("gpu-paper") for n in names)
    assert {"demo-dpg-67", "demo-dpg-l2", "demo-dpg-uuid", "gpu-paper-67", "gpu-paper-qr"} <= set(names)
    from datasteer.inheritance.config import PassiveConfig, ProfileConfig
    from datasteer.recipes import command_of

    models = {"dpg": DPGConfig, "generate": GenerateConfig, "inherit": InheritConfig, "passive": PassiveConfig,
              "profile": ProfileConfig}
    for name in names:
        data = load_recipe(recipe_path(name))
        kind = models[command_of(data)]
        # a profile recipe leaves the model to the command line
        build(kind, {**data, "model": "embedded:smollm2"} if kind is ProfileConfig else data, name)
        assert load_recipe(name) == data  # a bare name finds the built-in recipe
    with pytest.raises(InputError, match="built-in name: .*demo-inherit"):
        load_recipe("no-such-recipe")
    sets = builtin_prompt_sets()
    train = [r["prompt"] for r in read_rows(sets["instructions-train"])]
    held = [r["prompt"] for r in read_rows(sets["instructions-heldout"])]
    assert len(set(train)) == len(train) >= 200 and len(set(held)) == len(held) >= 100
    assert not set(train) & set(held)
    seeds, probes = (set(r["prompt"] for r in read_rows(sets[n])) for n in ("seeds-train", "seeds-heldout"))
    assert len(seeds) == 256 and len(probes) == 64 and not seeds & probes


@pytest.mark.parametrize("where, spec, words", [
    ("student", "./no-such-dir/model", "model directory not found"),
    ("teacher", "tiny:nope", "unknown tiny architecture"),
    ("teacher", "no-such-org/no-such-model", "could not load model"),  # fails only when generation loads it
])
def test_cli_inherit_bad_model_leaves_nothing(tmp_path, where, spec, words):
    import yaml

    recipe = tiny_recipe(tmp_path)
    if where == "student":
        recipe["student"] = spec
    else:
        recipe["teachers"][0]["model"] = spec
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    _assert_user_error(run_cli("inherit", str(path), "--out", str(out), "-q"), words, out)
