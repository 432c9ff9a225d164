# understudy: build, lab guest image and the libvirt lab used by the integration tests.
#
#   make deps        install the Debian packages the lab needs (idempotent)
#   make images      build the lab test guest into build/guest/
#   make lab-up      start the lab (network namespace, bridge, libvirtd)
#   make lab-up HOSTS=3  the three-host lab instead: hosts h1 h2 h3 (own network and mount
#                    namespaces, libvirtd on TCP, virtlockd, etcd member), switch, management
#                    network, test client, shared storage; README "Three-host lab"
#   make lab-guest NAME=<n> IP=<a.b.c.d/prefix> [HOST=h2] [DISK=1] [DATA=1] [MEM=192] [ROLE=primary]
#                    DATA=1: a data disk (build/lab/disks/<n>-data.raw, ext4, created and
#                    formatted on first use; a LUN sdb on virtio-scsi) holding the guest's
#                    ledger; configs/lab.toml hands it over at failover
#                    HOST=h2: on that host of the three-host lab; its disks then live on the
#                    shared storage (/run/understudy-lab/shared/disks/), so another host can
#                    take them over
#   make lab-down    tear the lab down completely (whichever, one host or three)
#   make build       cargo build
#   make deb         the Debian package (cargo-deb, installed if missing) in target/debian/:
#                    binary, systemd unit, /etc/understudy/understudy.toml, man pages,
#                    completions, Grafana dashboard
#   make demo        a protected guest, its shadow, a crash and the client's view; cleans up
#   make bench       every benchmark (bench-profile, bench-failover)
#   make bench-failover  crash failovers vs cold restart vs managed-save restore (BENCH_TRIALS=50, p99)
#   make bench-profile   profile model vs baselines on synthetic and real traces, then the
#                        collectors' own CPU cost on three lab guests (needs the lab)
#   make bench-profile-model  only the model part (cargo bench --bench profile; no lab)
#   make bench-stateful  SIGKILL failovers of the ledger guest (data disk handed over) while a
#                        client appends every 10 ms, vs cold restart (BENCH_TRIALS=10)
#   make bench-replay    capture on/off client latency (p50/p99, same run), replay throughput,
#                        fidelity of an unchanged canary, standby verification
#   make bench-cost      host memory per protected VM and SIGKILL outage per standby way
#                        (paused, paused+shrunk, paused+shrunk+reclaim, saved, cold, pooled,
#                        paused+ksm, paused+shrunk+reclaim+ksm; BENCH_TRIALS=3,
#                        BENCH_WAYS=paused,pooled,... for some; BENCH_GUEST_MIB=192 and
#                        BENCH_GUEST_USE_MIB=0: a larger primary whose service holds memory,
#                        with the ways paused+warm[+shrunk[+reclaim]] when named;
#                        paused+tb-cache when named: TCG's code cache capped, BENCH_TB_CACHE_MIB)
#   make bench-soak      a CPU-saturated protected guest for SOAK_SECONDS (600): false failovers
#   make test-faults     only the fault-injection suite (also part of make test)
#   make soak-faults     the fault suite (faults::, the stateful fault tests; SOAK_FILTER, HOSTS=3
#                        for the cluster's) SOAK_ROUNDS times (20) under one lab: runs, failures
#                        and slowest recovery per test; logs in build/soak/ (SOAK_OUT=<dir>
#                        adds the rounds to an earlier run's, for a soak in chunks)
#   make fuzz        every AFL target for FUZZ_SECONDS each (60): executions, paths, crashes
#   make fuzz-check  replay every fuzz target's corpus and past crashes, then fuzz each
#                    briefly (FUZZ_CHECK_SECONDS, 5); part of make test
#   make fuzz-deps   cargo-afl (cargo install, once) and the fuzz crate's dependencies
#   make lint        cargo fmt --check and cargo clippy --all-targets -D warnings
#   make test        deps, lint, images, deb (the package test installs it), cargo build
#                    --tests, fuzz-check, then lab-up, cargo test
#                    inside the lab, lab-down (scripts/lab-run.sh, under the lab lock);
#                    then the three-host tests (three_hosts::) in a three-host lab
#                    (HOSTS=3 scripts/lab-run.sh), then lab-verify-down
#
# Scripts: lab-guest.sh xml|start (domain XML of a lab guest), lab-exec.sh (run a
# command inside the lab namespace), lab-run.sh (lab-up, a command, lab-down,
# all under the machine-wide lab lock), lab-smoke.sh (boot a guest and check it).
# Three-host lab: lab-host-exec.sh <host> <cmd> (a command on a host), lab-cut.sh
# <host> mgmt|switch down|up (pull a host's cable), fence_lab (the hosts' fence
# agent, fence-agents' conventions), /run/understudy-lab/cluster.env (the lab's
# addresses, libvirt URIs and etcd endpoints).

SHELL := /bin/bash

LAB_NS := understudy-lab
GUEST_DIR := build/guest

DEB_PACKAGES := qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu \
	libvirt-clients libvirt-dev pkg-config qemu-guest-agent busybox-static \
	linux-image-amd64 iproute2 curl cpio kmod gzip gcc libc6-dev make \
	util-linux passwd binutils xz-utils man-db e2fsprogs swtpm swtpm-tools \
	systemd dpkg-dev prometheus etcd-server etcd-client protobuf-compiler

# Newest installed kernel; evaluated when make starts, which is why `make test`
# runs `images` in a sub-make after `deps` may have installed it.
KERNEL := $(lastword $(shell ls /boot/vmlinuz-* 2>/dev/null | sort -V))
# A newly installed kernel may carry an older mtime than the last build: the
# stamp file changes whenever the chosen kernel does, which forces a rebuild.
KERNEL_STAMP := $(GUEST_DIR)/.kernel
ifneq ($(KERNEL),)
$(shell mkdir -p $(GUEST_DIR) && { [ "$$(cat $(KERNEL_STAMP) 2>/dev/null)" = "$(KERNEL)" ] || echo "$(KERNEL)" >$(KERNEL_STAMP); })
endif
GUEST_INPUTS := images/init images/workload.c images/httpd.c images/us-data images/build-guest.sh $(KERNEL) $(KERNEL_STAMP) \
	$(wildcard /usr/sbin/qemu-ga /usr/bin/busybox)

NAME ?=
IP ?=
MEM ?= 192
ROLE ?= primary
DISK ?=
DATA ?=
HOSTS ?= 1
HOST ?=

FUZZ_SECONDS ?= 60
FUZZ_CHECK_SECONDS ?= 5
SOAK_ROUNDS ?= 20

.PHONY: deps lint images lab-up lab-down lab-guest build deb test demo demo-cluster bench bench-failover bench-cluster bench-hostloss bench-profile bench-profile-model bench-soak bench-stateful bench-replay test-faults bench-cost \
	soak-faults fuzz fuzz-check fuzz-deps

# Installing one package can remove another: a machine that came with a newer qemu-utils (from
# backports) loses it when Debian's qemu-system-x86 goes in, because their versions conflict.
# So after installing, check every package again and install what went missing; fail if a
# second round still leaves one out.
deps:
	@missing() { \
		for p in $(DEB_PACKAGES); do \
			dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || echo "$$p"; \
		done; \
	}; \
	todo=$$(missing); \
	if [ -z "$$todo" ]; then \
		echo "deps: all Debian packages present"; \
	else \
		echo "deps: installing" $$todo; \
		apt-get -o DPkg::Lock::Timeout=600 update && DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends $$todo || exit 1; \
		for round in 1 2; do \
			todo=$$(missing); \
			[ -n "$$todo" ] || break; \
			echo "deps: missing after installing (removed by a conflicting package?):" $$todo; \
			DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends $$todo || exit 1; \
		done; \
		todo=$$(missing); \
		[ -z "$$todo" ] || { echo "deps: still missing:" $$todo >&2; exit 1; }; \
		echo "deps: all Debian packages present"; \
	fi
	@command -v cargo >/dev/null || { \
		echo "deps: cargo not found in PATH; install a Rust toolchain (https://rustup.rs) and retry" >&2; \
		exit 1; }

images: $(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initramfs.cpio.gz

$(GUEST_DIR)/vmlinuz $(GUEST_DIR)/initramfs.cpio.gz &: $(GUEST_INPUTS)
	@[ -n "$(KERNEL)" ] || { echo "images: no /boot/vmlinuz-* found; run make deps" >&2; exit 1; }
	images/build-guest.sh $(KERNEL) $(GUEST_DIR)

lab-up:
	HOSTS=$(HOSTS) scripts/lab-up.sh

lab-down:
	scripts/lab-down.sh

lab-guest: images
	@[ -n "$(NAME)" ] && [ -n "$(IP)" ] || { echo "usage: make lab-guest NAME=<n> IP=<a.b.c.d/prefix> [HOST=h2] [DISK=1] [DATA=1] [MEM=192] [ROLE=primary]" >&2; exit 1; }
	@set -- --mem '$(MEM)' --role '$(ROLE)'; \
	disks="$$PWD/build/lab/disks"; \
	if [ -n "$(HOST)" ]; then \
		set -- "$$@" --host '$(HOST)'; \
		disks=/run/understudy-lab/shared/disks; \
	fi; \
	if [ -n "$(DISK)" ] && [ "$(DISK)" != 0 ]; then \
		set -- "$$@" --disk "$$disks/$(NAME).qcow2" --create-disk; \
	fi; \
	if [ -n "$(DATA)" ] && [ "$(DATA)" != 0 ]; then \
		set -- "$$@" --data "$$disks/$(NAME)-data.raw" --create-data --data-bus scsi; \
	fi; \
	scripts/lab-guest.sh start '$(NAME)' '$(IP)' "$$@"

build:
	cargo build

CARGO_DEB_VERSION := 3.8.0

# Man pages and completions come from the CLI definition (hidden `gen-man`, `gen-completions`).
deb:
	@cargo deb --version 2>/dev/null | grep -qF '$(CARGO_DEB_VERSION)' || \
		cargo install cargo-deb --locked --version $(CARGO_DEB_VERSION)
	cargo build --release --bin understudy
	rm -rf build/deb
	target/release/understudy gen-man build/deb/man
	target/release/understudy gen-completions build/deb/completions
	cargo deb --no-build --strip
# The house style, enforced: CI runs it through `make test`.
lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	cargo fmt --check --manifest-path fuzz/Cargo.toml
	cargo clippy --manifest-path fuzz/Cargo.toml --target-dir target --all-targets -- -D warnings

# The tests run inside the lab namespace (scripts/lab-exec.sh: `ip netns exec`
# plus the host's cgroup mounts) so they reach the guests. scripts/lab-run.sh
# holds the machine-wide lab lock from lab-up to lab-down (another make test,
# in any worktree, waits), always runs lab-down, and exits with the tests'
# status. The tests are built first, outside the lab and its lock.
test:
	$(MAKE) deps
	$(MAKE) lint
	$(MAKE) images
	$(MAKE) deb
	cargo build --tests
	$(MAKE) fuzz-check
	scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline -- --test-threads=1 --skip three_hosts::
	HOSTS=3 scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline --test lab -- --test-threads=1 three_hosts::
	scripts/lab-verify-down.sh

# The demo and the failover bench need the lab; lab-run.sh takes it down afterwards, under the
# machine-wide lab lock.
demo:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release
	scripts/lab-run.sh scripts/demo.sh

# Three hosts, a guest whose shadow stands by on another host, a drain, a crash promoted across
# hosts (scripts/demo-cluster.sh).
demo-cluster:
	$(MAKE) deps
	$(MAKE) images
	cargo build
	HOSTS=3 scripts/lab-run.sh scripts/demo-cluster.sh

bench: bench-profile bench-failover

bench-failover:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench failover

# The model part runs on its own too (no lab): make bench-profile-model.
bench-profile: bench-profile-model
	$(MAKE) deps
	$(MAKE) images
	cargo bench --no-run --bench collector
	scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench collector

bench-profile-model:
	cargo bench --bench profile

bench-stateful:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench stateful

# Cross-host crash failovers (BENCH_TRIALS, default 10) and local ones in the same run, on the
# three-host lab: median/p95/max, build/bench/cluster.json and .svg.
bench-cluster:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	HOSTS=3 scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench cluster

# Capture on/off client latency (same run), replay throughput and fidelity on an unchanged
# canary, standby verification: build/bench/replay.json (BENCH_REQUESTS, default 3000).
bench-replay:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench replay

# Host losses (BENCH_TRIALS power-offs, default 5, with a fence device and lease-only) and a
# cold start on a surviving host in the same run, on the three-host lab: median/p95/max,
# build/bench/hostloss.json and .svg.
bench-hostloss:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	HOSTS=3 scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench hostloss

bench-cost:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench cost

bench-soak:
	$(MAKE) deps
	$(MAKE) images
	cargo build --release --benches
	scripts/lab-run.sh scripts/lab-exec.sh cargo bench --offline --bench soak

test-faults:
	$(MAKE) deps
	$(MAKE) images
	cargo build --tests
	scripts/lab-run.sh scripts/lab-exec.sh cargo test --offline --test lab -- --test-threads=1 faults::

# The fault suite SOAK_ROUNDS times in one lab (scripts/soak-faults.sh): each test runs alone,
# every run's log is kept under build/soak/, and the summary gives per test the runs, the
# failures and the slowest recovery.
soak-faults:
	$(MAKE) deps
	$(MAKE) images
	cargo build --tests
	SOAK_ROUNDS=$(SOAK_ROUNDS) scripts/lab-run.sh scripts/lab-exec.sh scripts/soak-faults.sh

# Fuzzing (fuzz/, see its targets file). cargo-afl builds AFL++'s runtime when it is installed
# (make and gcc, from deps); the fuzz crate is its own workspace with its own Cargo.lock.
fuzz-deps:
	@command -v cargo-afl >/dev/null || { \
		echo "fuzz-deps: installing cargo-afl"; \
		cargo install cargo-afl --locked; }
	cargo fetch --manifest-path fuzz/Cargo.toml

fuzz: fuzz-deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh

# A parser regression on a known input fails here: first the replay of every target's seeds,
# kept corpus and past crashes (plain cargo test, sharing target/ with the main build), then a
# few seconds of AFL per target, built without optimisation (much faster to build).
fuzz-check: fuzz-deps
	cargo test --offline --manifest-path fuzz/Cargo.toml --target-dir target
	FUZZ_QUICK=1 FUZZ_SECONDS=$(FUZZ_CHECK_SECONDS) FUZZ_OUT=build/fuzz-check scripts/fuzz.sh
