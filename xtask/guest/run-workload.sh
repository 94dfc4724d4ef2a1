#!/bin/sh
# shellcheck shell=dash
# /vm/run-workload NAME CYCLES: one built-in workload (workloads.sh) with its checks, from the
# topology as it is now.
#
# Runs in the guest, for scripts (docs/vm.md, "Scripts in the guest"): e.g.
# `cargo xtask vm run --no-tracer --no-cxl-at-boot -- sh -c '. /vm/config; . /vm/lib.sh;
# load_modules && topology_ready 60 && /vm/run-workload acpi-unbind 3'`.
# shellcheck source=config.example
. /vm/config
# shellcheck source=lib.sh
. /vm/lib.sh
# shellcheck source=workloads.sh
. /vm/workloads.sh
[ $# = 2 ] || fail "usage: /vm/run-workload NAME CYCLES"
run_workload "$1" "$2"
