"""`datasteer push` against a loopback stand-in of the few Hub endpoints huggingface_hub's upload uses: create a
repository, ask which files go through LFS (preupload), the LFS batch API and its PUT, and the commit (NDJSON with
inline base64 files). A run's rows arrive as Parquet with their dataset card, a model with its model card; the
token reaches the server and never the output."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from datasteer.inheritance.config import FinetuneConfig, SelectConfig
from datasteer.inheritance.finetune import finetune
from datasteer.inheritance.select import select
from tests.conftest import DATASTEER, TINY, cli_env
from tests.test_inheritance import ROWS, write_rows

TOKEN = "hf_loopbackSECRETtoken42"
LFS_SUFFIXES = (".safetensors", ".parquet")


SIZES = {"n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B", "n>1B"}


def validate_card(content: str, repo_type: str) -> list[str]:
    """What the stand-in's validate-yaml checks: the header parses as the card type's metadata, the Hub's fields
    hold values of the right kind, and for a dataset `datasets` reads its configs and features."""
    from huggingface_hub import DatasetCard, ModelCard

    try:
        card = (DatasetCard if repo_type == "dataset" else ModelCard)(content)
        data = card.data.to_dict()
        if repo_type == "dataset":
            from datasets.info import DatasetInfosDict
            from datasets.utils.metadata import MetadataConfigs

            MetadataConfigs.from_dataset_card_data(card.data)
            DatasetInfosDict.from_dataset_card_data(card.data)
            if not set(data.get("size_categories", [])) <= SIZES:
                return [f"size_categories: {data['size_categories']}"]
            if not all(isinstance(t, str) for t in data.get("task_categories", [])):
                return ["task_categories must be names"]
        elif not isinstance(data.get("tags", []), list):
            return ["tags must be a list"]
    except Exception as err:  # noqa: BLE001 - the server answers with the reason
        return [f"{type(err).__name__}: {err}"]
    return []


class FakeHub:
    """The Hub's upload endpoints, in memory: repos, their committed files, the requests seen."""

    def __init__(self, refuse: int | None = None):
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.validated: list[dict] = []
        self.refuse = refuse
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_PUT(self):
                data = self.body()
                hub.requests.append(("PUT", self.path, dict(self.headers)))
                hub.lfs[self.path.rsplit("/", 1)[-1]] = data
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self):
                raw = self.body()
                hub.requests.append(("POST", self.path, dict(self.headers)))
                if hub.refuse:
                    return self.reply(hub.refuse, {"error": "Invalid credentials in Authorization header"})
                base = f"http://127.0.0.1:{hub.port}"
                if self.path == "/api/repos/create":
                    spec = json.loads(raw)
                    repo_id = f"{spec.get('organization') or 'tester'}/{spec['name']}"
                    kind = spec.get("type") or "model"
                    hub.repos[repo_id] = spec
                    prefix = "" if kind == "model" else f"{kind}s/"
                    return self.reply(200, {"url": f"{base}/{prefix}{repo_id}", "name": repo_id})
                if self.path == "/api/validate-yaml":  # the Hub checks a README's metadata before the upload
                    body = json.loads(raw)
                    hub.validated.append(body)
                    errors = validate_card(body["content"], body["repoType"])
                    return self.reply(400 if errors else 200, {"errors": [{"message": e} for e in errors],
                                                               "warnings": []})
                if "/preupload/" in self.path:
                    files = json.loads(raw)["files"]
                    return self.reply(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                         "shouldIgnore": False} for f in files]})
                if self.path.endswith(".git/info/lfs/objects/batch"):
                    objects = json.loads(raw)["objects"]
                    return self.reply(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"}}} for o in objects]})
                if "/commit/" in self.path:
                    kind, rest = self.path.split("/api/", 1)[1].split("/", 1)
                    repo_id = rest.split("/commit/")[0]
                    files = hub.files.setdefault(repo_id, {})
                    for line in raw.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                        elif item["key"] == "lfsFile":
                            files[item["value"]["path"]] = hub.lfs[item["value"]["oid"]]
                    return self.reply(200, {"commitUrl": f"{base}/{repo_id}/commit/abc", "commitOid": "a" * 40})
                return self.reply(404, {"error": f"no such endpoint {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def push(hub_url, tmp_path, *args, **env):
    settings = dict(HF_ENDPOINT=hub_url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                    HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    settings.update(env)
    return subprocess.run(DATASTEER + ["push", *map(str, args)], capture_output=True, text=True,
                          env=cli_env(**settings), timeout=300)


def selected_run(tmp_path):
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps({**r, "length_words": len(r["completion"].split()), "note": None if i else
                                          "first"}) + "\n" for i, r in enumerate(ROWS)))
    select(SelectConfig(input=str(scored), objectives=["length_words:max"]), tmp_path / "sel")
    return tmp_path / "sel"


def test_push_rows_as_parquet_with_their_card(hub, tmp_path):
    import pyarrow.parquet as pq
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    run = selected_run(tmp_path)
    done = push(hub.url, tmp_path, run, "--repo", "picked", "--private")
    assert done.returncode == 0, done.stderr
    assert "tester/picked" in done.stdout and TOKEN not in done.stdout + done.stderr
    assert hub.repos["tester/picked"]["type"] == "dataset" and hub.repos["tester/picked"]["visibility"] == "private"
    assert all(headers.get("authorization") == f"Bearer {TOKEN}" for method, _, headers in hub.requests
               if method == "POST")
    files = hub.files["tester/picked"]
    assert set(files) == {"README.md", "data/selected.parquet"}
    assert [v["repoType"] for v in hub.validated] == ["dataset"]  # the card passed the Hub's metadata check
    # the rows, as Parquet with the card's explicit schema (a column null in its first row is still text)
    table = pq.read_table(io.BytesIO(files["data/selected.parquet"]))
    local = [json.loads(line) for line in (run / "selected.jsonl").read_text().splitlines()]
    assert table.num_rows == len(local) == 4 and str(table.schema.field("note").type) == "string"
    assert table.column("completion").to_pylist() == [r["completion"] for r in local]
    card = DatasetCard(files["README.md"].decode())
    configs = card.data.to_dict()["configs"]
    assert configs[0]["data_files"] == [{"split": "train", "path": "data/selected.parquet"}]
    assert card.data.to_dict()["datasteer"]["selection"]["objectives"] == ["length_words:max"]
    assert 'load_dataset("tester/picked"' in card.text and "`data/selected.parquet`" in card.text
    # what the Hub now holds loads with datasets as it is
    clone = tmp_path / "clone"
    for name, data in files.items():
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        (clone / name).write_bytes(data)
    rows = load_dataset(str(clone), split="train")
    assert rows.num_rows == 4 and rows.features["note"].dtype == "string"


def test_push_a_student_with_its_model_card(hub, tmp_path):
    from huggingface_hub import ModelCard

    data = write_rows(tmp_path / "sel.jsonl", ROWS)
    result = finetune(FinetuneConfig(input=str(data), model=TINY, num_train_epochs=1, per_device_train_batch_size=4),
                      tmp_path / "ft", progress=False)
    done = push(hub.url, tmp_path, tmp_path / "ft", "--repo", "team/student", "--log-json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["event"] == "summary" and summary["repo_type"] == "model" and summary["repo_id"] == "team/student"
    files = hub.files["team/student"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json", "README.md"} <= set(files)
    assert ".complete" not in files and hub.validated[-1]["repoType"] == "model"
    # the weights went through the LFS batch API and its PUT, byte for byte
    assert any(method == "PUT" for method, _, _ in hub.requests)
    assert files["model.safetensors"] == (result.model_dir / "model.safetensors").read_bytes()
    card = ModelCard(files["README.md"].decode())
    assert 'model="team/student"' in card.text and card.data.to_dict()["datasteer"]["model_stage"] == "finetune"
    assert TOKEN not in done.stdout + done.stderr


def test_push_errors_are_one_line_without_the_token(tmp_path):
    refusing = FakeHub(refuse=401)
    try:
        run = selected_run(tmp_path)
        done = push(refusing.url, tmp_path, run, "--repo", "picked")
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert "hf auth login" in done.stderr and TOKEN not in done.stdout + done.stderr
        offline = push(refusing.url, tmp_path, run, "--repo", "picked", HF_HUB_OFFLINE="1")
        assert offline.returncode == 2 and "HF_HUB_OFFLINE is set" in offline.stderr
        assert push(refusing.url, tmp_path, tmp_path / "nowhere", "--repo", "x").returncode == 2
        bad = push(refusing.url, tmp_path, run, "--repo", "a/b/c")
        assert bad.returncode == 2 and "not a repository name" in bad.stderr
    finally:
        refusing.close()
