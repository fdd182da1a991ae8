# The two set-up commands of the README: `make demo` (install + main job) and `make test` (install + all tests).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
DEMO := runs/demo

.PHONY: install demo test execute check-sync readme docs-deps docs-system-deps docs docs-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev]"
	touch $@

demo: install
	$(BIN)/fundus-lab synth --task dr --n 400 --size 256 --seed 0 --out $(DEMO)/train_data
	$(BIN)/fundus-lab synth --task dr --n 200 --size 256 --seed 1 --out $(DEMO)/test_data
	$(BIN)/fundus-lab train --labels-csv $(DEMO)/train_data/labels.csv --img-dir $(DEMO)/train_data/images \
		--save-dir $(DEMO)/model --image-size 192 --batch-size 32 --epochs 8 --random-seed 42
	$(BIN)/fundus-lab evaluate --labels-csv $(DEMO)/test_data/labels.csv --img-dir $(DEMO)/test_data/images \
		--model-path $(DEMO)/model/best_model.pth --output-dir $(DEMO)/evaluation
	@echo "Results: model and training history in $(DEMO)/model, held-out metrics in $(DEMO)/evaluation/metrics.json"

test: install
	cd nbs && ../$(BIN)/nbdev-test --timing
	$(BIN)/pytest tests

# Run one chapter top to bottom in full mode and save its outputs: make execute NB=nbs/08_train.ipynb
# (fastai's import-time use of torch.jit.script warns on every page under torch 2.14; that warning is left out.)
execute: install
	@test -n "$(NB)" || { echo "Name the notebook: make execute NB=nbs/<chapter>.ipynb"; exit 2; }
	env -u IN_TEST PYTHONWARNINGS='ignore:`torch.jit.script` is deprecated:FutureWarning' \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=-1 $(NB)
	$(BIN)/nbdev-clean --fname $(NB)

check-sync: install
	@before="$$(git status --porcelain)"; \
	$(BIN)/nbdev-export && $(BIN)/nbdev-clean && $(MAKE) --no-print-directory readme; \
	after="$$(git status --porcelain)"; \
	if [ "$$before" != "$$after" ]; then \
		echo "nbdev-export / nbdev-clean / README changed files: run them and commit the result."; \
		git status --porcelain; git --no-pager diff --stat; exit 1; fi

# The offline docs site (Quarto is not installable everywhere): pandoc, KaTeX and Bootswatch from npm, Chromium.
DOCS := _docs_offline
DOCS_DEPS := _docs_deps
DOCS_NPM := katex@0.19.1 bootswatch@5.3.8 @fontsource/source-sans-pro@5.3.0

docs-deps: $(DOCS_DEPS)/.installed

docs-system-deps:
	@dpkg -s pandoc chromium fonts-dejavu-core >/dev/null 2>&1 && command -v npm >/dev/null || { \
		echo "Installing pandoc and chromium (Debian packages)"; apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pandoc chromium fonts-dejavu-core \
		$$(command -v npm >/dev/null || echo npm) >/dev/null; }

$(DOCS_DEPS)/.installed: Makefile | docs-system-deps
	npm install --prefix $(DOCS_DEPS) --no-audit --no-fund --silent --no-save $(DOCS_NPM)
	touch $@

docs: install docs-deps
	$(BIN)/python tools/build_docs.py --out $(DOCS) --deps $(DOCS_DEPS)

docs-check: docs
	$(BIN)/python tools/check_docs.py $(DOCS)

readme:
	$(BIN)/jupyter nbconvert --to markdown --log-level WARN --stdout nbs/index.ipynb > README.md
