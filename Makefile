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

# make install: where things go (DESTDIR stages a tree, as packages do).
PREFIX      ?= /usr
SYSCONFDIR  ?= /etc
BINDIR      ?= $(PREFIX)/bin
MANDIR      ?= $(PREFIX)/share/man
DOCDIR      ?= $(PREFIX)/share/doc/procgate
UNITDIR     ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
BASHCOMPDIR ?= $(PREFIX)/share/bash-completion/completions
ZSHCOMPDIR  ?= $(PREFIX)/share/zsh/vendor-completions
FISHCOMPDIR ?= $(PREFIX)/share/fish/vendor_completions.d
# Man pages carry the date of the commit, not of the build.
SOURCE_DATE_EPOCH ?= $(shell git log -1 --format=%ct 2>/dev/null || date +%s)
# nfpm builds the packages; run at a fixed version (go run pkg@version), so
# that none of its dependencies enter the product's go.mod.
NFPM    ?= $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.48.0
ARCH    ?= $(shell $(GO) env GOARCH)

.PHONY: all build docs install package test-dist deps test test-kernels test-short demo bench bench-quick generate check-generate check-tidy fmt vet clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/procgate

# Man pages and shell completions, generated from the CLI by a build with
# the procgate_docs tag (cmd/procgate/docs_gen.go): not in the shipped binary.
docs:
	rm -rf bin/docs
	SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) CGO_ENABLED=0 $(GO) run -tags procgate_docs -ldflags "$(LDFLAGS)" ./cmd/procgate gen-docs bin/docs

# The binary, an example policy that denies nothing, policy.d/, the systemd
# units, the sysusers.d entry of the trace guard's group, man pages, shell
# completions. Files in SYSCONFDIR that exist are left alone. Without
# DESTDIR, as root, it also makes the guard group (dist/scripts/postinst).
install: build docs
	install -D -m 0755 $(BIN) $(DESTDIR)$(BINDIR)/procgate
	install -d -m 0755 $(DESTDIR)$(SYSCONFDIR)/procgate/policy.d
	install -d -m 0750 $(DESTDIR)$(SYSCONFDIR)/procgate/gateway
	for f in policy.yaml policy.d/README gateway/gateway.env.example; do \
		test -e $(DESTDIR)$(SYSCONFDIR)/procgate/$$f || install -m 0644 dist/$$f $(DESTDIR)$(SYSCONFDIR)/procgate/$$f || exit 1; \
	done
	install -d -m 0755 $(DESTDIR)$(UNITDIR)
	for u in procgate.service procgate-gateway.service; do \
		sed -e 's|/usr/bin/procgate|$(BINDIR)/procgate|g' -e 's|/etc/procgate|$(SYSCONFDIR)/procgate|g' \
			dist/$$u >$(DESTDIR)$(UNITDIR)/$$u && chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	install -D -m 0644 dist/sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/procgate.conf
	install -d -m 0755 $(DESTDIR)$(MANDIR)/man1
	for m in bin/docs/man/man1/*.1; do \
		gzip -9n <$$m >$(DESTDIR)$(MANDIR)/man1/$$(basename $$m).gz && chmod 0644 $(DESTDIR)$(MANDIR)/man1/$$(basename $$m).gz || exit 1; \
	done
	install -D -m 0644 bin/docs/completions/procgate.bash $(DESTDIR)$(BASHCOMPDIR)/procgate
	install -D -m 0644 bin/docs/completions/_procgate $(DESTDIR)$(ZSHCOMPDIR)/_procgate
	install -D -m 0644 bin/docs/completions/procgate.fish $(DESTDIR)$(FISHCOMPDIR)/procgate.fish
	install -D -m 0644 -t $(DESTDIR)$(DOCDIR) README.md SECURITY.md docs/policy.md docs/pinholes.md
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ]; then sh dist/scripts/postinst configure; fi

# bin/procgate_VERSION_ARCH.deb and bin/procgate-VERSION-1.ARCH.rpm, from a
# tree staged by make install (dist/nfpm.yaml).
package:
	rm -rf bin/pkgroot
	$(MAKE) install DESTDIR=$(CURDIR)/bin/pkgroot PREFIX=/usr SYSCONFDIR=/etc
	rm -f bin/*.deb bin/*.rpm
	VERSION=$(VERSION) ARCH=$(ARCH) $(NFPM) package --config dist/nfpm.yaml --packager deb --target bin/
	VERSION=$(VERSION) ARCH=$(ARCH) $(NFPM) package --config dist/nfpm.yaml --packager rpm --target bin/

# The Debian packages the tests and `make generate` need: installed when
# root, otherwise named (and the target fails).
deps:
	./.ci/deps

# All tests, root ones included (run as root). On a fresh Debian machine with
# Go, this is all the set-up: deps installs what the tests run.
test: deps
	$(GO) test $(TESTFLAGS) -p 1 $(PKGS)
	$(MAKE) test-dist

# What make install and make package ship: the DESTDIR tree runs, the units
# verify, the .deb holds the expected paths, modes and conffiles (dist/check).
test-dist:
	MAKE="$(MAKE)" ./dist/check

# The kernel tests on Debian's cloud kernels (6.1, 6.12; 5.10 for the
# record) under qemu TCG, as root: installs qemu, fetches the kernels with
# apt-get download (cached in build/kernels), boots each with the test
# binaries and writes the matrix to docs/kernels.md. Fails on any failure.
test-kernels:
	$(GO) run ./internal/vmtest/cmd/kernels

# Unit tests only (no root needed).
test-short:
	$(GO) test -short -count=1 $(PKGS)

# The demo is a build of its own (tag procgate_demo): its userspace
# WireGuard tunnel (wireguard-go) stays out of the shipped bin/procgate.
demo:
	CGO_ENABLED=0 $(GO) build -trimpath -tags procgate_demo -ldflags "$(LDFLAGS)" -o bin/procgate-demo ./cmd/procgate
	./bin/procgate-demo demo

# Benchmarks against nftables and policy routing, in namespaces of their own
# (needs root): results, report and plots in bench/results/.
bench: build
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/bench ./bench
	./bin/bench

bench-quick: build
	CGO_ENABLED=0 $(GO) build -trimpath -o bin/bench ./bench
	./bin/bench --quick --out bench/results/quick

# Regenerate the eBPF objects (needs clang, llvm, libbpf-dev). The
# committed objects are built with Debian 12's clang 14 (package clang, as
# .ci/deps installs it): another clang version emits other bytes, and
# check-generate then fails.
BPF_DIRS := bpf pinhole bench
# What generate writes: bench/ holds results too, which are no concern here.
BPF_GENERATED := bpf pinhole ':(glob)bench/*_bpfel.*'
generate:
	$(GO) generate $(addprefix ./,$(addsuffix /...,$(BPF_DIRS)))

# CI: the committed objects are the ones users build with, so the tests must
# run against exactly those: regenerating must change no byte and add no
# file (a new .c without its committed object is drift too).
check-generate: generate
	$(GO) build $(addprefix ./,$(addsuffix /...,$(BPF_DIRS)))
	@git diff --exit-code --stat -- $(BPF_GENERATED) || { echo "check-generate: regenerated BPF objects differ from the committed ones: commit the output of make generate (clang $$(clang -dumpversion))"; exit 1; }
	@untracked="$$(git ls-files --others --exclude-standard -- $(BPF_GENERATED))"; \
		if [ -n "$$untracked" ]; then echo "check-generate: generated files not committed:"; echo "$$untracked"; exit 1; fi

# CI: go.mod and go.sum are what go mod tidy makes of the code (a module
# the code no longer imports, or one it imports but go.mod lacks, fails).
check-tidy:
	@$(GO) mod tidy -diff || { echo "check-tidy: run go mod tidy and commit go.mod and go.sum"; exit 1; }

fmt:
	gofmt -w $$(git ls-files '*.go')

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet $(PKGS)
	$(GO) vet -tags procgate_demo ./cmd/procgate
	@! $(GO) list -deps ./cmd/procgate | grep '^go.etcd.io/etcd/server/' || { echo "the etcd server is in bin/procgate: only tests may import it (internal/etcdtest)"; exit 1; }

clean:
	rm -rf bin build
