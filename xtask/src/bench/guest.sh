#!/bin/sh
# /vm/script of `cargo xtask bench`: every guest measurement in one boot.
#   REPS LOOP_MS LOOPS CYCLES LOAD_MS "MODES"
# Results go to /share/out/bench-results.txt, one `key=value` line per measurement.
. /vm/config
. /vm/lib.sh
. /vm/workloads.sh
reps=$1
loop_ms=$2
loops=$3
cycles=$4
load_ms=$5
modes=$6
out=/share/out
res=$out/bench-results.txt
T=/sys/kernel/tracing
B=/sys/kernel/debug/cxl_dport_bench
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
: > $res

put() { echo "$*" >> $res; say "bench: $*"; }

# A hit count of a hist trigger keyed by common_pid, for one pid.
hits() { awk -v p="$2" '$2 == "common_pid:" && $3 == p { print $6 }' "$T/events/$1/hist"; }

# Calls of mutex_lock, mutex_unlock and kfree per operation of each loop, counted by the
# kernel itself (kprobe events and the kmem:kfree tracepoint, with hist triggers).
calls_per_op() {
	echo "p:benchcount/mutex_lock mutex_lock" >> $T/kprobe_events || fail "cannot add a kprobe event on mutex_lock"
	echo "p:benchcount/mutex_unlock mutex_unlock" >> $T/kprobe_events || fail "cannot add a kprobe event on mutex_unlock"
	for e in benchcount/mutex_lock benchcount/mutex_unlock kmem/kfree; do
		echo 'hist:keys=common_pid' > $T/events/$e/trigger || fail "cannot add a hist trigger to $e"
	done
	for loop in pipe select; do
		/bin/bench-guest $loop "$loop_ms" > /tmp/calls.out &
		pid=$!
		wait $pid || fail "bench-guest $loop failed"
		put "calls loop=$loop $(cat /tmp/calls.out) mutex_lock=$(hits benchcount/mutex_lock $pid) mutex_unlock=$(hits benchcount/mutex_unlock $pid) kfree=$(hits kmem/kfree $pid)"
	done
	for e in benchcount/mutex_lock benchcount/mutex_unlock kmem/kfree; do
		echo '!hist:keys=common_pid' > $T/events/$e/trigger
	done
	echo "-:benchcount/mutex_lock" >> $T/kprobe_events
	echo "-:benchcount/mutex_unlock" >> $T/kprobe_events
}

# User and system CPU time of a process, in clock ticks, and the ticks per second.
cpu_ticks() {
	# Fields after the parenthesised comm: utime is the 12th, stime the 13th.
	sed 's/^.*) //' /proc/$1/stat | awk -v hz="$(getconf CLK_TCK 2> /dev/null || echo 100)" '{ print "utime=" $12 " stime=" $13 " hz=" hz }'
}

# Resident memory of a process now and at its peak.
mem_kb() {
	echo "rss_kb=$(awk '/^VmRSS:/ { print $2 }' /proc/$1/status) hwm_kb=$(awk '/^VmHWM:/ { print $2 }' /proc/$1/status)"
}

# BPF programs of a process with their run counts and times (kernel.bpf_stats_enabled).
prog_stats() {
	for f in /proc/$1/fdinfo/*; do
		t=$(awk '/^prog_type:/ { print $2 }' "$f" 2> /dev/null)
		[ -n "$t" ] || continue
		put "progstats mode=$2 prog_type=$t run_cnt=$(awk '/^run_cnt:/ { print $2 }' "$f") run_time_ns=$(awk '/^run_time_ns:/ { print $2 }' "$f") prog_id=$(awk '/^prog_id:/ { print $2 }' "$f")"
	done
}

# attached LOG TEXT: waits until LOG says TEXT, failing at once when the process $mpid is
# gone (with its log) and after 300 s.
attached() {
	n=0
	until grep -q "$2" "$1" 2> /dev/null; do
		kill -0 $mpid 2> /dev/null || { tail -n 20 "$1"; fail "$(basename "$1" .log): exited before it was attached"; }
		n=$((n + 1))
		[ $n -ge 3000 ] && { tail -n 20 "$1"; fail "$(basename "$1" .log): not attached within 300 s"; }
		usleep 100000
	done
}

# start_mode MODE TAG: attaches what MODE measures and waits until it is attached.
start_mode() {
	case $1 in
	none) ;;
	tracer | global)
		extra=
		[ "$1" = global ] && extra="--lock-events global"
		/bin/tracer run --format json $extra > $out/$2.jsonl 2> $out/$2.log &
		mpid=$!
		attached $out/$2.log "kprobes attached"
		put "attached mode=$1 tag=$2 $(cpu_ticks $mpid) $(mem_kb $mpid)"
		;;
	bpftrace)
		/usr/bin/bpftrace /vm/bench.bt > $out/$2.log 2>&1 &
		mpid=$!
		attached $out/$2.log "bench: bpftrace attached"
		put "attached mode=$1 tag=$2 $(cpu_ticks $mpid)"
		;;
	*) fail "unknown mode $1" ;;
	esac
}

# stop_mode MODE TAG: detaches, after noting the tracer's memory.
stop_mode() {
	case $1 in
	none) ;;
	tracer | global)
		put "memory mode=$1 tag=$2 rss_kb=$(awk '/^VmRSS:/ { print $2 }' /proc/$mpid/status) hwm_kb=$(awk '/^VmHWM:/ { print $2 }' /proc/$mpid/status) $(cpu_ticks $mpid)"
		kill -TERM $mpid
		wait $mpid
		rc=$?
		put "stopped mode=$1 tag=$2 exit=$rc"
		;;
	bpftrace)
		put "memory mode=$1 tag=$2 rss_kb=$(awk '/^VmRSS:/ { print $2 }' /proc/$mpid/status) hwm_kb=$(awk '/^VmHWM:/ { print $2 }' /proc/$mpid/status) $(cpu_ticks $mpid)"
		kill -INT $mpid
		wait $mpid
		rc=$?
		put "stopped mode=$1 tag=$2 exit=$rc"
		;;
	esac
}

# timed_workload NAME MODE REP: one hotplug workload, its time from its own passed line.
timed_workload() {
	rm -f /tmp/wl.rc
	{ run_workload "$1" "$cycles"; echo $? > /tmp/wl.rc; } 2>&1 | tee /tmp/wl.log
	[ "$(cat /tmp/wl.rc 2> /dev/null)" = 0 ] || fail "workload $1 failed in mode $2"
	ms=$(sed -n "s/.*workload $1 passed .*total_ms=\([0-9]*\).*/\1/p" /tmp/wl.log)
	put "workload mode=$2 rep=$3 name=$1 cycles=$cycles total_ms=$ms"
}

say "bench: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs"
calls_per_op

# 1 and 3: every mode in turn, the order rotated each repetition so drift cancels.
rep=1
while [ $rep -le "$reps" ]; do
	order=$modes
	k=1
	while [ $k -lt $rep ]; do
		set -- $order
		first=$1
		shift
		order="$* $first"
		k=$((k + 1))
	done
	for mode in $order; do
		tag=$mode-$rep
		start_mode $mode $tag
		i=1
		while [ $i -le "$loops" ]; do
			for loop in pipe select; do
				l=$(/bin/bench-guest $loop "$loop_ms") || fail "bench-guest $loop failed in mode $mode"
				put "loop mode=$mode rep=$rep loop=$loop $l"
			done
			i=$((i + 1))
		done
		for w in memdev-bind acpi-unbind; do
			timed_workload $w $mode $rep
		done
		stop_mode $mode $tag
	done
	rep=$((rep + 1))
done

# 2: tracked-event capacity, driven by cxl_dport_bench.
# capacity TAG RING_KIB THREADS RATE [NICE]: NICE runs the tracer at that nice value.
capacity() {
	e0=$(cat $B/events)
	/bin/bench-guest nice "${5:-0}" /bin/tracer run --format json --ring-kib "$2" > $out/$1.jsonl 2> $out/$1.log &
	mpid=$!
	attached $out/$1.log "kprobes attached"
	# One warm-up write, from one thread: the tracer discovers the dport there (one
	# dport_add event of its own), so the load below only makes events the module counts.
	echo 1 > $B/run || fail "the warm-up write to $B/run failed"
	e1=$(cat $B/events)
	t1=$(cpu_ticks $mpid)
	l=$(/bin/bench-guest load "$load_ms" "$3" "$4") || fail "bench-guest load failed"
	e2=$(cat $B/events)
	# Let the tracer drain what is left in the ring before it stops.
	sleep 2
	t2=$(cpu_ticks $mpid)
	hwm=$(awk '/^VmHWM:/ { print $2 }' /proc/$mpid/status)
	kill -TERM $mpid
	wait $mpid
	rc=$?
	put "capacity tag=$1 ring_kib=$2 nice=${5:-0} warmup=$((e1 - e0)) generated=$((e2 - e1)) hwm_kb=$hwm exit=$rc $(echo "$t1" | sed 's/\([a-z]*\)=/\1_before=/g') $(echo "$t2" | sed 's/\([a-z]*\)=/\1_after=/g') $l"
	CAP_RATE=$(echo "$l" | sed -n 's/.* rate=\([0-9]*\).*/\1/p')
}

# What each BPF program costs per run, from the kernel's own accounting (not timed: the
# accounting itself adds two clock reads per run). stats MODE
stats() {
	start_mode $1 stats-$1
	[ "$1" = tracer ] && put "kprobes mode=$1 total=$(grep -c . /sys/kernel/debug/kprobes/list) optimized=$(grep -c OPTIMIZED /sys/kernel/debug/kprobes/list) ftrace=$(grep -c FTRACE /sys/kernel/debug/kprobes/list)"
	echo 1 > /proc/sys/kernel/bpf_stats_enabled || fail "cannot enable kernel.bpf_stats_enabled"
	for loop in pipe select; do
		l=$(/bin/bench-guest $loop "$loop_ms") || fail "bench-guest $loop failed"
		put "statsloop mode=$1 loop=$loop $l"
	done
	if [ "$1" = tracer ]; then
		e0=$(cat $B/events)
		l=$(/bin/bench-guest load "$loop_ms" 1 0) || fail "bench-guest load failed"
		put "statsload mode=$1 generated=$(( $(cat $B/events) - e0 )) $l"
	fi
	echo 0 > /proc/sys/kernel/bpf_stats_enabled
	prog_stats $mpid $1
	stop_mode $1 stats-$1
}

l=$(/bin/bench-guest load "$load_ms" 1 0) || fail "bench-guest load failed"
put "generator mode=none $l"
l=$(/bin/bench-guest load "$load_ms" 2 0) || fail "bench-guest load failed"
put "generator mode=none $l"
for mode in $modes; do
	case $mode in tracer | bpftrace) stats $mode ;; esac
done

# What one kernel stack capture costs here: the generator's rate with a bpftrace kprobe on
# its use function that only counts, and one that also takes the kernel stack.
stack_cost() {
	case " $modes " in *" bpftrace "*) ;; *) return 0 ;; esac
	for probe in count kstack; do
		if [ $probe = count ]; then
			echo 'kprobe:cxl_dport_bench_use { @n = count(); } BEGIN { printf("bench: bpftrace attached\n"); }' > /tmp/stack.bt
		else
			echo 'kprobe:cxl_dport_bench_use { @s[kstack] = count(); } BEGIN { printf("bench: bpftrace attached\n"); }' > /tmp/stack.bt
		fi
		/usr/bin/bpftrace /tmp/stack.bt > $out/stack-$probe.log 2>&1 &
		mpid=$!
		attached $out/stack-$probe.log "bench: bpftrace attached"
		l=$(/bin/bench-guest load "$loop_ms" 1 0) || fail "bench-guest load failed"
		put "stackcost probe=$probe $l"
		kill -INT $mpid
		wait $mpid
	done
	l=$(/bin/bench-guest load "$loop_ms" 1 0) || fail "bench-guest load failed"
	put "stackcost probe=none $l"
}
stack_cost
capacity cap-1 8192 1 0
half=$((CAP_RATE / 2))
capacity cap-2 8192 2 0
# Two threads at half the rate one thread reached: the vCPUs are no longer saturated.
capacity cap-2-half 8192 2 "$half"
# Two load threads keep both vCPUs busy in the kernel: the tracer's reader then competes
# with them for CPU. The same at a higher priority shows whether that is what drops events.
capacity cap-2-nice 8192 2 0 -10
capacity cap-tiny 4 2 0
say "bench: done"
