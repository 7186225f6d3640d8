"""Shared fixtures. Tests run offline: the hub is off and sockets may only reach loopback."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = "tiny:llama"
_real_connect = socket.socket.connect


def _loopback_only(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6):
        host = address[0]
        try:
            ok = ipaddress.ip_address(host).is_loopback
        except ValueError:
            ok = host == "localhost"
        if not ok:
            raise OSError(f"test tried to reach {address}; only loopback is allowed in tests")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


def write_prompts(path: Path, prompts: list[str], ids: bool = True) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for i, p in enumerate(prompts):
            row = {"prompt_id": f"p{i:03d}", "prompt": p} if ids else {"prompt": p}
            fh.write(json.dumps(row) + "\n")
    return path


PROMPTS = [
    "What is the capital of France?",
    "Name a colour of the rainbow.",
    "Write one word that rhymes with cat.",
    "How many legs does a spider have?",
    "Say hello in Spanish.",
]


@pytest.fixture
def prompts_file(tmp_path: Path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl", PROMPTS)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The embedded model, converted once into the user cache (shared across test sessions)."""
    from datasteer.models import materialize

    return materialize("embedded:smollm2")


@pytest.fixture(scope="session")
def smollm2():
    from datasteer.models import load_model

    return load_model("embedded:smollm2")


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


DATASTEER = [sys.executable, "-m", "datasteer"]


def free_port() -> int:
    """A loopback port nobody listens on (for a launch's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(launcher: str, *module_args: str) -> list[str]:
    """`python -m MODULE ARGS` started as 2 processes on this machine by `launcher`: "torchrun", or "accelerate"
    (`accelerate launch --multi_gpu`: on a machine without GPUs that is accelerate's way to two CPU processes, its
    torchrun launcher; `--cpu --num_processes 2` would start ONE)."""
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "-m", *module_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), "-m", *module_args]
