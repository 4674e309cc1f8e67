# procgate — one command for the demo, one for all tests.
GO      ?= go
BIN     ?= bin/procgate
PKGS    := ./...
# Root tests need root; CI sets PROCGATE_REQUIRE_ROOT=1 so that a skipped
# root test fails instead of passing silently.
TESTFLAGS ?= -count=1 -timeout 15m

# What `procgate version` says: the last v* tag (1.2.0, or 1.2.0+3.gHASH
# after it: no '-', which rpm versions refuse), else 0.0.0+git.HASH; the
# commit gets -dirty for uncommitted changes. Both can be set: make VERSION=1.2.3
ifeq ($(origin VERSION),undefined)
VERSION := $(shell git describe --tags --match 'v[0-9]*' 2>/dev/null | sed 's/^v//; s/-/+/; s/-/./g')
ifeq ($(VERSION),)
VERSION := 0.0.0+git.$(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
endif
endif
COMMIT  ?= $(shell git describe --always --dirty --abbrev=12 --exclude '*' 2>/dev/null)
LDFLAGS := -X github.com/procgate/procgate/internal/version.version=$(VERSION) \
	-X github.com/procgate/procgate/internal/version.commit=$(COMMIT)

.PHONY: all build deps test test-short demo bench bench-quick generate check-generate fmt vet clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/procgate

# The Debian packages the tests and `make generate` need: installed when
# root, otherwise named (and the target fails).
deps:
	./.ci/deps

# All tests, root ones included (run as root). On a fresh Debian machine with
# Go, this is all the set-up: deps installs what the tests run.
test: deps
	$(GO) test $(TESTFLAGS) -p 1 $(PKGS)

# Unit tests only (no root needed).
test-short:
	$(GO) test -short -count=1 $(PKGS)

demo: build
	./$(BIN) demo

# Benchmarks against nftables and policy routing, in namespaces of their own
# (needs root): results, report and plots in bench/results/.
bench: build
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/bench ./bench
	./bin/bench

bench-quick: build
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/bench ./bench
	./bin/bench --quick --out bench/results/quick

# Regenerate the eBPF objects (needs clang, llvm, libbpf-dev).
generate:
	$(GO) generate ./bpf/... ./pinhole/...

# CI: regenerating must succeed and compile; objects are committed.
check-generate: generate
	$(GO) build ./bpf/... ./pinhole/...

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet $(PKGS)

clean:
	rm -rf bin
