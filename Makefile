# macvm: containerd-shim-macvm-v1. Everything built or downloaded goes to _output/.
#
# The targets a newcomer uses: `make demo` and `make test` (the README's two
# commands wrap them with hack/with-deps, which installs what they need).

OUT        := $(CURDIR)/_output
BIN        := $(OUT)/bin
GOARCH     ?= $(shell go env GOARCH)
KERNEL_DIR := $(OUT)/kernel
BOOT_DIR   := $(OUT)/boot

.PHONY: all build shim agent agent-all initrd kernel kernel-minimal boot-minimal kernel-smoke boot generate check-generated \
	vet fmt-check check-darwin boot-macos kernel-debs test-macos-kernel test test-unit test-vm test-e2e test-cri containerd \
	cri-tools cni critest test-critest nerdctl demo install clean pool-stop

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

# On Linux the shim needs no cgo: a static binary maps no libc and no
# dynamic loader, 1.7 MiB less RSS per shim (make bench). On macOS the vz
# backend is cgo.
ifeq ($(shell uname -s),Darwin)
SHIM_CGO := 1
else
SHIM_CGO := 0
endif

# The shim is built against containerd's task API without its gRPC stubs
# (hack/shim-modfile.sh says why: ~3.8 MiB less RSS per running shim);
# -s -w only make the file smaller (symbols and DWARF are never mapped).
# macvm-usernet (the user-space network of VMs without a network namespace)
# goes beside the shim, where the shim looks for it.
SHIM_MOD := $(OUT)/shim-mod
shim:
	hack/shim-modfile.sh $(SHIM_MOD)
	CGO_ENABLED=$(SHIM_CGO) go build -modfile=$(SHIM_MOD)/go.mod -ldflags '-s -w' -o $(BIN)/containerd-shim-macvm-v1 ./cmd/containerd-shim-macvm-v1
	CGO_ENABLED=0 go build -o $(BIN)/macvm-usernet ./cmd/macvm-usernet
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

# Boot files with the minimal kernel and a module-free initramfs: what benchmarks
# should use (MACVM_BOOT_DIR=$(OUT)/boot-minimal). See docs/kernel.md.
boot-minimal: kernel-minimal agent
	go run ./cmd/macvm-mkinitrd -agent $(BIN)/guest-agent -o $(OUT)/boot-minimal/initrd.img
	ln -sf $(KERNEL_DIR)/minimal/vmlinux $(OUT)/boot-minimal/vmlinux

# Boots the minimal and the Debian kernel with a smoke-test /init: checks what the
# agent needs is there and prints median boot times.
kernel-smoke: kernel kernel-minimal
	hack/boot-kernel.sh -n 5 $(KERNEL_DIR)/minimal $(KERNEL_DIR)/debian

initrd: agent
	go run ./cmd/macvm-mkinitrd -agent $(BIN)/guest-agent -modules $(KERNEL_DIR)/debian/modules -o $(BOOT_DIR)/initrd.img
	ln -sf $(KERNEL_DIR)/debian/vmlinux $(BOOT_DIR)/vmlinux

# Boot files the shim and the tests use: _output/boot/{vmlinux,initrd.img}.
boot: kernel initrd

# Boot files for Virtualization.framework, from a Debian kernel package, in pure
# Go (runs on a Mac): KERNEL_DEB=.../linux-image-*-cloud-arm64_*.deb (see
# docs/macos.md; on Linux `make kernel-debs` fetches it through apt). The agent
# is cross-built for VZ_ARCH. On macOS the files go where the shim looks
# (_output/boot); elsewhere to _output/boot-vz, beside the QEMU boot files.
VZ_ARCH    ?= arm64
KERNEL_DEB ?= $(firstword $(wildcard $(OUT)/debs/linux-image-*-cloud-$(VZ_ARCH)_*_$(VZ_ARCH).deb))
ifeq ($(shell uname -s),Darwin)
VZ_BOOT_DIR ?= $(BOOT_DIR)
else
VZ_BOOT_DIR ?= $(OUT)/boot-vz
endif
boot-macos:
	@[ -n "$(KERNEL_DEB)" ] || { echo "set KERNEL_DEB to Debian's linux-image-*-cloud-$(VZ_ARCH) package (docs/macos.md)" >&2; exit 1; }
	CGO_ENABLED=0 GOOS=linux GOARCH=$(VZ_ARCH) go build -trimpath -ldflags '-s -w' -o $(BIN)/linux-$(VZ_ARCH)/guest-agent ./guest-agent
	go run ./cmd/macvm-kernel deb -i $(KERNEL_DEB) -o $(KERNEL_DIR)/vz-$(VZ_ARCH)
	go run ./cmd/macvm-mkinitrd -agent $(BIN)/linux-$(VZ_ARCH)/guest-agent -modules $(KERNEL_DIR)/vz-$(VZ_ARCH)/modules \
		-first virtio_pci,vmw_vsock_virtio_transport -o $(VZ_BOOT_DIR)/initrd.img
	ln -sf $(KERNEL_DIR)/vz-$(VZ_ARCH)/$(if $(filter arm64,$(VZ_ARCH)),Image,bzImage) $(VZ_BOOT_DIR)/vmlinux

# Debian's arm64 cloud and amd64 generic kernel packages, for the tests of `macvm-kernel deb`.
kernel-debs:
	hack/fetch-kernel-debs.sh $(OUT)/debs

# `macvm-kernel deb` on the real packages: the arm64 Image has its magic and the vz
# modules and boots with the arm64 agent under qemu-system-aarch64; the amd64 result
# boots under QEMU.
test-macos-kernel: kernel-debs
	MACVM_DEB_DIR=$(OUT)/debs go test -count=1 -timeout 15m -v -run RealDeb ./cmd/macvm-kernel

generate:
	hack/protoc.sh
	cd guest-agent/internal/seccomp && go generate .

# Fails when the committed generated code differs from what `make generate` produces.
check-generated: generate
	git diff --exit-code -- pkg/guest/api guest-agent/internal/seccomp/zsyscalls.go || (echo 'generated code is stale: run make generate and commit' >&2; exit 1)

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

test: check-generated fmt-check vet agent-all check-darwin test-macos-kernel test-unit test-vm test-e2e test-cri test-critest

# pkg/vm's tests boot the Debian kernel (with a test init), so they need `make kernel` (cached after the first run).
test-unit: kernel
	MACVM_KERNEL=$(KERNEL_DIR)/debian/vmlinux go test -count=1 ./pkg/... ./guest-agent/... ./cmd/... ./bench/... ./kernel/...

# Real VMs under QEMU with the guest agent: needs `make boot`.
test-vm: boot
	MACVM_BOOT_DIR=$(BOOT_DIR) go test -count=1 -timeout 20m -v ./e2e/guest/...

# Real containerd and ctr driving the shim: needs `make boot containerd shim`.
test-e2e: boot shim containerd cni nerdctl
	MACVM_BOOT_DIR=$(BOOT_DIR) MACVM_BIN_DIR=$(BIN) go test -count=1 -timeout 30m -v ./e2e/containerd/...

containerd:
	hack/build-containerd.sh $(BIN)

# crictl, critest and the local registry, pinned (cri-tools v1.34.0); cached by version.
cri-tools:
	hack/build-cri-tools.sh $(BIN)

# The CNI reference plugins (bridge, host-local, loopback, portmap, ...), pinned; cached by version.
cni:
	hack/build-cni-plugins.sh $(BIN)/cni

# nerdctl v2.2.0 for the network e2e tests (nerdctl run -p on its default bridge network).
nerdctl:
	hack/build-nerdctl.sh $(BIN)

# Kubernetes' view: containerd's CRI plugin driven by crictl, pods on runc and on macvm (docs/kubernetes.md).
test-cri: boot shim containerd cri-tools cni
	MACVM_BOOT_DIR=$(BOOT_DIR) MACVM_BIN_DIR=$(BIN) go test -count=1 -timeout 30m -v ./e2e/cri/...

# A focused subset of critest (e2e/critest's defaultFocus) on both handlers, for make test.
test-critest: boot shim containerd cri-tools cni
	MACVM_BOOT_DIR=$(BOOT_DIR) MACVM_BIN_DIR=$(BIN) go test -count=1 -timeout 40m -v -run 'TestCompare|TestCritest' ./e2e/critest/

# cri-tools' critest, the whole suite, on the runc and macvm handlers; writes the comparison to docs/critest.md
# and fails on a spec that passes on runc but not on macvm without a reason in e2e/critest's Differences.
critest: boot shim containerd cri-tools cni
	MACVM_CRITEST_FOCUS= MACVM_CRITEST_TIMEOUT=110m MACVM_CRITEST_REPORTS=$(OUT)/critest MACVM_CRITEST_DOC=$(CURDIR)/docs/critest.md \
		MACVM_BOOT_DIR=$(BOOT_DIR) \
		MACVM_BIN_DIR=$(BIN) go test -count=1 -timeout 240m -v -run TestCritest ./e2e/critest/

demo: boot shim containerd
	hack/demo.sh

# Benchmarks side by side with runc (issue 5): a private containerd runs both runtimes,
# interleaved; results go to bench/results/ (DATE-MACHINE.md/.json/.png and latest.md).
# BENCH_ARGS passes more flags, e.g. BENCH_ARGS=-readme=README.md to update its table.
# Not part of `make test`. `make boot-minimal` first adds the minimal-kernel variant.
.PHONY: bench bench-full bench-minimal-initrd
bench: boot shim containerd bench-minimal-initrd
	go test -count=1 ./bench/...
	go run ./bench/cmd/macvm-bench -mode quick -bin $(BIN) -boot $(BOOT_DIR) -boot-minimal $(OUT)/boot-minimal $(BENCH_ARGS)

bench-full: boot shim containerd bench-minimal-initrd
	go test -count=1 ./bench/...
	go run ./bench/cmd/macvm-bench -mode full -bin $(BIN) -boot $(BOOT_DIR) -boot-minimal $(OUT)/boot-minimal $(BENCH_ARGS)

# The minimal-kernel variant's initrd carries the agent: rebuild it with this tree's agent whenever the minimal
# kernel was built once (an agent from an older tree would be measured against this shim).
bench-minimal-initrd: agent
	if [ -e $(KERNEL_DIR)/minimal/vmlinux ]; then $(MAKE) boot-minimal; fi

install: build
	hack/install.sh

# Stops the warm-start pool daemon (warm_start = "pool") of TEMPLATE_DIR by the pid in its pidfile (SIGTERM, SIGKILL
# after 10 s: the VMs it handed out stay with their containers) and kills the VMs it kept ready, also those a killed
# daemon left. The daemon also exits by itself when idle. POOL_SHIM is the shim binary that does it.
TEMPLATE_DIR ?= /var/lib/macvm/templates
POOL_SHIM ?= $(BIN)/containerd-shim-macvm-v1
pool-stop:
	$(POOL_SHIM) macvm-pool-stop $(TEMPLATE_DIR)

clean:
	rm -rf $(OUT)
