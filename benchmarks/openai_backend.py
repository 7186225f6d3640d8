"""Throughput of OpenAI-compatible teachers against a loopback server that answers after a fixed delay: the old
path (each batch its own event loop and client, waiting for its slowest request) and the new one (one client,
`concurrency` requests in flight across batches), side by side in one run.

The server (`tests/test_openai_server.py`, in its own process) answers every chat completion after `--delay`
seconds, so the ideal throughput is concurrency / delay requests per second; the table gives each path's
fraction of it. Both paths run through `datasteer.generation.generate` into a run directory (shards, merge,
card), with batch size 8 and k 1; the time is the runner's `generation_seconds` (the teacher's work, shard writes
included for the new path, whose writes overlap the requests). The old path is the backend as it was before
(git 1ae219a, `OpenAITeacher._generate`), kept here rather than in the package.

    python benchmarks/openai_backend.py [--delay 0.2] [--waves 20] [--concurrency 1 8 32 128]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from datasteer.errors import TeacherRequestError
from datasteer.generation import generate
from datasteer.generation.base import Completion
from datasteer.generation.config import GenerateConfig
from datasteer.generation.remote import auth_headers, chat_payload, parse_completion, request_seed
from datasteer.io import Prompt

ROOT = Path(__file__).resolve().parents[1]


class OldOpenAITeacher:
    """The backend before issue 18: every `generate` call (one unit) opens an event loop and a client, sends the
    unit's requests with at most `concurrency` in flight, and returns when the slowest has answered. Retries are
    left out (the loopback server never fails)."""

    def __init__(self, config: Any):
        self.config = config
        self.url = config.base_url.rstrip("/") + "/chat/completions"

    def load(self) -> None:
        self.headers = {"Content-Type": "application/json", **auth_headers(self.config)}

    def close(self) -> None:
        pass

    def generate(self, prompts: list[Prompt], *, seed: int) -> list[list[Completion]]:
        return asyncio.run(self._generate(prompts, seed))

    async def _generate(self, prompts: list[Prompt], seed: int) -> list[list[Completion]]:
        limit = asyncio.Semaphore(self.config.concurrency)
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.config.timeout_s), headers=self.headers) as client:

            async def one(prompt: Prompt, sample_index: int) -> Completion:
                s = request_seed(seed, prompt, sample_index)
                async with limit:
                    response = await client.post(self.url, json=chat_payload(self.config, prompt, s))
                if response.status_code != 200:
                    raise TeacherRequestError(f"HTTP {response.status_code}")
                return parse_completion(response.json(), "old", s)

            tasks = [[asyncio.ensure_future(one(p, j)) for j in range(self.config.k)] for p in prompts]
            return [[await t for t in row] for row in tasks]


def start_server(delay: float) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_openai_server", "--delay", str(delay)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


def measure(path: str, url: str, concurrency: int, requests: int, tmp: Path, batch_size: int) -> dict[str, Any]:
    prompts = tmp / f"prompts-{requests}.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt_id": f"p{i:05d}", "prompt": f"Question {i}: what is {i}+{i}?"})
                                   + "\n" for i in range(requests)))
    config = GenerateConfig.model_validate({
        "prompts": str(prompts),
        "teachers": [{"name": "bench", "model": "m", "backend": "openai", "base_url": url, "k": 1,
                      "batch_size": batch_size, "concurrency": concurrency, "sampling": {"max_new_tokens": 16}}],
    })
    teachers = {"bench": OldOpenAITeacher(config.teachers[0])} if path == "old" else None
    out = tmp / f"{path}-{concurrency}"
    began = time.perf_counter()
    result = generate(config, out, progress=False, teachers=teachers)
    wall = time.perf_counter() - began
    assert result.rows == requests
    return {"requests": requests, "seconds": result.generation_seconds, "wall_s": wall,
            "rate": requests / result.generation_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=0.2, help="the server's answer delay in seconds")
    parser.add_argument("--waves", type=int, default=20, help="requests per measurement of the new path, in "
                        "multiples of the concurrency")
    parser.add_argument("--old-requests", type=int, default=160, help="requests per measurement of the old path "
                        "at most (it is slow: about 8 per delay)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    server, url = start_server(args.delay)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            measure("new", url, 4, 16, Path(tmp), args.batch_size)  # warm-up: imports, first connections
            for c in args.concurrency:
                ideal = c / args.delay
                n_new = args.waves * c
                old = measure("old", url, c, min(n_new, args.old_requests), Path(tmp), args.batch_size)
                new = measure("new", url, c, n_new, Path(tmp), args.batch_size)
                row = {"concurrency": c, "ideal": ideal, "old": old, "new": new,
                       "old_fraction": old["rate"] / ideal, "new_fraction": new["rate"] / ideal}
                rows.append(row)
                print(f"concurrency {c}: old {old['rate']:.1f} req/s ({row['old_fraction']:.1%} of {ideal:.0f}), "
                      f"new {new['rate']:.1f} req/s ({row['new_fraction']:.1%})", flush=True)
    finally:
        server.kill()
        server.wait()
    info = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "httpx": httpx.__version__, "delay_s": args.delay,
            "batch_size": args.batch_size, "k": 1, "results": rows}
    print(json.dumps(info))
    print(f"\n{info['date']}, {info['machine']}, Python {info['python']}, httpx {info['httpx']}; server delay "
          f"{args.delay * 1000:.0f} ms, batch size {args.batch_size}, k 1\n")
    print("| concurrency | ideal req/s | old: requests | old req/s | old % of ideal | new: requests | new req/s | "
          "new % of ideal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['ideal']:.0f} | {r['old']['requests']} | {r['old']['rate']:.1f} | "
              f"{100 * r['old_fraction']:.1f} | {r['new']['requests']} | {r['new']['rate']:.1f} | "
              f"{100 * r['new_fraction']:.1f} |")


if __name__ == "__main__":
    main()
