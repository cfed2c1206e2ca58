# Two set-up commands: `make demo` and `make test`. Both bootstrap .venv first.
# `make test-unit` is the inner loop: the unit tier alone, in well under a minute.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bootstrap-stamp

.PHONY: demo test test-unit test-deps test-fixtures venv proto clean

venv: $(STAMP)

# torch goes in first and pinned: a loose torch requirement on a machine without torch pulls a
# multi-GB CUDA build.
$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/fastgrpo-learner demo

# every tier: unit, service, system (tests/conftest.py says which is which)
test: venv test-deps test-fixtures
	$(BIN)/python -m pytest -q

test-unit: venv
	$(BIN)/python -m pytest -q --tier unit

# what the system tests need from Debian (Prometheus, promtool, docker-compose)
test-deps:
	scripts/install-test-deps

# the trained fixture policy and its draft the service tests use (a few CPU minutes once; cached)
test-fixtures: venv
	$(BIN)/fastgrpo-fixture draft > /dev/null

# Regenerates the Python stubs from proto/ (tests check that the committed ones are current).
proto: venv
	$(BIN)/python -m grpc_tools.protoc -I proto --python_out=proto/python --pyi_out=proto/python \
		--grpc_python_out=proto/python proto/fastgrpo/v1/rollout.proto

clean:
	rm -rf $(VENV) build *.egg-info
