# Two commands on a fresh machine: `make demo` and `make test`. Each creates or reuses .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo quick-demo avatar test test-lib test-platform test-quick bench install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# the main job: dataset -> Ray Data -> Ray Train + DeepSpeed -> MLflow -> Ray Serve -> evaluation (~30 min)
demo: install
	$(PY) jobs/demo.py --out out/demo

# seconds: the shipped learned model (letstalk/models/demo) renders a drawn portrait + speech-like audio
quick-demo: install
	$(PY) -m letstalk.cli demo --out out/quick-demo

# one real person's re-voicing avatar from 30 s of footage (their own footage, the lower face regenerated
# from Whisper features), measured on its held-out seconds (docs/avatar.md); pictures and videos under out/;
# needs the real-media folder (LETSTALK_REALDATA, else ../shared/realdata): ~45 min per person on 2 cores
REALDATA ?= $(or $(LETSTALK_REALDATA),../shared/realdata)
avatar: install
	$(PY) jobs/avatar.py --video $(REALDATA)/videos/styletalk_obama2.mp4 --holdout-seconds 6 --out out/avatar-obama2
	$(PY) jobs/avatar.py --video $(REALDATA)/videos/mimictalk_german_anchor_20s.mp4 --holdout-seconds 6 --out out/avatar-anchor

# every case but the `heavy` tier (the whole-job runs of minutes each: `make test-heavy`)
test: install
	$(PY) -m pytest -q -m "not heavy" --durations=15 $(PYTEST_ARGS)

# the heavy tier alone: the multinode cluster, the reduced demo, distillation and avatar jobs, fresh-venv installs
test-heavy: install
	$(PY) -m pytest -q -m heavy --durations=15 $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

# the inner loop: the model library alone (no Ray), tests/lib (under 2 min on 2 cores)
test-lib: install
	$(PY) -m pytest -q tests/lib $(PYTEST_ARGS)

# the platform on a local Ray (tests/platform), then the end-to-end runs (tests/e2e) come with `make test`
test-platform: install
	$(PY) -m pytest -q tests/platform $(PYTEST_ARGS)

test-quick: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) bench/model.py

clean:
	rm -rf out .pytest_cache
