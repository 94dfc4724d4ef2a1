#!/bin/sh
# shellcheck shell=dash
# Guest suite, rp-workloads (vm/selftest.rs): after every rp workload, the topology must still
# be there, bound, and be the one the rp command line asks for. Writes what it found to
# /share/out/suite-topology.txt for the host.
#
# Runs in the guest as /vm/script. By hand:
#   cargo xtask vm run --no-tracer --workload memdev-bind -- xtask/guest/suite/topology-check.sh
#
# Names, not just counts, but not fixed ones: the workloads unbind and rebind the root and
# the ports, and a re-created port takes whatever id its ida hands out (root0 may come back
# as root2).
set -e
out=/share/out/suite-topology.txt
cxl=/sys/bus/cxl/devices
first() { for x in "$@"; do [ -e "$x" ] && { echo "$x"; return 0; }; done; return 1; }
check() { [ -n "$2" ] || { echo "tracer-vm: suite: no $1"; exit 1; }; echo "present $2" >> $out; }
check "root port" "$(first $cxl/root*)"
check "memdev" "$(first $cxl/mem*)"
check "port with a dport" "$(first $cxl/port*/dport*)"
check "endpoint port" "$(first $cxl/endpoint*)"
mem=$(first $cxl/mem*)
[ -e "$mem/driver" ] || { echo "tracer-vm: suite: ${mem##*/} has no driver"; exit 1; }
drv=$(readlink "$mem/driver")
[ "${drv##*/}" = cxl_mem ] || { echo "tracer-vm: suite: ${mem##*/} is bound to ${drv##*/}, not cxl_mem"; exit 1; }
echo "${mem##*/} driver cxl_mem" >> $out
echo "tracer-vm: suite: topology present"
