# malt: the two commands a fresh clone needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= $(HOME)/.cache/malt/models
SMALL_MODEL := $(MODEL_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
export MALT_TEST_MODEL ?= $(SMALL_MODEL)

.PHONY: install install-train model llama-server demo test bench lint clean browser screenshots loop study

# The first install compiles llama.cpp (llama-cpp-python has no wheel on PyPI): about ten
# minutes on two cores. The wheel is built for this CPU and cached per CPU in
# ~/.cache/malt/wheels/ (scripts/install_llama_cpp.py: pip's own cache keys it by version alone,
# and another CPU's build crashes here), so later installs take seconds; every `make install`
# checks that the venv's build is this CPU's.
install: $(VENV)/.installed
	@$(BIN)/python scripts/install_llama_cpp.py

$(VENV)/.installed: pyproject.toml scripts/install_llama_cpp.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python scripts/install_llama_cpp.py
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The training extra (`malt train`): torch first, pinned by constraints-train.txt so pip takes
# the CPU wheel instead of several GB of CUDA, then the rest of the extra under that pin.
install-train: $(VENV)/.installed-train

$(VENV)/.installed-train: $(VENV)/.installed constraints-train.txt
	$(BIN)/python -m pip install -q -c constraints-train.txt torch
	$(BIN)/python -m pip install -q -c constraints-train.txt -e '.[train]'
	touch $@

model: $(SMALL_MODEL)

$(SMALL_MODEL): | install
	$(BIN)/python scripts/fetch_small_model.py $(MODEL_DIR)

# llama.cpp's own server, built once from the llama-cpp-python sdist (about 10 minutes on two
# cores) and cached in ~/.cache/malt/llama-server/: the --engine openai tests and bench use it.
llama-server: install
	$(BIN)/python scripts/build_llama_server.py

demo: install model
	rm -f demo.db demo.db-wal demo.db-shm
	$(BIN)/malt pull smollm2-135m --file $(SMALL_MODEL)
	$(BIN)/malt run --n 2 --max-tokens 96 --model smollm2-135m --db demo.db examples/questions.jsonl
	$(BIN)/malt status --db demo.db

test: install install-train model llama-server
	$(BIN)/python -m pytest -q

# The browser tests of `malt view` drive Debian's chromium (Playwright's own browser download
# cannot work offline); installed here when missing, so CI never skips them.
CHROMIUM ?= /usr/bin/chromium
test: browser
browser:
	@test -x $(CHROMIUM) || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium)

# The README's screenshots of `malt view`, from a real run of the small model.
screenshots: install model browser
	MALT_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/test_view_browser.py \
		-k "screenshot or evaluation_page"

# The whole MALT loop on the small model, offline: pull --file, run, export, train, eval.
loop: install install-train model
	bash scripts/loop.sh $(SMALL_MODEL) loop

# The committed study (docs/study.md): the paper's protocol on CSQA with the small model, hours
# on two cores. Every stage resumes: after Ctrl-C or kill -9, `make study` goes on.
study: install install-train model
	$(BIN)/malt pull smollm2-135m --file $(SMALL_MODEL)
	$(BIN)/malt study --config examples/study/csqa.toml --out study/csqa

bench: install model llama-server
	$(BIN)/python -m malt_local.bench --model $(SMALL_MODEL)

lint: install
	$(BIN)/ruff check malt_local tests scripts
	$(BIN)/ruff format --check malt_local tests scripts

clean:
	rm -rf $(VENV) dist build *.egg-info demo.db demo.db-wal demo.db-shm
