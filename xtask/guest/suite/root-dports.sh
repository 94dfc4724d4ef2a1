#!/bin/sh
# shellcheck shell=dash
# Guest suite, the traced rp cases (vm/traced.rs): how many dports the CXL root has (one per
# host bridge); each is erased without the port lock at every cxl_acpi unbind, which the
# host multiplies out. Writes /share/out/root-dports.txt.
#
# Runs in the guest as /vm/script, after the workloads (inside the traced run). By hand:
#   cargo xtask vm run --no-tracer -- xtask/guest/suite/root-dports.sh
#
set -e
n=0
for d in /sys/bus/cxl/devices/root0/dport*; do [ -e "$d" ] && n=$((n + 1)); done
echo "$n" > /share/out/root-dports.txt
echo "tracer-vm: suite: the CXL root has $n dport(s)"
