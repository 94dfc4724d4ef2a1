#!/bin/sh
# shellcheck shell=dash
# Guest suite, text-patching (vm/selftest.rs): flips the kmem/kfree tracepoint (a static key:
# text_poke_bp on its site in kfree) FLIPS times while two loops fork, switch tasks and
# free memory; a guest whose vCPUs mishandle text patching oopses (docs/vm.md, "Text
# patching under TCG"). Writes the flips done to /share/out/flips.txt.
#
# Runs in the guest as /vm/script FLIPS. By hand:
#   cargo xtask vm run --no-tracer -- xtask/guest/suite/flip-kfree.sh 300
#
set -e
t=/sys/kernel/tracing
echo 0 > $t/options/record-cmd
# Processes come and go under ls: its complaints and status are not the point.
( while :; do ls /proc > /dev/null 2>&1 || :; done ) &
a=$!
( while :; do cat /proc/self/status > /dev/null || :; done ) &
b=$!
i=0
while [ $i -lt "$1" ]; do
	echo 1 > $t/events/kmem/kfree/enable
	echo 0 > $t/events/kmem/kfree/enable
	i=$((i + 1))
done
kill $a $b
echo "$i" > /share/out/flips.txt
echo "tracer-vm: suite: flipped the kfree tracepoint $i times"
