#!/bin/sh
# shellcheck shell=dash
# Guest suite, tracer-lifecycle (vm/reliability.rs): runs `tracer` the ways users stop it
# (SIGINT, SIGTERM, SIGKILL, a traced command that crashes) and `tracer leftovers` around
# each, plus `tracer doctor`. Writes `NAME key=value` lines to /share/out/lifecycle.txt and
# keeps every output beside it; the host judges them.
#
# Runs in the guest as /vm/script, with the tracer in the guest but not running. By hand:
#   cargo xtask vm run --kernel 7.2 --manual-tracer -- xtask/guest/suite/lifecycle.sh
#
# shellcheck source=../config.example
. /vm/config
# shellcheck source=../lib.sh
. /vm/lib.sh
# shellcheck source=../workloads.sh
. /vm/workloads.sh
T=/bin/tracer
out=/share/out
res=$out/lifecycle.txt
: > $res
note() { echo "$* ms=$(now_ms)" >> $res; say "lifecycle: $* uptime_ms=$(now_ms)"; }

$T doctor > $out/doctor.txt 2>&1
note "doctor exit=$?"
$T leftovers > $out/leftovers-before.txt 2>&1
note "leftovers-before exit=$?"

# stop SIG: the tracer traces a long sleep, is sent SIG once attached, and must leave
# nothing in the kernel (after SIGKILL: nothing but kprobe events marked gone).
for sig in INT TERM KILL; do
	log=$out/run-$sig.log
	rm -f /tmp/child.pid
	$T run --format json -- sh -c 'echo $$ > /tmp/child.pid; exec sleep 1000' > $out/run-$sig.jsonl 2> $log &
	pid=$!
	if ! wait_for_text $log "kprobes attached" 180; then
		note "run-$sig attached=no"
		kill -9 $pid
		continue
	fi
	note "run-$sig attached=yes"
	$T leftovers > $out/leftovers-during-$sig.txt 2>&1
	note "leftovers-during-$sig exit=$?"
	kill -$sig $pid
	wait $pid
	note "run-$sig exit=$?"
	child=$(cat /tmp/child.pid 2> /dev/null)
	if [ -n "$child" ] && kill -0 "$child" 2> /dev/null; then
		note "child-$sig alive=yes"
		kill -9 "$child"
	else
		note "child-$sig alive=no"
	fi
	$T leftovers > $out/leftovers-after-$sig.txt 2>&1
	note "leftovers-after-$sig exit=$?"
done

# The traced command crashes; this start also removes the killed instance's kprobe events.
$T run --format json -- sh -c 'kill -SEGV $$' > $out/run-crash.jsonl 2> $out/run-crash.log
note "run-crash exit=$?"
$T leftovers > $out/leftovers-after-crash.txt 2>&1
note "leftovers-after-crash exit=$?"

# The kernel side's diagnostics (-v): the traced command stops the tracer (its parent) and
# unbinds and binds every memdev while a 4 KiB ring buffer fills up; the events it cannot
# take are counted and told, as kernel diagnostics, once the tracer runs again.
# shellcheck disable=SC2016 # $PPID is the inner shell's: the tracer
$T run -v --ring-kib 4 --format json -- sh -c '
	kill -STOP $PPID
	. /vm/config; . /vm/lib.sh; . /vm/workloads.sh
	cycle_memdev_bind
	kill -CONT $PPID' > $out/run-diag.jsonl 2> $out/run-diag.log
note "run-diag exit=$?"
exit 0
