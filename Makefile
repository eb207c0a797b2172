# kpr: build, generate, test, demo, bench. `make test` and `make demo` install what they need.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell hack/version.sh)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
# The commit's date unless SOURCE_DATE_EPOCH says otherwise, so a rebuild is identical.
BUILD_DATE ?= $(shell date -u -d @$${SOURCE_DATE_EPOCH:-$$(git show -s --format=%ct HEAD 2>/dev/null || date +%s)} +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS := -X github.com/kpr-dev/kpr/node/agent.Version=$(VERSION) -X github.com/kpr-dev/kpr/node/agent.Commit=$(COMMIT) -X github.com/kpr-dev/kpr/node/agent.BuildDate=$(BUILD_DATE)
# Debian's and RPM's names of the build machine's architecture.
DEB_ARCH := $(shell dpkg --print-architecture 2>/dev/null || echo amd64)
K8S_BINDIR = $(shell hack/k8s.sh bindir)

.PHONY: all build generate check-generate deps k8s-bins test unit e2e demo bench bench-clusterip bench-nodeport bench-socket package clean

all: build

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/kpr ./cmd/kpr

# Rebuild the BPF objects and their Go bindings from C (needs clang).
generate:
	$(GO) generate ./bpf/

# Fail if the committed objects and bindings differ from what the C sources build.
check-generate: deps
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	cp -a bpf $$tmp/bpf.before; \
	$(GO) generate ./bpf/ ; \
	if ! diff -r $$tmp/bpf.before bpf >/dev/null; then \
		diff -r $$tmp/bpf.before bpf | head -20; \
		echo "check-generate: bpf/ differs from the committed files; run 'make generate' and commit"; exit 1; fi

deps:
	@hack/deps.sh

# kube-apiserver, kube-proxy and kubeadm from the pinned k8s.io/kubernetes, cached outside the repo.
k8s-bins:
	@hack/k8s.sh bins >/dev/null

test: deps k8s-bins check-generate package
	$(GO) vet ./...
	KPR_E2E=1 KPR_K8S_BINDIR=$(K8S_BINDIR) KPR_PACKAGE_DIR=$(CURDIR)/dist $(GO) test -count=1 -timeout 30m ./...

unit:
	$(GO) test ./node/... ./kubeadm/...

e2e: deps k8s-bins
	KPR_E2E=1 KPR_K8S_BINDIR=$(K8S_BINDIR) $(GO) test -count=1 -v -timeout 20m ./test/e2e/

demo: deps k8s-bins
	KPR_K8S_BINDIR=$(K8S_BINDIR) $(GO) run ./test/cmd/demo

# The benchmarks: kpr against upstream kube-proxy (nftables, iptables) and the direct path.
# bench-clusterip: a pod to a ClusterIP at 1 and 10,000 Services (docs/bench/clusterip.md);
# bench-nodeport: a host outside the cluster to a NodePort whose pods are on another node,
# through kpr's tc programs and kpr with XDP (docs/bench/nodeport.md). Each prints its table.
# BENCH_FLAGS=-quick for a short subset (writes nothing); BENCH_FLAGS=-readme also rewrites the
# README's part; BENCH_SCALES, BENCH_PATHS and BENCH_ROUNDS select parts (see test/cmd/bench).
# bench-socket: what kpr's socket programs add to the life of one connected socket, TCP and UDP,
# to a backend and to a VIP (BenchmarkConnectedSocket in bpf/; figures in docs/bench/socket.md).
bench: bench-clusterip bench-nodeport bench-socket

bench-socket: deps
	$(GO) test -run '^$$' -bench ConnectedSocket -benchtime 100000x -count 5 ./bpf/

bench-clusterip bench-nodeport: bench-%: deps k8s-bins
	KPR_K8S_BINDIR=$(K8S_BINDIR) $(GO) run ./test/cmd/bench -scenario $* $(BENCH_FLAGS)

# kpr_<version>_<arch>.deb and kpr-<version>.<arch>.rpm in dist/, with nfpm (hack/nfpm.sh).
package:
	rm -rf dist && mkdir -p dist
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" -o dist/kpr ./cmd/kpr
	dist/kpr config defaults > dist/kpr.yaml
	mkdir -p dist/man && dist/kpr man dist/man && gzip -n -9 dist/man/*.8
	hack/changelog.sh '$(VERSION)-1' | gzip -n -9 > dist/changelog.Debian.gz
	nfpm=$$(hack/nfpm.sh) && for p in deb rpm; do \
		VERSION='$(VERSION)' ARCH='$(DEB_ARCH)' SOURCE_DATE_EPOCH=$$(git show -s --format=%ct HEAD) \
			$$nfpm package --config nfpm.yaml --packager $$p --target dist/ || exit 1; done
	ls -l dist/*.deb dist/*.rpm

clean:
	rm -rf bin dist
