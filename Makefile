# macvm: containerd-shim-macvm-v1. Everything built or downloaded goes to _output/.
#
# The targets a newcomer uses: `make demo` and `make test` (the README's two
# commands wrap them with hack/setup.sh, which installs what they need).

OUT        := $(CURDIR)/_output
BIN        := $(OUT)/bin
GOARCH     ?= $(shell go env GOARCH)
KERNEL_DIR := $(OUT)/kernel
BOOT_DIR   := $(OUT)/boot

.PHONY: all build shim agent agent-all initrd kernel kernel-minimal boot generate check-generated \
	vet fmt-check check-darwin test test-unit test-vm test-e2e containerd demo install clean

all: build

build: shim boot

# On macOS the shim creates its VM in-process and must carry the
# com.apple.security.virtualization entitlement; go test and go run binaries
# are signed the same way through the -exec wrapper (GOFLAGS applies it to
# the commands that know -exec).
ENTITLEMENTS := $(CURDIR)/hack/macvm.entitlements
ifeq ($(shell uname -s),Darwin)
export GOFLAGS += -exec=$(CURDIR)/hack/sign-exec
endif

shim:
	go build -o $(BIN)/containerd-shim-macvm-v1 ./cmd/containerd-shim-macvm-v1
ifeq ($(shell uname -s),Darwin)
	codesign -f --entitlements $(ENTITLEMENTS) -s - $(BIN)/containerd-shim-macvm-v1
endif

# The guest agent is PID 1 in the VM: static, pure Go, for the guest's arch.
agent:
	CGO_ENABLED=0 GOOS=linux GOARCH=$(GOARCH) go build -trimpath -ldflags '-s -w' -o $(BIN)/guest-agent ./guest-agent

agent-all:
	CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -o $(BIN)/linux-amd64/guest-agent ./guest-agent
	CGO_ENABLED=0 GOOS=linux GOARCH=arm64 go build -trimpath -o $(BIN)/linux-arm64/guest-agent ./guest-agent

# Debian's generic kernel (it has 9p as modules), fetched through apt.
kernel:
	hack/fetch-kernel.sh $(KERNEL_DIR)/debian

# The minimal kernel (everything built in) from Debian's linux-source; ~20 min on 2 cores.
kernel-minimal:
	hack/build-minimal-kernel.sh $(KERNEL_DIR)/minimal

initrd: agent
	go run ./cmd/macvm-mkinitrd -agent $(BIN)/guest-agent -modules $(KERNEL_DIR)/debian/modules -o $(BOOT_DIR)/initrd.img
	ln -sf $(KERNEL_DIR)/debian/vmlinux $(BOOT_DIR)/vmlinux

# Boot files the shim and the tests use: _output/boot/{vmlinux,initrd.img}.
boot: kernel initrd

generate:
	hack/protoc.sh

# Fails when the committed generated code differs from what `make generate` produces.
check-generated: generate
	git diff --exit-code -- pkg/guest/api || (echo 'generated code is stale: run make generate and commit' >&2; exit 1)

vet:
	go vet ./...
	GOOS=linux GOARCH=arm64 go vet ./guest-agent/...

# The macOS backend is cgo + Objective-C and cannot be built here; type-check
# the shim's darwin package graph (vz included) for both Mac architectures.
# The guest agent and e2e are Linux-only by design and not part of it.
DARWIN_PKGS := ./cmd/... ./pkg/... ./tools/...
check-darwin:
	go test -count=1 ./tools/check-darwin
	go run ./tools/check-darwin -arch arm64,amd64 $(DARWIN_PKGS)

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); [ -z "$$out" ] || (echo "gofmt needed: $$out" >&2; exit 1)

test: check-generated fmt-check vet check-darwin test-unit test-vm test-e2e

# pkg/vm's tests boot the Debian kernel (with a test init), so they need `make kernel` (cached after the first run).
test-unit: kernel
	MACVM_KERNEL=$(KERNEL_DIR)/debian/vmlinux go test -count=1 ./pkg/... ./guest-agent/... ./cmd/...

# Real VMs under QEMU with the guest agent: needs `make boot`.
test-vm: boot
	MACVM_BOOT_DIR=$(BOOT_DIR) go test -count=1 -timeout 20m -v ./e2e/guest/...

# Real containerd and ctr driving the shim: needs `make boot containerd shim`.
test-e2e: boot shim containerd
	MACVM_BOOT_DIR=$(BOOT_DIR) MACVM_BIN_DIR=$(BIN) go test -count=1 -timeout 30m -v ./e2e/containerd/...

containerd:
	hack/build-containerd.sh $(BIN)

demo: boot shim containerd
	hack/demo.sh

# Benchmarks side by side with runc (issue 5): a private containerd runs both runtimes,
# interleaved; results go to bench/results/ (DATE-MACHINE.md/.json and latest.md).
# Not part of `make test`. `make boot-minimal` first adds the minimal-kernel variant.
.PHONY: bench bench-full
bench: boot shim containerd
	go test -count=1 ./bench/...
	go run ./bench/cmd/macvm-bench -mode quick -bin $(BIN) -boot $(BOOT_DIR) -boot-minimal $(OUT)/boot-minimal

bench-full: boot shim containerd
	go test -count=1 ./bench/...
	go run ./bench/cmd/macvm-bench -mode full -bin $(BIN) -boot $(BOOT_DIR) -boot-minimal $(OUT)/boot-minimal

install: build
	hack/install.sh

clean:
	rm -rf $(OUT)
