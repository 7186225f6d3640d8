"""vLLM is GPU-only: without it the backend is a clear error; with it and a GPU, a real run."""

import importlib.util
import json

import pytest

from datasteer.generation.config import GenerateConfig, teacher_config as TeacherConfig
from datasteer.errors import MissingDependencyError
from datasteer.generation import generate, make_teacher

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed")
def test_missing_vllm_is_a_clear_error():
    with pytest.raises(MissingDependencyError, match=r"vllm backend \(GPU only\).*pip install 'datasteer\[vllm\]'"):
        make_teacher(TeacherConfig(name="v", model="embedded:smollm2", backend="vllm"))


def _has_cuda():
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_VLLM or not _has_cuda(), reason="needs vllm and a CUDA GPU")
def test_vllm_generation_on_gpu(prompts_file, tmp_path):
    config = GenerateConfig.model_validate({
        "prompts": {"path": str(prompts_file)},
        "teachers": [{"name": "v", "model": "embedded:smollm2", "backend": "vllm", "k": 3,
                      "sampling": {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 32}}],
    })
    first = generate(config, tmp_path / "a", progress=False)
    rows = [json.loads(x) for x in first.candidates_path.read_text().splitlines()]
    assert len(rows) == 15 and all(r["completion_tokens"] > 0 for r in rows)
    second = generate(config, tmp_path / "b", progress=False)
    assert second.candidates_path.read_bytes() == first.candidates_path.read_bytes()
