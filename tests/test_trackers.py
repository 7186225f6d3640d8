"""Trackers, offline: `report_to` of fine-tuning and of DPG (`grpo.trl.report_to`) writes TensorBoard event files
(read back with TensorBoard's own EventAccumulator) and an offline wandb run (its records read back), with DPG's
Phi, readout and validation logged through the trainer's logger at their steps beside TRL's own metrics."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from datasteer.config import build
from datasteer.dpg.config import DPGConfig
from datasteer.dpg.records import tracker_scalars
from datasteer.dpg.trainer import dpg, read_jsonl
from datasteer.errors import ConfigError, MissingDependencyError
from datasteer.inheritance.config import FinetuneConfig
from datasteer.inheritance.finetune import check_finetune, finetune
from tests.conftest import TINY
from tests.test_dpg_trainer import recipe as dpg_recipe
from tests.test_inheritance import ROWS, write_rows

pytest.importorskip("tensorboard")


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every TensorBoard event file under `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    out: dict[str, list[tuple[int, float]]] = {}
    for file in files:
        events = EventAccumulator(str(file), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in events.Scalars(tag))
    return out


def wandb_history(folder: Path) -> list[dict]:
    """The history records of the offline wandb run under `folder`: its .wandb file is a LevelDB-style log of
    protobuf records (7-byte file header, 32 KiB blocks, chunks of FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.rglob("run-*.wandb")
    data, block, pos = path.read_bytes(), 32768, 7
    records, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # block padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    history = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return history


def test_finetune_reports_to_tensorboard_in_the_run_directory(tmp_path):
    data = write_rows(tmp_path / "sel.jsonl", ROWS * 2)
    cfg = FinetuneConfig(input=str(data), model=TINY, num_train_epochs=2, learning_rate=3e-3,
                         per_device_train_batch_size=4, report_to=["tensorboard"])
    result = finetune(cfg, tmp_path / "ft", progress=False)
    # the events stay in the run (checkpoints/, the Trainer's output_dir, is gone)
    assert not (tmp_path / "ft" / "checkpoints").exists()
    seen = scalars(tmp_path / "ft" / "tensorboard")
    losses = [e["loss"] for e in result.log]
    assert [step for step, _ in seen["train/loss"]] == [1, 2, 3, 4]
    assert [value for _, value in seen["train/loss"]] == pytest.approx(losses, rel=1e-6)
    assert "train/learning_rate" in seen and "train/grad_norm" in seen


def test_finetune_reports_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = write_rows(tmp_path / "sel.jsonl", ROWS * 2)
    cfg = FinetuneConfig(input=str(data), model=TINY, num_train_epochs=1, learning_rate=3e-3,
                         per_device_train_batch_size=4, report_to="wandb")
    result = finetune(cfg, tmp_path / "ft", progress=False)
    history = [h for h in wandb_history(tmp_path / "wandb") if "train/loss" in h]
    assert [h["train/global_step"] for h in history] == [1, 2]
    assert [h["train/loss"] for h in history] == pytest.approx([e["loss"] for e in result.log], rel=1e-6)


def test_unknown_or_missing_trackers_fail_before_a_model_loads(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbored'"):
        check_finetune(FinetuneConfig(input="x", report_to=["tensorbored"]))
    with pytest.raises(ConfigError, match="'all' and 'none' stand alone"):
        check_finetune(FinetuneConfig(input="x", report_to=["all", "wandb"]))
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"the mlflow tracker \(package 'mlflow'\) needs an optional"):
        check_finetune(FinetuneConfig(input="x", report_to=["mlflow"]))
    bad = build(DPGConfig, dpg_recipe(tmp_path, grpo={"max_steps": 2, "prompts_per_step": 2, "num_generations": 4,
                                                      "trl": {"report_to": ["tensorbored"]}}))
    with pytest.raises(ConfigError, match="grpo.trl.report_to: unknown tracker"):
        dpg(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_tracker_scalars_flatten_a_metrics_row():
    row = {"step": 3, "examples_seen": 24, "rollouts": 8, "reward": {"mean": 1e-9, "std": 2e-9},
           "phi": -0.5, "readout": {"pixel_accuracy": 0.25}, "sample": "abc", "flag": True, "missing": None,
           "validation": {"rollouts": 12, "phi": -0.4, "pixel_accuracy": 0.5, "sample": "x"}}
    assert tracker_scalars(row) == {
        "dpg/examples_seen": 24.0, "dpg/rollouts": 8.0, "dpg/reward/mean": 1e-9, "dpg/reward/std": 2e-9,
        "dpg/phi": -0.5, "dpg/readout/pixel_accuracy": 0.25, "dpg/validation/rollouts": 12.0,
        "dpg/validation/phi": -0.4, "dpg/validation/pixel_accuracy": 0.5}


def test_dpg_logs_phi_readout_and_validation_through_the_trainer(tmp_path):
    config = build(DPGConfig, dpg_recipe(tmp_path, grpo={
        "max_steps": 4, "prompts_per_step": 2, "num_generations": 4, "max_completion_length": 8,
        "learning_rate": 1e-2, "trl": {"report_to": ["tensorboard"]}}))
    dpg(config, tmp_path / "run", progress=False)
    rows = read_jsonl(tmp_path / "run" / "dpg" / "metrics.jsonl")
    seen = scalars(tmp_path / "run" / "dpg" / "tensorboard")
    # every step's own target: Phi and the readout, at the step of its row in metrics.jsonl
    assert seen["train/dpg/phi"] == [(r["step"], pytest.approx(r["phi"], rel=1e-5)) for r in rows[1:]]
    for key in rows[1]["readout"]:
        assert [s for s, _ in seen[f"train/dpg/readout/{key}"]] == [1, 2, 3, 4]
    assert [v for _, v in seen["train/dpg/reward/mean"]] == pytest.approx([r["reward"]["mean"] for r in rows[1:]],
                                                                        rel=1e-5, abs=1e-12)
    # validation where it ran (steps 0, 2, 4), the untrained target at step 0
    validated = [r for r in rows if "validation" in r]
    assert seen["train/dpg/validation/pixel_accuracy"] == [
        (r["step"], pytest.approx(r["validation"]["pixel_accuracy"], rel=1e-5)) for r in validated]
    assert [s for s, _ in seen["train/dpg/validation/pixel_accuracy"]] == [0, 2, 4]
    assert any(tag.startswith("train/dpg/untrained/") for tag in seen)
    # and TRL's own metrics, every step (report_to turns on logging_steps=1)
    assert [s for s, _ in seen.get("train/loss", [])] == [1, 2, 3, 4], " ".join(sorted(seen))
    assert [s for s, _ in seen["train/reward"]] == [1, 2, 3, 4]
