"""`datasteer finetune` under torchrun and `accelerate launch`, for real: two processes on this CPU (gloo, DDP).

What must hold (docs/scaling.md):
- two processes train as one process does with the same global batch (DDP averages the gradients; the Trainer
  counts the loss's tokens over both processes), to float32 rounding;
- only the main process writes (each process's file-system calls are recorded through a Python audit hook: the
  other rank only creates the checkpoint folder it puts its RNG state in, as the Trainer does);
- a launch killed with SIGKILL after a checkpoint, started again, ends bit-identical to an uninterrupted one;
  a checkpoint of 2 processes is not resumed by 1 (that would change the global batch);
- the example accelerate configs load with accelerate's own parser.

The launches take ~15-25 s each on 2 cores (start-up of two Python processes dominates).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from datasteer.errors import RunMismatchError
from datasteer.inheritance.config import FinetuneConfig
from datasteer.inheritance.finetune import finetune, model_from_saved, save_model, sft_arguments, steps_per_epoch
from datasteer.models import load_model, load_tokenizer
from datasteer.training import checkpoint_world_size, latest_checkpoint
from tests.conftest import TINY, cli_env, free_port
from tests.conftest import two_processes as two_process_command

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "accelerate"
BASE_ROWS = [
    {"prompt": "Say hi.", "completion": "Hi there, friend!", "finish_reason": "stop"},
    {"prompt": "Count to three.", "completion": "One, two, three.", "finish_reason": "stop"},
    {"prompt": "Name a fruit.", "completion": "An apple is a fruit that", "finish_reason": "length"},
    {"prompt": "Name a colour.", "completion": "Blue.", "finish_reason": "stop"},
]
# 32 steps of a global batch of 2 (1 per process), a checkpoint every 3: long enough to kill after the first one
LONG = dict(num_train_epochs=2, learning_rate=1e-3, save_steps=3, trl={"gradient_checkpointing": True},
            device="cpu")
LONG_FLAGS = ["--epochs", "2", "--lr", "1e-3", "--set", "save_steps=3", "--set", "trl.gradient_checkpointing=true",
              "--set", "device=cpu", "--model", TINY, "-q"]

# Every process of a launch records its file-system writes under the run directory (Python's audit hook: open for
# writing, mkdir, rename, remove, rmtree; native writers such as safetensors' are seen through the renames that
# publish them).
AUDIT_HOOK = '''
import json, os, sys
_dir, _root = os.environ.get("FS_AUDIT_DIR"), os.environ.get("FS_AUDIT_ROOT")
if _dir and _root:
    _log = open(os.path.join(_dir, f"{os.getpid()}.jsonl"), "a", buffering=1)
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _events = {"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}

    def _hook(event, args):
        if event not in _events or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        path = os.path.abspath(os.fsdecode(args[0]))
        if not (path + os.sep).startswith(_root + os.sep):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            if not ((mode and any(c in mode for c in "wax+")) or (mode is None and flags & _writes)):
                return
        _log.write(json.dumps({"rank": os.environ.get("RANK"), "event": event, "path": path}) + "\\n")

    sys.addaudithook(_hook)
'''


def write_rows(path: Path, copies: int) -> Path:
    rows = [{**r, "prompt": f"{r['prompt']} (#{i})"} for i, r in enumerate(BASE_ROWS * copies)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def launcher(kind: str) -> list[str]:
    """`datasteer finetune` on two processes (see `two_processes`; `accelerate launch --cpu --num_processes 2`
    starts ONE: test_accelerate_cpu_flag_trains_in_one_process_and_says_so)."""
    return two_process_command(kind, "datasteer", "finetune")


def launch_env(audit: Path | None = None, out: Path | None = None) -> dict[str, str]:
    env = cli_env(OMP_NUM_THREADS="1")
    if audit is not None:
        site = audit / "site"
        site.mkdir(parents=True)
        (site / "sitecustomize.py").write_text(AUDIT_HOOK)
        env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
                   FS_AUDIT_DIR=str(audit), FS_AUDIT_ROOT=str(out.resolve()))
    return env


def run_launch(cmd: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def audit_events(audit: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(audit.glob("*.jsonl")) for line in f.read_text().splitlines()]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_model(str(run / "model")).model.state_dict()


def assert_single_writer(out: Path, audit: Path) -> None:
    """Every write under the run came from rank 0, except the checkpoint folders the other rank creates for its RNG
    state (Trainer._save_rng_state); the model, training.json and the manifest were each published by one
    rename."""
    events = audit_events(audit)
    assert events, "the audit hook recorded nothing"
    others = [e for e in events if e["rank"] != "0"]
    assert all(e["event"] == "os.mkdir" and re.fullmatch(r"checkpoint-\d+", Path(e["path"]).name)
               and Path(e["path"]).parent == out.resolve() / "checkpoints" for e in others), others
    renames = [Path(e["path"]).name for e in events if e["event"] == "os.rename"]
    assert sum(n.startswith("model.tmp-") for n in renames) == 1, renames
    assert sum(n.startswith("training.json.tmp-") for n in renames) == 1, renames
    assert sum(n.startswith("manifest.json.tmp-") for n in renames) == 2, renames  # created, then finished


def test_example_accelerate_configs_parse():
    """Each file loads with accelerate's config loader and goes through `accelerate launch`'s own validation;
    every fsdp_/deepspeed key is one accelerate knows (unknown ones would be ignored silently); each header
    names the command to run it with."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DistributedType
    from accelerate.utils.launch import prepare_multi_gpu_env

    expected = {"1-gpu.yaml": (DistributedType.NO, 1, 1), "8-gpu-ddp.yaml": (DistributedType.MULTI_GPU, 8, 1),
                "8-gpu-fsdp2.yaml": (DistributedType.FSDP, 8, 1), "zero3.yaml": (DistributedType.DEEPSPEED, 8, 1),
                "2-nodes-16-gpu.yaml": (DistributedType.MULTI_GPU, 16, 2)}
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(expected)
    parser = launch_command_parser()
    options = {action.dest for action in parser._actions}
    for name, (kind, processes, machines) in expected.items():
        path = EXAMPLES / name
        config = load_config_from_file(str(path))
        assert (config.distributed_type, config.num_processes, config.num_machines) == (kind, processes, machines)
        assert config.mixed_precision == "bf16"
        for key in config.fsdp_config:
            assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in options, (name, key)
        for key in config.deepspeed_config:
            assert key in options, (name, key)
        header = path.read_text().split("\ncompute_environment")[0]
        assert f"accelerate launch --config_file examples/accelerate/{name}" in header
        assert "-m datasteer finetune" in header
        args, _, _ = _validate_launch_command(parser.parse_args(["--config_file", str(path), "-m", "datasteer"]))
        assert args.num_processes == processes
    fsdp = load_config_from_file(str(EXAMPLES / "8-gpu-fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero = load_config_from_file(str(EXAMPLES / "zero3.yaml")).deepspeed_config
    assert zero["zero_stage"] == 3 and zero["zero3_save_16bit_model"] is True
    assert "gradient_accumulation_steps" not in zero  # the Trainer fills it in from datasteer's setting
    # the multi-node file: each node passes its --machine_rank; the main node's address is the user's to fill in
    args, _, _ = _validate_launch_command(parser.parse_args(
        ["--config_file", str(EXAMPLES / "2-nodes-16-gpu.yaml"), "--machine_rank", "1", "-m", "datasteer"]))
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "8", 1)
    assert "FILL-IN" in args.main_process_ip and args.main_process_port == 29500


def test_sft_arguments_batch_precision_and_checkpointing():
    cfg = FinetuneConfig(input="x", per_device_train_batch_size=2, gradient_accumulation_steps=3)
    # the default checkpoint interval is one epoch, counted as the Trainer counts it on each process
    assert [steps_per_epoch(n, cfg, p) for n, p in ((12, 1), (12, 2), (13, 2), (2, 8))] == [2, 1, 2, 1]
    assert sft_arguments(cfg, Path("/tmp/unused"), 48, True, processes=2).save_steps == 4
    # activation checkpointing under transformers' old name (the trl: name users know) is not lost
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        args = sft_arguments(FinetuneConfig(input="x", trl={key: True}), Path("/tmp/unused"), 8, True)
        assert args.activation_checkpointing and args.gradient_checkpointing
    assert not sft_arguments(FinetuneConfig(input="x"), Path("/tmp/unused"), 8, True).gradient_checkpointing
    # bf16: on with dtype bfloat16; trl: bf16 with float32 weights is mixed precision
    assert sft_arguments(FinetuneConfig(input="x", dtype="bfloat16"), Path("/tmp/unused"), 8, True).bf16
    assert not sft_arguments(FinetuneConfig(input="x"), Path("/tmp/unused"), 8, True).bf16
    assert sft_arguments(FinetuneConfig(input="x", trl={"bf16": True}), Path("/tmp/unused"), 8, True).bf16


def test_latest_checkpoint_skips_a_cut_off_one_and_knows_its_writers(tmp_path):
    whole, cut = tmp_path / "checkpoint-4", tmp_path / "checkpoint-8"
    for folder in (whole, cut):
        folder.mkdir()
    (whole / "trainer_state.json").write_text('{"global_step": 4}')
    (cut / "trainer_state.json").write_text('{"global_st')  # killed while the Trainer wrote it (not atomic)
    assert latest_checkpoint(tmp_path) == whole
    assert checkpoint_world_size(whole) is None
    for rank in (0, 1):
        (whole / f"rng_state_{rank}.pth").write_bytes(b"")
    assert checkpoint_world_size(whole) == 2
    (cut / "rng_state.pth").write_bytes(b"")
    assert checkpoint_world_size(cut) == 1


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory) -> Path:
    return write_rows(tmp_path_factory.mktemp("rows") / "rows.jsonl", 8)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, long_rows) -> Path:
    """An uninterrupted torchrun run of 2 processes (1 row per process per step), every write audited."""
    base = tmp_path_factory.mktemp("two")
    out, audit = base / "run", base / "audit"
    proc = run_launch([*launcher("torchrun"), str(long_rows), "--out", str(out), "--batch-size", "1", *LONG_FLAGS],
                      launch_env(audit, out))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("fine-tuned")]
    assert lines and "32 steps" in lines[0]
    return out


@pytest.mark.slow
def test_two_processes_write_once_and_train_like_one_with_the_same_global_batch(two_processes, long_rows, tmp_path):
    out = two_processes
    assert_single_writer(out, out.parent / "audit")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model", "training.json"]  # no lock, no temp
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "finetune" and manifest["status"] == "complete"
    assert manifest["summary"]["model"] == "model" and manifest["summary"]["steps"] == 32
    info = json.loads((out / "training.json").read_text())
    assert (info["world_size"], info["distributed_type"], info["per_device_train_batch_size"],
            info["gradient_accumulation_steps"], info["global_batch_size"]) == (2, "MULTI_CPU", 1, 1, 2)
    assert info["gradient_checkpointing"] is True and info["steps"] == 32 and len(info["log"]) == 32
    two = weights(out)
    assert all(torch.isfinite(t).all() for t in two.values())
    # one process with the same global batch (2 rows per step)
    one_run = finetune(FinetuneConfig(input=str(long_rows), model=TINY, per_device_train_batch_size=2, **LONG),
                       tmp_path / "one", progress=False)
    one_info = json.loads((one_run.run_dir / "training.json").read_text())
    assert (one_info["world_size"], one_info["global_batch_size"], one_info["steps"]) == (1, 2, 32)
    # the same sums in another order: float32 rounding (measured: losses 1.9e-7 relative, weights 1.4e-7 absolute)
    losses = torch.tensor([e["loss"] for e in info["log"]])
    one_losses = torch.tensor([e["loss"] for e in one_info["log"]])
    assert torch.allclose(losses, one_losses, rtol=1e-5, atol=0), (losses - one_losses).abs().max()
    one = weights(one_run.run_dir)
    worst = max(float((two[k] - one[k]).abs().max()) for k in one)
    assert worst < 1e-5, worst
    # ... and far from the untrained model, so the comparison means something
    base = load_model(TINY).model.state_dict()
    assert max(float((two[k] - base[k]).abs().max()) for k in base) > 100 * max(worst, 1e-7)


def _kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it. torchrun starts each worker in a session of its own, so
    killing the launcher's process group alone leaves the workers training (a node that dies takes them all)."""
    import psutil

    procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in procs:
        try:
            group = os.getpgid(p.pid)
            if group != os.getpgrp():  # each was started in a session of its own; never this test's group
                os.killpg(group, signal.SIGKILL)
            else:
                p.send_signal(signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


@pytest.mark.slow
def test_killed_launch_resumes_to_the_uninterrupted_result(two_processes, long_rows, tmp_path):
    out = tmp_path / "killed"
    cmd = [*launcher("torchrun"), str(long_rows), "--out", str(out), "--batch-size", "1", *LONG_FLAGS]
    log = tmp_path / "killed.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(cmd, env=launch_env(), stdout=subprocess.DEVNULL, stderr=stderr,
                                start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while latest_checkpoint(out / "checkpoints") is None:
            assert proc.poll() is None, f"the launch ended before its first checkpoint: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.02)
    finally:
        _kill_launch(proc)
    kept = latest_checkpoint(out / "checkpoints")
    assert kept is not None and checkpoint_world_size(kept) == 2
    assert not (out / "model").exists() and not (out / "training.json").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    # one process must not resume what two started: the global batch would change
    with pytest.raises(RunMismatchError, match=r"written by 2 process\(es\) and this launch has 1"):
        finetune(FinetuneConfig(input=str(long_rows), model=TINY, per_device_train_batch_size=1, **LONG), out,
                 progress=False)
    assert latest_checkpoint(out / "checkpoints") == kept and not (out / "model").exists()
    # the same command again (here through accelerate launch: same 2 processes) resumes from the newest checkpoint
    resumed = run_launch([*launcher("accelerate"), str(long_rows), "--out", str(out), "--batch-size", "1",
                          *LONG_FLAGS], launch_env())
    assert f"resumed from {latest_checkpoint_name(resumed.stdout)}" in resumed.stdout
    info, full = (json.loads((d / "training.json").read_text()) for d in (out, two_processes))
    assert info["resumed_from"] is not None and int(info["resumed_from"].split("-")[1]) >= int(kept.name.split("-")[1])
    # same seed, data order (seed + epoch), per-rank RNG states, reduction order: bit-identical (measured: 0.0)
    assert [e["loss"] for e in info["log"]] == [e["loss"] for e in full["log"]]
    a, b = weights(out), weights(two_processes)
    assert all(torch.equal(a[k], b[k]) for k in a)


def latest_checkpoint_name(stdout: str) -> str:
    match = re.search(r"resumed from (checkpoint-\d+)", stdout)
    assert match, stdout
    return match.group(1)


@pytest.mark.slow
def test_lora_under_accelerate_launch_merges_once_like_one_process(tmp_path):
    rows = write_rows(tmp_path / "rows.jsonl", 2)
    out, audit = tmp_path / "two", tmp_path / "audit"
    flags = ["--model", TINY, "--method", "lora", "--lora-r", "4", "--epochs", "2", "--lr", "3e-3", "--set",
             "device=cpu", "--set", "keep_checkpoints=true", "-q"]
    run_launch([*launcher("accelerate"), str(rows), "--out", str(out), "--batch-size", "2", *flags],
               launch_env(audit, out))
    assert_single_writer(out, audit)
    info = json.loads((out / "training.json").read_text())
    assert (info["world_size"], info["global_batch_size"], info["steps"]) == (2, 4, 4)
    cfg = FinetuneConfig(input=str(rows), model=TINY, method="lora", lora={"r": 4}, num_train_epochs=2,
                         learning_rate=3e-3, per_device_train_batch_size=4, device="cpu", keep_checkpoints=True)
    one = finetune(cfg, tmp_path / "one", progress=False)
    a, b = weights(out), weights(one.run_dir)
    assert not any("lora" in k for k in a)  # merged
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    # the FSDP/DeepSpeed path's second half: the model rebuilt from what Trainer.save_model wrote (here the last
    # checkpoint, an adapter) is the model the main process merged in memory
    last = latest_checkpoint(out / "checkpoints")
    save_model(model_from_saved(last, cfg), load_tokenizer(TINY), cfg, tmp_path / "rebuilt")
    rebuilt = load_model(str(tmp_path / "rebuilt")).model.state_dict()
    assert all(torch.equal(rebuilt[k], a[k]) for k in a)


@pytest.mark.slow
def test_accelerate_cpu_flag_trains_in_one_process_and_says_so(tmp_path):
    """`accelerate launch --cpu --num_processes 2` runs its simple launcher: one process (accelerate hands CPU
    processes to mpirun only; huggingface/accelerate#2741). datasteer says so on stderr and records world_size 1."""
    rows = write_rows(tmp_path / "rows.jsonl", 1)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m",
           "datasteer", "finetune", str(rows), "--out", str(out), "--model", TINY, "--epochs", "1", "-q"]
    proc = run_launch(cmd, launch_env())
    assert "accelerate launch --cpu starts a single process" in proc.stderr
    assert len([line for line in proc.stdout.splitlines() if line.startswith("fine-tuned")]) == 1
    assert json.loads((out / "training.json").read_text())["world_size"] == 1
