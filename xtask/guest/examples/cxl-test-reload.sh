#!/bin/bash
# shellcheck shell=bash
# An example of a tester's own script in the guest's Debian userland (docs/vm.md, "Scripts
# in the guest"): reload cxl_test as ndctl's CXL tests do, then list the topology with
# ndctl's cxl tool and jq, and check it against sysfs. Run it with
#   cargo xtask vm run --kernel 7.2-src --topology cxl-test --userland debian \
#       -- xtask/guest/examples/cxl-test-reload.sh
# (under the tracer: every probe of the reload is judged). On a QEMU topology, without
# cxl_test, it skips the reload and checks the listing.
set -euo pipefail
: "${CXL:?run it with --userland debian, which sets CXL}"

if modinfo cxl_test > /dev/null 2>&1; then
	modprobe -r cxl_test
	modprobe cxl_test
	echo "cxl_test reloaded"
	udevadm settle 2> /dev/null || true
fi

sysfs_memdevs() { find /sys/bus/cxl/devices/ -maxdepth 1 -name 'mem*' | wc -l; }

# The memdevs appear asynchronously after the reload; wait for cxl list to settle.
for _ in $(seq 100); do
	got=$("$CXL" list -M | jq 'length')
	[ "$got" -gt 0 ] && [ "$got" = "$(sysfs_memdevs)" ] && break
	sleep 0.1
done
memdevs=$("$CXL" list -M | jq 'length')
buses=$("$CXL" list -B | jq 'length')
ports=$("$CXL" list -P | jq 'length')
echo "cxl list: $buses bus(es), $ports port(s), $memdevs memdev(s)"
sysfs=$(sysfs_memdevs)
[ "$memdevs" = "$sysfs" ] || { echo "cxl list shows $memdevs memdevs, sysfs $sysfs"; exit 1; }
"$CXL" list -M | jq -r '.[] | "\(.memdev) \(.serial // "-") \(.host)"'
