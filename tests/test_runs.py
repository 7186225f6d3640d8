import json

import pytest

from datasteer.errors import RunMismatchError
from datasteer.runs import Run, atomic_write_text, derive_seed, redact_url


def _prepare(path, config=None, inputs=None, seed=0, overwrite=False):
    return Run.prepare(path, stage="generate", config=config or {"a": 1, "b": [1, 2]}, inputs=inputs or {"x": "h"},
                       seed=seed, overwrite=overwrite)


def test_atomic_write_leaves_only_the_file(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "one")
    atomic_write_text(tmp_path / "f.txt", "two")
    assert (tmp_path / "f.txt").read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, "t", "000001") == derive_seed(0, "t", "000001")
    seeds = {derive_seed(s, t, u) for s in range(3) for t in ("a", "b") for u in range(50)}
    assert len(seeds) == 300
    assert all(0 <= s < 2**31 for s in seeds)


def test_nothing_is_written_before_the_first_shard(tmp_path):
    run = _prepare(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not run.has_shard("t", "000000")
    run.write_shard("t", "000000", [{"i": 1}])
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"] == {"a": 1, "b": [1, 2]} and manifest["status"] == "running"
    assert {"python", "torch", "transformers", "datasteer"} <= set(manifest["versions"])
    assert "git_commit" in manifest


def test_shards_are_append_only_and_resumable(tmp_path):
    run = _prepare(tmp_path / "run")
    run.write_shard("t", "000000", [{"i": 1}, {"i": 2}])
    with pytest.raises(RuntimeError, match="append-only"):
        run.write_shard("t", "000000", [{"i": 3}])
    (tmp_path / "run" / "shards" / "t" / "000001.jsonl.tmp-999").write_text('{"half')
    again = _prepare(tmp_path / "run")
    assert again.has_shard("t", "000000") and not again.has_shard("t", "000001")
    assert list(again.iter_shard_rows([("t", "000000")])) == [{"i": 1}, {"i": 2}]
    assert not list((tmp_path / "run").rglob("*.tmp-*")), "stale temporaries are cleaned on resume"


@pytest.mark.parametrize("change, words", [
    (dict(config={"a": 2, "b": [1, 2]}), "different config (config.a: 1 -> 2)"),
    (dict(config={"a": 1, "b": [1, 2, 3]}), "config.b: 2 entries -> 3"),
    (dict(inputs={"x": "other"}), "different inputs"),
    (dict(seed=5), "different seed (seed: 0 -> 5)"),
])
def test_a_different_config_is_refused(tmp_path, change, words):
    _prepare(tmp_path / "run").write_shard("t", "000000", [{"i": 1}])
    with pytest.raises(RunMismatchError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        _prepare(tmp_path / "run", **change)
    assert "--overwrite" in str(err.value)


def test_overwrite_discards_the_old_run_only_when_new_work_lands(tmp_path):
    _prepare(tmp_path / "run").write_shard("t", "000000", [{"i": 1}])
    run = _prepare(tmp_path / "run", config={"a": 2}, overwrite=True)
    assert (tmp_path / "run" / "shards" / "t" / "000000.jsonl").exists()
    assert not run.has_shard("t", "000000")
    run.write_shard("t", "000005", [{"i": 9}])
    assert not (tmp_path / "run" / "shards" / "t" / "000000.jsonl").exists()
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["config"] == {"a": 2}


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(RunMismatchError, match="holds no datasteer run"):
        _prepare(tmp_path / "run")


def test_finish_records_summary(tmp_path):
    run = _prepare(tmp_path / "run")
    run.finish({"rows": 3})
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"] == {"rows": 3}


def test_redact_url():
    assert redact_url("https://user:secret@host/v1") == "https://host/v1"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_a_run_made_before_a_field_existed_resumes_while_the_field_is_at_its_default(tmp_path):
    """A config field added in a later version is no difference at its default, and is one once it is set."""
    from datasteer.inheritance.config import ProfileConfig
    from datasteer.runs import Run

    config = ProfileConfig(model="tiny:llama", prompts={"path": "x"})
    run = Run.prepare(tmp_path / "r", stage="profile", config=config, inputs={}, seed=0)
    run.finish({})
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    for key in ("probes", "probe_limit"):  # as an older datasteer wrote it
        del manifest["config"][key]
    del manifest["config"]["prompts"]["template"]
    (tmp_path / "r" / "manifest.json").write_text(json.dumps(manifest))
    again = Run.prepare(tmp_path / "r", stage="profile", config=config, inputs={}, seed=0)
    assert again.complete
    again.release()
    with pytest.raises(RunMismatchError, match="probe_limit"):
        Run.prepare(tmp_path / "r", stage="profile", config=config.model_copy(update={"probe_limit": 5}), inputs={},
                    seed=0)
