#!/bin/sh
# shellcheck shell=dash
# `cargo xtask vm soak` (vm/soak.rs): `/vm/script SECS INTERVAL WORKLOAD [TRACER ARGS]` starts
# `tracer run --record` in the background around `/vm/script loop SECS WORKLOAD` (rounds of
# the racing WORKLOAD until SECS pass) and samples the tracer's VmRSS, VmHWM and trace size
# every INTERVAL seconds into /share/out/soak-samples.txt; the host judges them.
#
# Runs in the guest as /vm/script, with the tracer in the guest but not running. By hand:
#   cargo xtask vm run --manual-tracer -- xtask/guest/soak.sh 60 5 reload-mix
# (or `cargo xtask vm soak --minutes 1`, which also judges the results).
#
# shellcheck source=config.example
. /vm/config
# shellcheck source=lib.sh
. /vm/lib.sh
out=/share/out
if [ "$1" = loop ]; then
	# The traced command: rounds of the workload until the deadline; a failed round stops it.
	# shellcheck source=workloads.sh
	. /vm/workloads.sh
	end=$(( $(now_ms) + $2 * 1000 ))
	rounds=0
	while [ "$(now_ms)" -lt "$end" ]; do
		run_workload "$3" 10 >> $out/soak-workload.log 2>&1 || { echo "$rounds" > /tmp/soak.rounds; exit 1; }
		rounds=$((rounds + 1))
	done
	echo "$rounds" > /tmp/soak.rounds
	exit 0
fi
secs=$1
interval=$2
workload=$3
shift 3
/bin/tracer run --format json --record $out/trace.bin "$@" -- /vm/script loop "$secs" "$workload" > $out/findings.jsonl 2> $out/tracer.log &
tpid=$!
if ! wait_for_text $out/tracer.log "kprobes attached" 300; then
	say "soak: the tracer did not attach within 300 s; its log follows"
	cat $out/tracer.log
	kill -9 $tpid
	exit 1
fi
t0=$(now_ms)
# Where its kprobes are, before any module reload re-arms them.
cat /sys/kernel/debug/kprobes/list > $out/kprobes-attached.txt
say "soak: tracer (pid $tpid) attached; $workload for $secs s, sampling every $interval s"
: > $out/soak-samples.txt
last=0
while kill -0 $tpid 2> /dev/null; do
	rss=$(awk '/^VmRSS:/ { print $2 }' /proc/$tpid/status 2> /dev/null)
	hwm=$(awk '/^VmHWM:/ { print $2 }' /proc/$tpid/status 2> /dev/null)
	size=$(wc -c < $out/trace.bin 2> /dev/null)
	now=$(now_ms)
	[ -n "$rss" ] && echo "$((now - t0)) $rss $hwm ${size:-0}" >> $out/soak-samples.txt
	if [ $((now - last)) -ge 60000 ]; then
		say "soak: $(( (now - t0) / 1000 )) s: tracer VmRSS ${rss:-?} kB, trace ${size:-0} bytes"
		# How the kernel runs each probe (int3, optimized jump or ftrace), once settled.
		[ "$last" != 0 ] && [ ! -e $out/kprobes-list.txt ] && cat /sys/kernel/debug/kprobes/list > $out/kprobes-list.txt
		last=$now
	fi
	sleep "$interval"
done
wait $tpid
t=$?
say "soak: tracer exit=$t after $(( ($(now_ms) - t0) / 1000 )) s, $(cat /tmp/soak.rounds 2> /dev/null || echo 0) $workload rounds"
echo "tracer=$t rounds=$(cat /tmp/soak.rounds 2> /dev/null || echo 0)" > $out/soak-result.txt
case $t in
0 | 1) exit 0 ;;
*) say "soak: the tracer failed (exit $t); the end of its log follows"; tail -n 20 $out/tracer.log; exit 1 ;;
esac
