# The two commands a newcomer runs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Models load from local folders only; nothing may reach a model hub.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# pip: no version-check notice, no root-user warning around the install (the terminal is for people)
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_ROOT_USER_ACTION := ignore

.PHONY: install demo test ui mlflow-ui clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# OpenVINO's converter and NNCF send usage telemetry unless the machine opts out (this writes
	# ~/intel/openvino_telemetry); each event would fork a process beside LanceDB's threads
	$(VENV)/bin/opt_in_out --opt_out >/dev/null || echo "warning: could not opt out of OpenVINO telemetry" >&2
	touch $@

demo: install
	$(VENV)/bin/flywheel demo

test: install
	$(PY) -m pytest -q

ui: install
	$(VENV)/bin/flywheel ui

mlflow-ui: install
	$(VENV)/bin/flywheel mlflow-ui

clean:
	rm -rf .flywheel
