"""Launchers handled everywhere: a stage built for one process, started by torchrun as 2 processes, stops on
every rank with a one-line error (exit status 2) before writing anything; and the launcher facts are read once."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from datasteer import distributed
from datasteer.errors import ConfigError
from tests.conftest import cli_env, two_processes

ROOT = Path(__file__).resolve().parents[1]


def test_a_one_process_stage_under_torchrun_refuses_on_every_rank(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt_id": "1", "completion": "a b c"}) + "\n")
    proc = subprocess.run(two_processes("torchrun", "datasteer", "score", str(rows), "--metrics", "length_words",
                                        "--out", str(tmp_path / "out")),
                          cwd=ROOT, env=cli_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("datasteer: error: ")]
    assert len(errors) == 2, proc.stderr[-2000:]  # one line from each rank, rank 0 included
    assert all("`score` runs in one process" in line for line in errors)
    assert {"rank 0 of 2" in line for line in errors} == {True, False}
    assert "exitcode  : 2" in proc.stderr  # torchrun reports the ranks' exit status 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("env, launched, main", [
    ({}, False, True),
    ({"RANK": "0", "WORLD_SIZE": "2"}, True, True),
    ({"RANK": "1", "WORLD_SIZE": "2"}, True, False),
    ({"LOCAL_RANK": "1"}, True, False),
    ({"WORLD_SIZE": "1", "RANK": "0"}, False, True),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, True, False),  # an MPI launch
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, True, True),
])
def test_launcher_facts_from_the_environment(monkeypatch, env, launched, main):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
                 "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched() is launched
    assert distributed.is_main_process() is main


def test_rank_zero_of_a_launch_refuses_a_one_process_stage_in_process(tmp_path, monkeypatch):
    from datasteer.metrics.config import ScoreConfig
    from datasteer.metrics.runner import score

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt_id": "1", "completion": "a b c"}) + "\n")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="rank 0 of 2"):
        score(ScoreConfig(input=str(rows), metrics=["length_words"]), tmp_path / "s", progress=False)
    assert not (tmp_path / "s").exists()


def test_shards_cover_the_range_once():
    for n in range(0, 12):
        for parts in (1, 2, 3, 5):
            pieces = [list(distributed.shard(n, parts, i)) for i in range(parts)]
            assert sum(pieces, []) == list(range(n))
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1
