#!/bin/sh
# shellcheck shell=dash
# Guest suite, user-module (vm/selftest.rs): cxl_mem must come from updates/ (the --module
# copy): with the stock file removed, it reloads all the same. Writes
# /share/out/suite-module.txt.
#
# Runs in the guest as /vm/script, after booting with --module and --pmem. By hand:
#   cargo xtask vm run --no-tracer --pmem --module PATH/cxl_mem.ko.xz -- xtask/guest/suite/module-check.sh
#
set -e
dir=/lib/modules/$(uname -r)
grep -q '^updates/cxl_mem.ko:' "$dir/modules.dep"
rm -f "$dir/kernel/drivers/cxl/cxl_mem.ko"
rmmod cxl_mem
modprobe cxl_mem
[ -e /sys/module/cxl_mem ]
[ -e /sys/module/cxl_pmem ]
echo "cxl_mem reloaded from updates/" > /share/out/suite-module.txt
