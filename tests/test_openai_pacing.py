"""rpm/tpm pacing and Retry-After, measured on a real loopback server (`tests/test_openai_server.py`): requests and
tokens per second seen by the server against the limit; and the token buckets on a fake clock."""

import asyncio

import pytest

from datasteer.generation import generate
from datasteer.generation.config import GenerateConfig
from datasteer.generation.pacing import Pacer, TokenBucket, estimate_tokens
from tests.conftest import write_prompts
from tests.test_openai_server import StubOpenAI, answer_text, usage_of


def _generate(tmp_path, url, n, **teacher):
    prompts = write_prompts(tmp_path / "prompts.jsonl", [f"Please answer question number {i} with care."
                                                         for i in range(n)])
    fields = {"name": "paced", "model": "m", "backend": "openai", "base_url": url, "k": 1, "batch_size": 4,
              "concurrency": 16, **teacher}
    config = GenerateConfig.model_validate({"prompts": str(prompts), "teachers": [fields]})
    return generate(config, tmp_path / "run", progress=False)


def _max_in_window(times, window=1.0):
    best, lo = 0, 0
    for hi in range(len(times)):
        while times[hi] - times[lo] >= window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def test_rpm_paces_requests_to_the_limit(tmp_path):
    rpm, n = 1200, 60  # 20 a second, at most one second's worth at once
    with StubOpenAI() as stub:
        result = _generate(tmp_path, stub.url, n, rpm=rpm)
        times = sorted(t for t, _ in stub.arrivals)
    assert result.rows == n
    rate = rpm / 60
    burst = int(rate)
    steady = (n - 1 - burst) / (times[-1] - times[burst])
    assert 0.85 * rate <= steady <= 1.05 * rate, steady  # paced at the limit, not far under it
    assert _max_in_window(times) <= burst + rate + 1, "never more than a bucket plus a second's refill"


def test_tpm_paces_the_tokens_the_server_reports(tmp_path):
    tpm, n = 30_000, 60  # 500 tokens a second; each request uses ~30 but may use up to 200 (max_tokens)
    with StubOpenAI() as stub:
        result = _generate(tmp_path, stub.url, n, tpm=tpm, sampling={"max_new_tokens": 200})
        times = sorted(t for t, _ in stub.arrivals)
    rows = [r for r in result.dataset()]
    per_request = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows) / n
    assert 20 < per_request < 40
    span = times[-1] - times[0]
    used_rate = n * per_request / span
    print(f"tokens/s {used_rate:.0f} of {tpm / 60:.0f}")
    # the estimate (prompt/4 + 200) is settled with the usage, so the pace follows the tokens used, not max_tokens:
    # close to the limit, and never above a bucket (one second's worth) plus one request beyond it
    assert used_rate >= 0.8 * tpm / 60, used_rate
    assert n * per_request <= tpm / 60 * (span + 1) + 212, used_rate
    assert result.usage["paced"]["total_tokens"] == round(per_request * n)


def test_retry_after_pauses_every_request_of_the_teacher(tmp_path):
    refused = {}

    def once(body):  # the first request is refused with Retry-After; the others then wait too
        if not refused:
            import time

            refused["at"] = time.monotonic()
            return 429, {"Retry-After": "0.6"}, {"error": {"message": "slow down"}}
        return None

    with StubOpenAI(hook=once) as stub:
        result = _generate(tmp_path, stub.url, 12, concurrency=2)
        after = [t for t, _ in stub.arrivals if t > refused["at"]]
    assert result.rows == 12
    # the request in flight beside the refused one may arrive at once; every later one waits out the pause
    assert sum(t < refused["at"] + 0.55 for t in after) <= 1, [round(t - refused["at"], 3) for t in after]


# ---------------------------------------------------------------- the buckets, on a fake clock

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        self.now += seconds


def test_bucket_allows_a_second_then_the_rate():
    clock = FakeClock()
    bucket = TokenBucket(120, clock)  # 2 a second
    assert bucket.capacity == 2
    bucket.take(1)
    bucket.take(1)
    assert bucket.wait_for(1) == pytest.approx(0.5)
    clock.now = 10
    assert bucket.wait_for(1) == 0 and bucket.level == 2, "refills to one second's worth, no more"
    assert bucket.wait_for(5) == 0, "a request larger than the bucket waits for a full bucket, then goes in debt"
    bucket.take(5)
    assert bucket.wait_for(1) == pytest.approx(2.0)


def test_pacer_spaces_requests_and_settles_tokens():
    clock = FakeClock()
    pacer = Pacer(rpm=60, tpm=600, clock=clock, sleep=clock.sleep)

    async def run():
        stamps = []
        for _ in range(4):
            await pacer.acquire(10)
            stamps.append(clock.now)
        return stamps

    assert asyncio.run(run()) == pytest.approx([0.0, 1.0, 2.0, 3.0])  # 1 a second; tokens never the limit
    pacer = Pacer(tpm=600, clock=clock, sleep=clock.sleep)  # 10 tokens a second
    start = clock.now

    async def big():
        await pacer.acquire(30)  # a full bucket (10), then 20 in debt
        pacer.settle(30, 5)  # it used 5: 25 back
        await pacer.acquire(10)

    asyncio.run(big())
    assert clock.now == pytest.approx(start + 0.5), "settled: level 5, waits 0.5 s for 10 (unsettled: 3 s for 30)"
    pacer.pause(3.0)
    asyncio.run(pacer.acquire(1))
    assert clock.now == pytest.approx(start + 3.5)


def test_estimate_is_characters_over_four_plus_max_tokens():
    payload = {"messages": [{"role": "system", "content": "x" * 10}, {"role": "user", "content": "y" * 30}],
               "max_tokens": 100}
    assert estimate_tokens(payload) == 110
    body = {"messages": [{"role": "user", "content": "hello"}], "seed": 1, "max_tokens": 4}
    assert usage_of(body, answer_text(body))["completion_tokens"] == 4
