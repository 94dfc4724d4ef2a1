#!/bin/sh
# shellcheck shell=dash
# Guest suite, bad-environments (vm/reliability.rs): `tracer` without the CXL modules, with
# --wait-for-cxl while the script loads them, without BTF, with a --use-site the kernel
# lacks or refuses to probe, and with --record on a full disk. Writes `NAME key=value` lines
# to /share/out/environment.txt and keeps every output beside it; the host judges them.
#
# Runs in the guest as /vm/script, booted without the CXL modules. By hand:
#   cargo xtask vm run --kernel 7.2 --manual-tracer --no-cxl-at-boot -- xtask/guest/suite/environment.sh
#
# shellcheck source=../config.example
. /vm/config
# shellcheck source=../lib.sh
. /vm/lib.sh
T=/bin/tracer
out=/share/out
res=$out/environment.txt
: > $res
note() { echo "$* ms=$(now_ms)" >> $res; say "environment: $* uptime_ms=$(now_ms)"; }

$T run -- true > /dev/null 2> $out/no-cxl.log
note "no-cxl exit=$?"
$T doctor --no-attach > $out/no-cxl-doctor.txt 2>&1
note "no-cxl-doctor exit=$?"
mkdir -p /tmp/empty-btf
$T run --btf-dir /tmp/empty-btf -- true > /dev/null 2> $out/no-btf.log
note "no-btf exit=$?"

# --wait-for-cxl: the tracer waits, the modules come, it attaches and traces the workload.
log=$out/wait.log
$T run --format json --wait-for-cxl=300 -- sh -c '. /vm/config; . /vm/lib.sh; topology_ready 60 || exit 9; /vm/run-workload memdev-bind 3' > $out/wait.jsonl 2> $log &
pid=$!
if wait_for_text $log "waiting for the CXL modules" 120; then
	note "wait announced=yes"
else
	note "wait announced=no"
fi
sleep 2
if kill -0 $pid 2> /dev/null; then note "wait still-waiting=yes"; else note "wait still-waiting=no"; fi
load_modules || { note "load-modules failed: $LOAD_ERROR"; exit 1; }
wait $pid
note "wait exit=$?"

# A use site the user names that the kernel does not have.
$T run --use-site no_such_cxl_function:0 -- true > /dev/null 2> $out/no-use-site.log
note "no-use-site exit=$?"
# One the kernel has but refuses to probe (notify_die is on the kprobe blacklist): an error
# too, and a problem for doctor; nothing of the attempt may stay behind.
$T run --use-site notify_die:0 -- true > /dev/null 2> $out/unprobed-use-site.log
note "unprobed-use-site exit=$?"
$T doctor --use-site notify_die:0 > $out/unprobed-use-site-doctor.txt 2>&1
note "unprobed-use-site-doctor exit=$?"
$T leftovers > $out/unprobed-use-site-leftovers.txt 2>&1
note "unprobed-use-site-leftovers exit=$?"

# --record on a full disk: a clear error, exit 2, and a partial trace that still reads.
mkdir -p /mnt/small
mount -t tmpfs -o size=8k tmpfs /mnt/small || { note "cannot mount the small tmpfs"; exit 1; }
$T run --format json --record /mnt/small/trace.bin -- /vm/run-workload memdev-bind 60 > $out/full.jsonl 2> $out/full.log
note "full exit=$?"
cp /mnt/small/trace.bin $out/full-partial.bin
note "full-partial bytes=$(wc -c < /mnt/small/trace.bin)"
# Whatever the killed workload left unbound is bound again, so the guest ends whole.
topology_ready 1 || for m in $(memdev_names); do
	[ "$(driver_of "$CXL/devices/$m")" = cxl_mem ] || echo "$m" > $CXL/drivers/cxl_mem/bind
done
exit 0
