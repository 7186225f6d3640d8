"""Generation: k candidates per prompt from one or several teachers.

Backends: transformers (local, default), openai (any OpenAI-compatible HTTP endpoint, `concurrency` requests in
flight across the run, rpm/tpm pacing, usage and cost), openai-batch (a provider's batch API: upload, poll, collect;
resumable without a second submission), vllm (GPU offline batch). `generate(config, out)` runs them over a prompt set into a run directory.
"""

from datasteer.generation.base import Completion, Teacher
from datasteer.generation.runner import GenerateResult, generate, make_teacher

__all__ = ["Completion", "GenerateResult", "Teacher", "generate", "make_teacher"]
