"""The transformers backend and the generate runner, on tiny and embedded models."""

import json

import pytest

from datasteer.generation.config import GenerateConfig
from datasteer.errors import RunMismatchError
from datasteer.generation import generate
from datasteer.generation.transformers_backend import TransformersTeacher
from datasteer.io import Prompt
from tests.conftest import PROMPTS, TINY

ROW_FIELDS = {"prompt_id", "prompt", "completion", "source", "sample_index", "model", "backend", "base_url",
              "system_prompt", "sampling", "prompt_tokens", "completion_tokens", "finish_reason", "seed"}


def _config(prompts_file, teachers, seed=0):
    return GenerateConfig.model_validate({"prompts": {"path": str(prompts_file)}, "teachers": teachers, "seed": seed})


def _tiny(name="tiny", **kw):
    base = {"name": name, "model": TINY, "k": 2, "batch_size": 2, "sampling": {"max_new_tokens": 8}}
    base.update(kw)
    return base


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_rows_have_provenance_and_counts(prompts_file, tmp_path):
    result = generate(_config(prompts_file, [_tiny()]), tmp_path / "run", progress=False)
    rows = _rows(result.candidates_path)
    assert result.rows == len(rows) == len(PROMPTS) * 2
    assert all(set(r) == ROW_FIELDS for r in rows)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(f"p{i:03d}", j) for i in range(5) for j in (0, 1)]
    assert all(r["source"] == "tiny" and r["backend"] == "transformers" for r in rows)
    # A random tiny model practically never samples EOS among ~49k tokens: every row runs to the limit.
    assert all(r["completion_tokens"] == 8 and r["finish_reason"] == "length" for r in rows)
    assert all(r["prompt_tokens"] > 10 for r in rows)  # the chat template wraps the prompt
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"]["rows"] == 10
    assert manifest["inputs"]["prompts"]["rows"] == 5 and len(manifest["inputs"]["prompts"]["sha256"]) == 64


def test_same_seed_same_bytes_other_seed_other_rows(prompts_file, tmp_path):
    a = generate(_config(prompts_file, [_tiny()]), tmp_path / "a", progress=False).candidates_path.read_bytes()
    b = generate(_config(prompts_file, [_tiny()]), tmp_path / "b", progress=False).candidates_path.read_bytes()
    c = generate(_config(prompts_file, [_tiny()], seed=1), tmp_path / "c", progress=False).candidates_path.read_bytes()
    assert a == b
    assert a != c
    texts = [r["completion"] for r in map(json.loads, a.splitlines())]
    assert len(set(texts)) == len(texts), "k samples of one prompt differ"


def test_multi_teacher_run(prompts_file, tmp_path):
    teachers = [
        _tiny("small", k=1),
        _tiny("other", model=TINY + "?seed=7", k=3, system_prompt="Answer in French.",
              sampling={"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 5}),
    ]
    result = generate(_config(prompts_file, teachers), tmp_path / "run", progress=False)
    rows = _rows(result.candidates_path)
    assert result.per_source == {"small": 5, "other": 15}
    assert [r["source"] for r in rows] == ["small"] * 5 + ["other"] * 15
    other = [r for r in rows if r["source"] == "other"]
    assert all(r["system_prompt"] == "Answer in French." and r["completion_tokens"] == 5 for r in other)
    assert other[0]["sampling"] == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 5}
    small = [r for r in rows if r["source"] == "small"]
    # SmolLM2's template writes its own default system prompt when none is given; ours replaces it.
    assert other[0]["prompt_tokens"] != small[0]["prompt_tokens"]


def test_system_prompt_goes_through_the_chat_template(smollm2):
    from datasteer.generation.transformers_backend import encode_prompts

    enc = encode_prompts(smollm2.tokenizer, ["Hi", "A longer prompt here"], "Answer in French.")
    text = smollm2.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=False)
    assert "<|im_start|>system\nAnswer in French.<|im_end|>" in text
    assert text.startswith(smollm2.tokenizer.pad_token), "left padding"
    assert text.endswith("<|im_start|>assistant\n")


def test_resume_does_no_work_twice_and_refuses_changes(prompts_file, tmp_path):
    config = _config(prompts_file, [_tiny()])
    first = generate(config, tmp_path / "run", progress=False)
    before = first.candidates_path.read_bytes()
    again = generate(config, tmp_path / "run", progress=False)
    assert again.generated_rows == 0 and again.candidates_path.read_bytes() == before
    with pytest.raises(RunMismatchError, match=r"teachers\[0\].k: 2 -> 3"):
        generate(_config(prompts_file, [_tiny(k=3)]), tmp_path / "run", progress=False)
    prompts_file.write_text(prompts_file.read_text() + '{"prompt_id": "new", "prompt": "One more?"}\n')
    with pytest.raises(RunMismatchError, match="different inputs"):
        generate(config, tmp_path / "run", progress=False)
    # operational settings (concurrency, device, timeouts, retries) may change between a crash and the resumption
    prompts_file.write_text("\n".join(prompts_file.read_text().splitlines()[:-1]) + "\n")
    assert generate(_config(prompts_file, [_tiny(device="cpu")]), tmp_path / "run",
                    progress=False).generated_rows == 0


def test_greedy_k_samples_are_identical(prompts_file, tmp_path):
    result = generate(_config(prompts_file, [_tiny(k=3, sampling={"temperature": 0, "max_new_tokens": 6})]),
                      tmp_path / "run", progress=False)
    rows = _rows(result.candidates_path)
    for i in range(0, len(rows), 3):
        assert rows[i]["completion"] == rows[i + 1]["completion"] == rows[i + 2]["completion"]


def test_embedded_model_stops_at_eos(smollm2):
    from datasteer.generation.transformers_backend import TransformersTeacherConfig as TeacherConfig

    teacher = TransformersTeacher(TeacherConfig(name="s", model="embedded:smollm2", k=1,
                                                sampling={"temperature": 0, "max_new_tokens": 40}), loaded=smollm2)
    [[c]] = teacher.generate([Prompt("q", "What is the capital of France?")], seed=0)
    assert c.finish_reason == "stop"
    assert "Paris" in c.text and "<|im_end|>" not in c.text
    n_text = len(smollm2.tokenizer(c.text, add_special_tokens=False)["input_ids"])
    assert c.completion_tokens == n_text + 1  # the EOS token counts
    [[short]] = TransformersTeacher(teacher.config.model_copy(update={"sampling": teacher.config.sampling.model_copy(
        update={"max_new_tokens": 3})}), loaded=smollm2).generate([Prompt("q", "What is the capital of France?")],
                                                                   seed=0)
    assert short.finish_reason == "length" and short.completion_tokens == 3


def test_left_padded_batch_matches_one_at_a_time(smollm2):
    """Prompts of different lengths in one batch give the same greedy answers as alone."""
    from datasteer.generation.transformers_backend import TransformersTeacherConfig as TeacherConfig

    teacher = TransformersTeacher(TeacherConfig(name="s", model="embedded:smollm2", k=1,
                                                sampling={"temperature": 0, "max_new_tokens": 12}), loaded=smollm2)
    prompts = [Prompt("a", "Hi."), Prompt("b", "Give me one short tip for writing clear and friendly emails."),
               Prompt("c", "What is 2 + 2?")]
    batched = [c[0].text for c in teacher.generate(prompts, seed=0)]
    alone = [teacher.generate([p], seed=0)[0][0].text for p in prompts]
    assert batched == alone
    assert len({len(smollm2.tokenizer(p.prompt)["input_ids"]) for p in prompts}) == 3
