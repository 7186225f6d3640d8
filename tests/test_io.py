import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasteer.io import PromptsConfig
from datasteer.errors import InputError
from datasteer.io import read_prompts


def _read(path, **kw):
    return read_prompts(PromptsConfig(path=str(path), **kw))


def test_formats_agree(tmp_path):
    rows = [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two, with comma"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "p.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    (tmp_path / "p.csv").write_text('id,prompt\na,one\nb,"two, with comma"\n')
    results = [_read(tmp_path / f"p.{ext}") for ext in ("jsonl", "json", "parquet", "csv")]
    assert all(r == results[0] for r in results)
    assert [(p.prompt_id, p.prompt) for p in results[0]] == [("a", "one"), ("b", "two, with comma")]


def test_row_numbers_are_ids_when_no_id_column(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"question": "x"}\n{"question": "y"}\n{"question": "z"}\n')
    prompts = _read(tmp_path / "p.jsonl", prompt_field="question", limit=2)
    assert [(p.prompt_id, p.prompt) for p in prompts] == [("0", "x"), ("1", "y")]


@pytest.mark.parametrize("name, content, words", [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "broken\n', r"p.jsonl:2: not valid JSON"),
    ("p.jsonl", '{"prompt": "ok"}\n[1, 2]\n', r"p.jsonl:2: each line must be a JSON object"),
    ("p.jsonl", "", "the prompt set is empty"),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "   "}\n', "row 2: the prompt is empty"),
    ("p.jsonl", '{"text": "ok"}\n', "has no 'prompt' field"),
    ("p.jsonl", '{"prompt": 3}\n', "must be text"),
    ("p.jsonl", '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate prompt id '1'"),
    ("p.csv", "prompt,other\nfine,1\ntoo,many,fields\n", r"p.csv:3: wrong number of fields"),
    ("p.txt", "hello\n", "unsupported file type"),
    ("p.parquet", "not parquet", "not a readable Parquet file"),
])
def test_bad_input_is_one_clear_line(tmp_path, name, content, words):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=words) as err:
        _read(tmp_path / name)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        _read(tmp_path / "absent.jsonl")


def test_unknown_dataset_name_offline():
    with pytest.raises(InputError, match="could not load dataset 'no-such/dataset'"):
        read_prompts(PromptsConfig(path="hf:no-such/dataset"))


def test_local_dataset_through_datasets(tmp_path):
    """hf: names go through datasets.load_dataset, which also takes a local data directory."""
    data = tmp_path / "ds"
    data.mkdir()
    (data / "train.jsonl").write_text('{"prompt": "from datasets"}\n')
    prompts = read_prompts(PromptsConfig(path=f"hf:{data}"))
    assert [p.prompt for p in prompts] == ["from datasets"]


def test_prompts_cut_to_max_chars_and_hub_subset_and_slice(tmp_path, monkeypatch):
    """Long articles as prompts are cut at a word boundary before the template; a hub prompt set takes its config
    name and, with a limit, only its first rows."""
    import datasets

    from datasteer.io import PromptsConfig, cut_text, read_prompts

    assert cut_text("one two three", 9) == "one two" and cut_text("abcdefgh", 4) == "abcd"
    assert cut_text("short", 10) == "short" and cut_text("x", None) == "x"
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"prompt": "alpha beta gamma delta"}) + "\n")
    got = read_prompts(PromptsConfig(path=str(path), max_chars=12, template="Rephrase this article.\n\n{prompt}"))
    assert got[0].prompt == "Rephrase this article.\n\nalpha beta"
    seen = {}

    def fake_load(name, subset=None, split=None):
        seen.update(name=name, subset=subset, split=split)
        return [{"text": f"article {i}"} for i in range(3)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    got = read_prompts(PromptsConfig(path="hf:wikimedia/wikipedia", subset="20231101.en", prompt_field="text",
                                     limit=3))
    assert seen == {"name": "wikimedia/wikipedia", "subset": "20231101.en", "split": "train[:3]"}
    assert [p.prompt for p in got] == ["article 0", "article 1", "article 2"]
