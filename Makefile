# `make train` installs (once, into .venv) and trains the default model; `make test` runs the tests.
# Extra arguments: make train ARGS="model.dropout=0.5"; make test ARGS="-k data".
VENV ?= .venv
PY := $(VENV)/bin/python
# A PTB copy beside the checkout (../shared/data/ptb) when there is one; else data/ptb, downloaded there.
CHARLM_DATA_DIR ?= $(if $(wildcard ../shared/data/ptb/ptb.char.train.txt),$(abspath ../shared/data/ptb),data/ptb)
export CHARLM_DATA_DIR

.PHONY: install train test tensorboard
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir outputs $(ARGS)
