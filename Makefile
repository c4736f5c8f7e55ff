# Every target bootstraps what it needs: a fresh machine runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PIP_FLAGS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
NODE_STAMP := ledger/node_modules/.installed

.PHONY: demo test lint fmt bench clean venv node

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PIP_FLAGS) -e '.[dev]'
	touch $(STAMP)

# The pinned Solidity toolchain (solc, OpenZeppelin, anvil); optional when npm is absent.
node: $(NODE_STAMP)

$(NODE_STAMP): ledger/package.json ledger/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd ledger && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else \
		echo "npm not found: skipping the Solidity toolchain (anvil and artifact drift tests will skip)"; \
	fi

demo: venv
	$(BIN)/secure-ci demo

lint: venv
	$(BIN)/ruff check secure_ci tests benchmarks examples
	$(BIN)/ruff format --check secure_ci tests benchmarks examples
	$(BIN)/mypy --strict secure_ci

test: venv lint node
	$(BIN)/pytest

fmt: venv
	$(BIN)/ruff format secure_ci tests benchmarks examples
	$(BIN)/ruff check --fix secure_ci tests benchmarks examples

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
