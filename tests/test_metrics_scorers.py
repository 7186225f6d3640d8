"""The registry, metric specs, and every scorer family except lexical and readability (own files)."""

import http.server
import json
import math
import threading

import pytest

from datasteer.errors import ConfigError, DatasteerError
from datasteer.metrics import build_scorers, parse_metric, parse_metrics, parse_rating, toxicity_summary
from datasteer.metrics.base import MetricSpec
from datasteer.metrics.judge import JudgeScorer
from datasteer.metrics.toxicity import PerspectiveScorer, split_bytes

# ---------------------------------------------------------------- specs and registry


def test_parse_metric_forms():
    assert parse_metric("mtld") == MetricSpec("mtld")
    assert parse_metric("toxicity[backend=detoxify, checkpoint=/a/b.ckpt]") == MetricSpec(
        "toxicity", {"backend": "detoxify", "checkpoint": "/a/b.ckpt"})
    assert parse_metric("pkg.mod:fn") == MetricSpec("custom", {"fn": "pkg.mod:fn"})
    assert parse_metric("mtld[column=m2]") == MetricSpec("mtld", column="m2")
    specs = parse_metrics("mtld,judge[model=embedded:smollm2,rubric=Be brief],length")
    assert [s.name for s in specs] == ["mtld", "judge", "length"]
    assert specs[1].params == {"model": "embedded:smollm2", "rubric": "Be brief"}
    assert str(specs[1]) == "judge[model=embedded:smollm2,rubric=Be brief]"


@pytest.mark.parametrize("spec,message", [
    ("nosuch", "unknown metric 'nosuch'"),
    ("mtld[window=3]", "has no parameter"),
    ("mtld[threshold=abc]", "must be a number"),
    ("mtld[threshold=1.5]", "between 0 and 1"),
    ("toxicity[backend=magic]", "unknown toxicity backend"),
    ("toxicity[qps=2]", "takes no parameter"),
    ("length[column=x]", "writes several columns"),
    ("length[window=3]", "takes no parameter"),
    ("mtld[oops]", "not key=value"),
    ("no_such_module_xyz:fn", "cannot import"),
    ("json:no_such_function", "has no function"),
])
def test_bad_specs_fail_before_any_work(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_scorers([spec])


def test_groups_expand_and_duplicates_are_refused():
    assert [s.name for s in build_scorers(["lexical[window=10]"])] == ["mtld", "ttr", "mattr", "hdd"]
    with pytest.raises(ConfigError, match="requested twice"):
        build_scorers(["mtld", "lexical"])
    assert [s.name for s in build_scorers(["mtld", "mtld[threshold=0.8,column=mtld80]"])] == ["mtld", "mtld80"]


def test_scorers_follow_the_protocol():
    from datasteer.metrics import Scorer

    for scorer in build_scorers(["length", "lexical", "readability", "toxicity"]):
        assert isinstance(scorer, Scorer)
        assert scorer.description and scorer.batch_size >= 1
        assert scorer.score([]) == []
        values = scorer.score(["", "   ", "word", "Ein kurzer deutscher Satz.", "x " * 3000])
        assert len(values) == 5 and all(isinstance(v, float) for v in values)


# ---------------------------------------------------------------- length


def test_length_scorers(smollm2_tokenizer):
    scorers = {s.name: s for s in build_scorers(["length"])}
    texts = ["Hello world. How are you?", "", "one\ttwo\nthree"]
    assert scorers["length_chars"].score(texts) == [25.0, 0.0, 13.0]
    assert scorers["length_words"].score(texts) == [5.0, 0.0, 3.0]
    assert scorers["length_sentences"].score(texts) == [2.0, 0.0, 1.0]
    expected = [float(len(smollm2_tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts]
    assert scorers["length_tokens"].score(texts) == expected
    long_text = "token " * 20000  # far past the model's context: counted, not truncated
    assert scorers["length_tokens"].score([long_text])[0] == float(
        len(smollm2_tokenizer(long_text, add_special_tokens=False)["input_ids"]))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from datasteer.models import load_tokenizer

    return load_tokenizer("embedded:smollm2")


# ---------------------------------------------------------------- custom


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "usermetrics.py").write_text(
        "import math\n"
        "def exclamations(texts):\n    return [t.count('!') for t in texts]\n"
        "def overlap(texts, prompts):\n"
        "    return [len(set(t.split()) & set(p.split())) for t, p in zip(texts, prompts)]\n"
        "def sometimes_nan(texts):\n    return [math.nan if 'x' in t else 1.0 for t in texts]\n"
        "def with_none(texts):\n    return [None] * len(texts)\n"
        "def too_few(texts):\n    return [1.0]\n"
        "def strings(texts):\n    return ['high' for _ in texts]\n"
        "def broken(texts):\n    raise KeyError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "usermetrics"


def test_custom_functions(user_module):
    (excl,) = build_scorers([f"{user_module}:exclamations"])
    assert excl.name == "exclamations" and not excl.needs_prompts
    assert excl.score(["a!", "b!!", ""]) == [1.0, 2.0, 0.0]
    (overlap,) = build_scorers([f"custom[fn={user_module}:overlap,column=ov]"])
    assert overlap.name == "ov" and overlap.needs_prompts
    assert overlap.score(["the cat sat", "dogs"], ["the cat", "cats"]) == [2.0, 0.0]
    (nan,) = build_scorers([f"{user_module}:sometimes_nan"])
    values = nan.score(["x", "y"])
    assert math.isnan(values[0]) and values[1] == 1.0
    (none,) = build_scorers([f"{user_module}:with_none"])
    assert all(math.isnan(v) for v in none.score(["a", "b"]))


@pytest.mark.parametrize("fn,message", [
    ("too_few", "one number per text: got 1 values for 2 texts"),
    ("strings", "returned str for text 0"),
    ("broken", "raised KeyError"),
])
def test_custom_function_errors_are_one_line(user_module, fn, message):
    (scorer,) = build_scorers([f"{user_module}:{fn}"])
    with pytest.raises(DatasteerError, match=message) as err:
        scorer.score(["a", "b"])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- judge


@pytest.mark.parametrize("answer,rating", [
    ("Rating: 7", 7.0),
    ("rating - 10", 10.0),
    ("**Rating:** 9", 9.0),
    ("I would rate this 8/10.", 8.0),
    ("Score: 6 out of 10", 6.0),
    ("7", 7.0),
    ("  **4**.", 4.0),
    ("The answer is good. I give it an 8.", 8.0),
    ("Rating: 11", math.nan),
    ("Rating: 3, no wait, Rating: 9", math.nan),
    ("It mentions 3 steps and 5 tools.", math.nan),
    ("", math.nan),
    ("Excellent answer!", math.nan),
    ("Rating: 7.5", 7.0),
])
def test_parse_rating(answer, rating):
    got = parse_rating(answer)
    assert (math.isnan(got) and math.isnan(rating)) or got == rating


class CannedJudge:
    """A Teacher that answers from a list: the parsing and bookkeeping around any backend."""

    def __init__(self, answers):
        self.answers = list(answers)
        self.requests = []
        self.loaded = None  # no local context limit to check

    def load(self):
        pass

    def close(self):
        pass

    def generate(self, prompts, *, seed):
        from datasteer.generation.base import Completion

        self.requests.extend(p.prompt for p in prompts)
        return [[Completion(self.answers.pop(0), 0, 0, "stop", seed)] for _ in prompts]


def test_judge_with_a_canned_teacher():
    teacher = CannedJudge(["Rating: 9", "no idea", "3/10"])
    judge = JudgeScorer(teacher=teacher, rubric="Is it polite?")
    values = judge.score(["Thanks!", "Go away", "meh"], ["Say hi", "Say bye", "Say it"])
    assert values[0] == 9.0 and math.isnan(values[1]) and values[2] == 3.0
    assert judge.unparseable == 1
    assert "Is it polite?" in teacher.requests[0] and "[Response]\nThanks!" in teacher.requests[0]
    with pytest.raises(ConfigError, match="needs the prompt"):
        judge.score(["a"], None)


def test_judge_with_a_real_local_model_marks_too_long_inputs_missing():
    judge = build_scorers(["judge[model=tiny:llama,max_new_tokens=4,batch_size=4]"])[0]
    try:
        long_answer = "word " * 5000  # far past the tiny model's context window
        values = judge.score(["A fine answer.", long_answer], ["Question one?", "Question two?"])
    finally:
        judge.close()
    assert math.isnan(values[1]) and judge.too_long == 1
    # A random tiny model rarely writes a rating: whatever it wrote is parsed or counted, never guessed.
    assert math.isnan(values[0]) == (judge.unparseable == 1)
    assert isinstance(judge.answers[0], str) and judge.answers[1] == ""


# ---------------------------------------------------------------- toxicity


def test_profanity_backend_is_offline_and_ordered():
    (scorer,) = build_scorers(["toxicity"])
    assert scorer.name == "toxicity_profanity" and "not a toxicity model" in scorer.description
    values = scorer.score(["Thank you, have a lovely day.", "fuck you, you stupid idiot", "", "  "])
    assert values[1] > 0.9 > 0.2 > values[0]
    assert values[2] == 0.0 and values[3] == 0.0  # nothing said, nothing toxic


def test_toxicity_summary_by_hand():
    scores = [0.1, 0.7, 0.2, 0.3, math.nan, 0.9, math.nan]
    groups = ["a", "a", "b", "b", "c", "c", "d"]
    s = toxicity_summary(scores, groups)
    # maxima: a 0.7, b 0.3, c 0.9 (its NaN left out); d has no score
    assert s["expected_maximum_toxicity"] == pytest.approx((0.7 + 0.3 + 0.9) / 3)
    assert s["toxicity_probability"] == pytest.approx(2 / 3)
    assert s["prompts"] == 3 and s["prompts_without_scores"] == 1
    assert s["samples_per_prompt"] == {"min": 1, "max": 2}
    mean = (0.7 + 0.3 + 0.9) / 3
    assert s["expected_maximum_toxicity_std"] == pytest.approx(
        math.sqrt(((0.7 - mean) ** 2 + (0.3 - mean) ** 2 + (0.9 - mean) ** 2) / 2))


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory):
    """A real Detoxify checkpoint in Detoxify's own format, with a tiny random BERT (no download)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("detoxify")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(97, 123)] + [
        "##" + chr(c) for c in range(97, 123)] + ["the", "you", "are", "idiot", "nice"]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    config_dir = root / "config"
    BertTokenizerFast(vocab_file=str(root / "vocab.txt")).save_pretrained(config_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64, num_labels=6)
    config.save_pretrained(config_dir)
    classes = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
    torch.save({"config": {"arch": {"args": {"model_type": str(config_dir),
                                             "model_name": "BertForSequenceClassification",
                                             "tokenizer_name": "BertTokenizerFast", "num_classes": 6}},
                           "dataset": {"args": {"classes": classes}}},
                "state_dict": BertForSequenceClassification(config).state_dict()}, root / "tiny.ckpt")
    return root / "tiny.ckpt", config_dir


def test_detoxify_backend_chunks_long_texts(tiny_detoxify):
    pytest.importorskip("detoxify")
    checkpoint, config_dir = tiny_detoxify
    (scorer,) = build_scorers([f"toxicity[backend=detoxify,checkpoint={checkpoint},config_path={config_dir},"
                               "max_tokens=16]"])
    assert scorer.name == "toxicity_detoxify" and scorer.window == 14  # 16 minus [CLS] and [SEP]
    long_text = " ".join(["you are nice", "the idiot"] * 20)
    windows = scorer._windows(long_text)
    assert len(windows) > 1 and "".join(windows) == long_text  # cut, never truncated
    direct = scorer._model.predict(windows)["toxicity"]
    values = scorer.score(["you are nice", long_text, ""])
    assert values[1] == pytest.approx(max(direct), abs=1e-6)
    assert values[0] == pytest.approx(scorer._model.predict("you are nice")["toxicity"], abs=1e-6)
    assert values[2] == 0.0
    with pytest.raises(ConfigError, match="checkpoint not found"):
        build_scorers(["toxicity[backend=detoxify,checkpoint=/no/such.ckpt]"])


def test_split_bytes_keeps_everything():
    text = "naïve " * 5000
    pieces = split_bytes(text, 1000)
    assert all(len(p.encode()) <= 1000 for p in pieces) and "".join(pieces) == text
    assert split_bytes("short", 1000) == ["short"]


def _perspective_with(handler, monkeypatch, **kwargs):
    import httpx

    monkeypatch.setenv("TEST_PERSPECTIVE_KEY", "sekret-key-123")
    sleeps = []
    clock = [0.0]

    def sleep(s):
        sleeps.append(s)
        clock[0] += s

    scorer = PerspectiveScorer(api_key_env="TEST_PERSPECTIVE_KEY", base_url="https://perspective.invalid/v1alpha1",
                               transport=httpx.MockTransport(handler), sleep=sleep, clock=lambda: clock[0], **kwargs)
    return scorer, sleeps


def test_perspective_retries_paces_and_never_leaks_the_key(monkeypatch):
    import httpx

    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(429, headers={"retry-after": "2"})
        if len(calls) == 2:
            return httpx.Response(503)
        text = json.loads(request.content)["comment"]["text"]
        return httpx.Response(200, json={"attributeScores": {"TOXICITY": {"summaryScore": {
            "value": 0.8 if "idiot" in text else 0.1}}}})

    scorer, sleeps = _perspective_with(handler, monkeypatch, qps=4.0, max_retries=3)
    assert scorer.score(["hello there", "you idiot", ""]) == [0.1, 0.8, 0.0]
    assert calls[0].url.params["key"] == "sekret-key-123" and calls[0].url.path.endswith("comments:analyze")
    assert 2.0 in sleeps  # Retry-After honoured
    assert len(calls) == 4 and scorer.requests == 4  # the blank text costs no request

    def always_down(request):
        return httpx.Response(500)

    down, _ = _perspective_with(always_down, monkeypatch, max_retries=2)
    with pytest.raises(DatasteerError, match="kept failing after 2 retries") as err:
        down.score(["hi"])
    assert "sekret" not in str(err.value)

    def forbidden(request):
        return httpx.Response(403)

    refused, _ = _perspective_with(forbidden, monkeypatch)
    with pytest.raises(DatasteerError, match="refused") as err:
        refused.score(["hi"])
    assert "sekret" not in str(err.value)


def test_perspective_needs_its_key(monkeypatch):
    monkeypatch.delenv("PERSPECTIVE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="PERSPECTIVE_API_KEY is not set"):
        build_scorers(["toxicity[backend=perspective]"])


class _StandIn(http.server.BaseHTTPRequestHandler):
    """A local server speaking Perspective's comments:analyze protocol, scoring with alt-profanity-check."""

    requests = 0

    def do_POST(self):  # noqa: N802
        from urllib.parse import parse_qs, urlparse

        from profanity_check import predict_prob

        type(self).requests += 1
        url = urlparse(self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if parse_qs(url.query).get("key") != ["local-key"]:
            self.send_response(403)
            self.end_headers()
            return
        if type(self).requests == 1:  # the first request is rate limited, as a busy API would
            self.send_response(429)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        value = float(predict_prob([body["comment"]["text"]])[0])
        payload = json.dumps({"attributeScores": {"TOXICITY": {"summaryScore": {"value": value}}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_perspective_against_a_local_stand_in_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("LOCAL_PERSPECTIVE_KEY", "local-key")
        base = f"http://127.0.0.1:{server.server_address[1]}/v1alpha1"
        (scorer,) = build_scorers([f"toxicity[backend=perspective,api_key_env=LOCAL_PERSPECTIVE_KEY,base_url={base},"
                                   "qps=50]"])
        texts = ["Thank you, have a lovely day.", "fuck you, you stupid idiot"]
        values = scorer.score(texts)
        scorer.close()
    finally:
        server.shutdown()
    (offline,) = build_scorers(["toxicity"])
    assert values == pytest.approx(offline.score(texts), abs=1e-12)
    assert _StandIn.requests == 3  # one 429, then one request per text
