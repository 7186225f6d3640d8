"""Cards: every run's dataset card carries the YAML header the Hub reads (task, size, configs and features,
provenance from the manifests: teachers, sampling, metrics, selection objective, seed, datasteer version; the
licence left for the user), and fine-tuned students and DPG generators get model cards. `datasets` and
`huggingface_hub` parse them all."""

from __future__ import annotations

import json

import pytest

from datasteer.config import build
from datasteer.dpg.config import DPGConfig
from datasteer.dpg.trainer import dpg
from datasteer.hub import base_model_id, model_card_text
from datasteer.inheritance.config import FinetuneConfig, InheritConfig
from datasteer.inheritance.finetune import finetune
from datasteer.inheritance.pipeline import inherit
from tests.test_dpg_trainer import recipe as dpg_recipe
from tests.test_inheritance import ROWS, TINY, tiny_recipe, write_rows


def parse_dataset_card(directory):
    """The card through both parsers: huggingface_hub's DatasetCard and datasets' own readers of its data."""
    from datasets.info import DatasetInfosDict
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(directory / "README.md")
    configs = MetadataConfigs.from_dataset_card_data(card.data)
    infos = DatasetInfosDict.from_dataset_card_data(card.data)
    return card, configs, infos


@pytest.fixture(scope="module")
def inherit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inherit")
    result = inherit(InheritConfig(**tiny_recipe(tmp)), tmp / "run", progress=False)
    return tmp / "run", result


def test_dataset_cards_carry_the_hub_header_and_provenance(inherit_run):
    from datasets import load_dataset

    out, _ = inherit_run
    card, configs, infos = parse_dataset_card(out / "select-active")
    data = card.data.to_dict()
    assert data["task_categories"] == ["text-generation"] and data["size_categories"] == ["n<1K"]
    # left for the user, with a commented line in the header saying so
    assert "license" not in data and "# license: not set" in (out / "select-active" / "README.md").read_text()
    assert set(configs) == {"selected"} and infos["selected"].splits["train"].num_examples == 6
    origin = data["datasteer"]
    assert origin["stage"] == "select" and origin["datasteer_version"] == "0.1.0" and origin["seed"] == 0
    assert origin["upstream"] == ["score", "generate"]  # followed through the inputs' run directories
    (teacher,) = origin["teachers"]
    assert teacher == {"name": "t", "model": TINY, "backend": "transformers", "k": 3,
                       "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": None, "max_new_tokens": 10}}
    assert origin["metrics"] == ["length", "mtld"] and origin["selection"]["objectives"] == ["length_words:max"]
    assert "| selection | `length_words:max`" in card.text
    assert f"| teacher `t` | `{TINY}` (transformers), k 3" in card.text
    # the generate run's own card: its teachers from its own config; datasets loads the run by its card
    gen_card, _, _ = parse_dataset_card(out / "generate")
    assert gen_card.data.to_dict()["datasteer"]["teachers"][0]["k"] == 3
    assert "selection" not in gen_card.data.to_dict()["datasteer"]
    rows = load_dataset(str(out / "select-active"), split="train")
    assert len(rows) == 6 and "selection" in rows.column_names
    # the pipeline's top card lists every sub-run's rows and the pipeline's provenance
    top, top_configs, _ = parse_dataset_card(out)
    assert {"generate", "score", "select-active", "select-random"} <= set(top_configs)
    assert top.data.to_dict()["datasteer"]["selection"]["objectives"] == ["length_words:max"]
    assert len(load_dataset(str(out), "select-random", split="train")) == 6


def test_student_model_card(inherit_run):
    from huggingface_hub import ModelCard

    out, _ = inherit_run
    card = ModelCard.load(out / "finetune-active" / "model" / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert {"datasteer", "trl", "sft"} <= set(data["tags"]) and "license" not in data
    assert data.get("base_model") is None  # a tiny random model is not on the Hub
    origin = data["datasteer"]
    assert origin["model_stage"] == "finetune" and origin["stage"] == "select"  # the training data's provenance
    assert origin["selection"]["objectives"] == ["length_words:max"] and origin["teachers"][0]["name"] == "t"
    assert "TRL SFTTrainer" in card.text and "| final loss |" in card.text and "| steps | 4 |" in card.text
    assert card.text.count("pipeline(") == 1


def test_model_card_names_the_hub_base_model_and_the_repo(tmp_path):
    data = write_rows(tmp_path / "sel.jsonl", ROWS)
    result = finetune(FinetuneConfig(input=str(data), model=TINY, num_train_epochs=1, per_device_train_batch_size=4),
                      tmp_path / "ft", progress=False)
    manifest = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    manifest["config"]["model"] = "embedded:smollm2"
    text = model_card_text(tmp_path / "ft", manifest, repo_id="me/student")
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert 'pipeline("text-generation", model="me/student")' in card.text
    assert (result.model_dir / "README.md").is_file()
    assert base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and base_model_id("tiny:llama") is None
    assert base_model_id(str(tmp_path)) is None


def test_dpg_generator_model_card(tmp_path):
    from huggingface_hub import ModelCard

    config = build(DPGConfig, dpg_recipe(tmp_path, grpo={"max_steps": 2, "prompts_per_step": 2, "num_generations": 4,
                                                         "max_completion_length": 8, "learning_rate": 1e-2}))
    dpg(config, tmp_path / "run", progress=False)
    card = ModelCard.load(tmp_path / "run" / "dpg" / "model" / "README.md")
    data = card.data.to_dict()
    assert {"datasteer", "trl", "grpo", "dpg"} <= set(data["tags"]) and data["datasteer"]["model_stage"] == "dpg-dpg"
    assert "TRL GRPOTrainer" in card.text and "| policy steps | 2 |" in card.text
    assert "final validation pixel_accuracy" in card.text and "arXiv:2604.08423" in card.text
