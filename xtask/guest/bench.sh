#!/bin/sh
# shellcheck shell=dash
# /vm/script of `cargo xtask bench` (bench/mod.rs): every guest measurement on one kernel, in
# one boot.
#   REPS MAX_REPS EXTRA_SECS LOOP_MS LOOPS CYCLES LOAD_MS SETTLE_SECS "MODES"
# REPS repetitions run every mode (the first with the hotplug workloads); then, while the
# targets are not resolved at the noise seen (bench-guest decide), more repetitions of the
# loops run the modes that would resolve them, up to MAX_REPS in all and EXTRA_SECS of
# extra time.
# Results go to /share/out/bench-results.txt, one `key=value` line per measurement.
#
# Runs in the guest as /vm/script, booted with --manual-tracer, the cxl_dport_bench module,
# /bin/bench-guest and (unless --no-bpftrace) bpftrace; not for running by hand: run
# `cargo xtask bench --kernel 6.12 --reps 3` (bench/mod.rs builds what it needs).
# shellcheck source=config.example
. /vm/config
# shellcheck source=lib.sh
. /vm/lib.sh
# shellcheck source=workloads.sh
. /vm/workloads.sh
reps=$1
max_reps=$2
extra_budget=$3
loop_ms=$4
loops=$5
cycles=$6
load_ms=$7
settle=$8
modes=$9
out=/share/out
res=$out/bench-results.txt
T=/sys/kernel/tracing
B=/sys/kernel/debug/cxl_dport_bench
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
: > $res

# Each line carries the guest's uptime, so the host can tell where the time went.
put() { echo "$* t_ms=$(now_ms)" >> $res; say "bench: $*"; }

# A hit count of a hist trigger keyed by common_pid, for one pid (0 when it has none).
hits() { awk -v p="$2" '$2 == "common_pid:" && $3 == p { n = $6 } END { print n + 0 }' "$T/events/$1/hist"; }

# Calls of mutex_lock, mutex_unlock and kfree per operation of each loop and of the control
# (which must make none), counted by the kernel itself (kprobe events and the kmem:kfree
# tracepoint, with hist triggers).
calls_per_op() {
	echo "p:benchcount/mutex_lock mutex_lock" >> $T/kprobe_events || fail "cannot add a kprobe event on mutex_lock"
	echo "p:benchcount/mutex_unlock mutex_unlock" >> $T/kprobe_events || fail "cannot add a kprobe event on mutex_unlock"
	for e in benchcount/mutex_lock benchcount/mutex_unlock kmem/kfree; do
		echo 'hist:keys=common_pid' > $T/events/$e/trigger || fail "cannot add a hist trigger to $e"
	done
	for loop in pipe select control; do
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
	sed 's/^.*) //' /proc/"$1"/stat | awk -v hz="$(getconf CLK_TCK 2> /dev/null || echo 100)" '{ print "utime=" $12 " stime=" $13 " hz=" hz }'
}

# Resident memory of a process now and at its peak.
mem_kb() {
	echo "rss_kb=$(awk '/^VmRSS:/ { print $2 }' /proc/"$1"/status) hwm_kb=$(awk '/^VmHWM:/ { print $2 }' /proc/"$1"/status)"
}

# BPF programs of a process with their run counts and times (kernel.bpf_stats_enabled,
# cumulative). prog_stats PID MODE PHASE
prog_stats() {
	for f in /proc/"$1"/fdinfo/*; do
		t=$(awk '/^prog_type:/ { print $2 }' "$f" 2> /dev/null)
		[ -n "$t" ] || continue
		put "progstats mode=$2 phase=$3 prog_type=$t run_cnt=$(awk '/^run_cnt:/ { print $2 }' "$f") run_time_ns=$(awk '/^run_time_ns:/ { print $2 }' "$f") prog_id=$(awk '/^prog_id:/ { print $2 }' "$f")"
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

# start_mode MODE TAG [record]: attaches what MODE measures and waits until it is attached.
# With `record`, the tracer also records its events (the host checks every dport free in
# them).
start_mode() {
	case $1 in
	none | none-b) ;;
	tracer | global | noderefs)
		extra=
		[ "$3" = record ] && extra="--record $out/$2.bin"
		[ "$1" = global ] && extra="--lock-events global"
		[ "$1" = noderefs ] && extra="$extra --no-derefs"
		# shellcheck disable=SC2086 # $extra is a list of tracer options, split on purpose
		/bin/tracer run --format json $extra > "$out/$2.jsonl" 2> "$out/$2.log" &
		mpid=$!
		attached "$out/$2.log" "kprobes attached"
		put "attached mode=$1 tag=$2 $(cpu_ticks $mpid) $(mem_kb $mpid)"
		;;
	bpftrace)
		/usr/bin/bpftrace /vm/bench.bt > "$out/$2.log" 2>&1 &
		mpid=$!
		attached "$out/$2.log" "bench: bpftrace attached"
		put "attached mode=$1 tag=$2 $(cpu_ticks $mpid)"
		;;
	*) fail "unknown mode $1" ;;
	esac
}

# stop_mode MODE TAG: detaches, after noting the tracer's memory.
stop_mode() {
	case $1 in
	none | none-b) ;;
	*)
		put "memory mode=$1 tag=$2 $(mem_kb "$mpid") $(cpu_ticks "$mpid")"
		if [ "$1" = bpftrace ]; then kill -INT "$mpid"; else kill -TERM "$mpid"; fi
		wait "$mpid"
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

# rotated N WORDS...: the words rotated left N times.
rotated() {
	n=$1
	shift
	while [ "$n" -gt 0 ]; do
		first=$1
		shift
		set -- "$@" "$first"
		n=$((n - 1))
	done
	echo "$*"
}

# What the kernel says is attached to the hot functions themselves while the tracer runs:
# kprobes on them, ftrace users (fentry trampolines) of them, the kfree tracepoint; and
# how often each BPF program of MODE ran during one run of each loop (bpf_stats_enabled:
# it adds two clock reads per program run, so it stays off for the timed runs).
# stats MODE
stats() {
	if [ "$1" = tracer ]; then
		put "kprobes mode=$1 total=$(grep -c . /sys/kernel/debug/kprobes/list) optimized=$(grep -c OPTIMIZED /sys/kernel/debug/kprobes/list) ftrace=$(grep -c FTRACE /sys/kernel/debug/kprobes/list)"
		for fn in mutex_lock mutex_unlock kfree; do
			put "hot mode=$1 function=$fn kprobes=$(awk -v f="$fn+0x0" '$3 == f' /sys/kernel/debug/kprobes/list | wc -l) ftrace_users=$(awk -v f="$fn" '$1 == f' $T/enabled_functions | wc -l) tracepoint_enabled=$(cat $T/events/kmem/kfree/enable)"
		done
	fi
	echo 1 > /proc/sys/kernel/bpf_stats_enabled || fail "cannot enable kernel.bpf_stats_enabled"
	for loop in pipe select; do
		l=$(/bin/bench-guest $loop "$loop_ms") || fail "bench-guest $loop failed"
		put "statsloop mode=$1 loop=$loop $l"
	done
	echo 0 > /proc/sys/kernel/bpf_stats_enabled
	prog_stats "$mpid" "$1" loops
}

# quiet MODE REP: after attaching or detaching, the kernel optimizes (or frees) kprobes in
# the background and QEMU retranslates the code around what was patched. Wait SETTLE_SECS,
# then run the pipe loop in short untimed bursts until two in a row agree within 3 % (at
# most 12), and the select loop once: every mode's timed runs start from the same state.
quiet() {
	sleep "$settle"
	prev=0
	n=0
	while [ $n -lt 12 ]; do
		rel=$(/bin/bench-guest pipe 250 | sed -n 's/.* rel=\([0-9.]*\).*/\1/p')
		[ -n "$rel" ] || fail "bench-guest pipe failed while settling in mode $1"
		n=$((n + 1))
		awk -v a="$prev" -v b="$rel" 'BEGIN { exit !(a > 0 && b <= a * 1.03 && b * 1.03 >= a) }' && break
		prev=$rel
	done
	/bin/bench-guest select 250 > /dev/null || fail "bench-guest select failed while settling in mode $1"
	put "settled mode=$1 rep=$2 bursts=$n"
}

# overflow TAG: the tracer stopped (SIGSTOP) while two threads generate tracked events for
# two seconds: its ring fills and the kernel side drops; the tracer's report must account
# for every event (generated + warm-up + 1 discovery = received + dropped).
overflow() {
	e0=$(cat $B/events)
	# One warm-up write, from one thread: two threads' first lookups could both discover
	# the dport.
	echo 1 > $B/run || fail "the warm-up write to $B/run failed"
	e1=$(cat $B/events)
	kill -STOP "$mpid"
	l=$(/bin/bench-guest load 2000 2 0) || { kill -CONT "$mpid"; fail "bench-guest load failed"; }
	e2=$(cat $B/events)
	kill -CONT "$mpid"
	# Let the tracer drain the ring before it stops.
	sleep 3
	put "overflow tag=$1 warmup=$((e1 - e0)) generated=$((e2 - e1)) $l"
}

# capacity TAG LOADS...: the tracer of period TAG under the loads NAME:THREADS:RATE in turn
# (RATE 0: as fast as it goes; half: half the rate the first load reached). Its report
# counts what it received and dropped over all of them.
capacity() {
	tag=$1
	shift
	e0=$(cat $B/events)
	# One warm-up write, from one thread: the tracer discovers the dport there (one
	# dport_add event of its own), so the loads below only make events the module counts.
	echo 1 > $B/run || fail "the warm-up write to $B/run failed"
	e1=$(cat $B/events)
	# What the tracer's programs cost per run on tracked events.
	echo 1 > /proc/sys/kernel/bpf_stats_enabled || fail "cannot enable kernel.bpf_stats_enabled"
	l=$(/bin/bench-guest load "$loop_ms" 1 0) || fail "bench-guest load failed"
	echo 0 > /proc/sys/kernel/bpf_stats_enabled
	put "statsload mode=tracer $l"
	prog_stats "$mpid" tracer load
	first_rate=
	for spec in "$@"; do
		name=${spec%%:*}
		rest=${spec#*:}
		threads=${rest%%:*}
		rate=${rest#*:}
		[ "$rate" = half ] && rate=$((first_rate / 2))
		a=$(cat $B/events)
		t1=$(cpu_ticks "$mpid")
		l=$(/bin/bench-guest load "$load_ms" "$threads" "$rate") || fail "bench-guest load failed"
		b=$(cat $B/events)
		t2=$(cpu_ticks "$mpid")
		put "capload tag=$name tracer=$tag generated=$((b - a)) $(echo "$t1" | sed 's/\([a-z]*\)=/\1_before=/g') $(echo "$t2" | sed 's/\([a-z]*\)=/\1_after=/g') $l"
		[ -n "$first_rate" ] || first_rate=$(echo "$l" | sed -n 's/.* rate=\([0-9]*\).*/\1/p')
	done
	e2=$(cat $B/events)
	# Let the tracer drain what is left in the ring before it stops.
	sleep 2
	put "capacity tag=$tag ring_kib=8192 warmup=$((e1 - e0)) generated=$((e2 - e1)) hwm_kb=$(awk '/^VmHWM:/ { print $2 }' /proc/"$mpid"/status)"
}

# period MODE REP EXTRAS: one mode's turn in a repetition: the timed loops, then what EXTRAS
# lists: `workloads` (the hotplug workloads, timed, under a recording tracer, and the dports
# alive after them), `stats`, and for the tracer `overflow` or `capacity`. Mode `noderefs`
# (the tracer without its deref sites) runs the workloads alone: what the deref sites add.
period() {
	tag=$1-$2
	case " $3 " in *" workloads "*) start_mode "$1" "$tag" record ;; *) start_mode "$1" "$tag" ;; esac
	if [ "$1" = noderefs ]; then quiet "$1" "$2"; else loops_period "$1" "$2" "$tag"; fi
	case " $3 " in *" workloads "*)
		for w in memdev-bind acpi-unbind; do
			timed_workload $w "$1" "$2"
		done
		[ "$1" = tracer ] && put "frees tag=$tag cycles=$cycles dports_end=$(count dports)"
		;;
	esac
	case " $3 " in *" stats "*)
		case $1 in tracer | bpftrace) stats "$1" ;; esac
		;;
	esac
	if [ "$1" = tracer ]; then
		case " $3 " in *" overflow "*) overflow "$tag" ;; esac
		# One thread, two, and two at half the rate one reached (the vCPUs no longer
		# saturated).
		case " $3 " in *" capacity "*) capacity "$tag" cap-1:1:0 cap-2:2:0 cap-2-half:2:half ;; esac
	fi
	stop_mode "$1" "$tag"
}

# loops_period MODE REP TAG: settles, then the timed hot-path loops of one mode period.
loops_period() {
	quiet "$1" "$2"
	case $1 in tracer | global) c0=$(cpu_ticks "$mpid") ;; esac
	# A process per run: how fast a loop runs under TCG depends on where its kernel stack
	# and buffers landed (QEMU's software TLB is indexed by address), which stays for a
	# process's life; the median over many processes averages that out. The lines are
	# written out after the last run: the console is slow to emulate.
	: > /tmp/loops.out
	i=1
	while [ $i -le "$loops" ]; do
		for loop in pipe select; do
			/bin/bench-guest $loop "$loop_ms" >> /tmp/loops.out || fail "bench-guest $loop failed in mode $1"
		done
		i=$((i + 1))
	done
	while read -r loop rest; do
		put "loop mode=$1 rep=$2 loop=$loop $loop $rest"
	done < /tmp/loops.out
	# The tracer's own CPU time while the loops ran (it should have had nothing to do).
	case $1 in tracer | global) put "loopcpu mode=$1 rep=$2 tag=$3 $(echo "$c0" | sed 's/\([a-z]*\)=/\1_before=/g') $(cpu_ticks "$mpid")" ;; esac
}

say "bench: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPUs"
calls_per_op

# 1 and 3: every mode in turn, the order rotated each repetition so drift cancels; the
# A/A pair (none, none-b) is in every repetition.
# After their timed loops, the first also runs the hotplug workloads and the stats, the
# one before the last the overflow and the last the capacity loads (under the tracer of
# that repetition: one tracer start less each).
rep=1
while [ $rep -le "$reps" ]; do
	extras=
	[ $rep = 1 ] && extras="workloads stats"
	[ $rep = $((reps - 1)) ] && extras="$extras overflow"
	[ $rep = "$reps" ] && extras="$extras capacity"
	t0=$(now_ms)
	# shellcheck disable=SC2086 # $modes is a list of words, split on purpose
	for mode in $(rotated $((rep - 1)) $modes); do
		period "$mode" $rep "$extras"
	done
	# What the deref sites add to the hotplug workloads: the tracer without them.
	[ $rep = 1 ] && period noderefs $rep workloads
	last_secs=$(( ($(now_ms) - t0) / 1000 ))
	last_modes=$(echo "$modes" | wc -w)
	put "repetition rep=$rep kind=full secs=$last_secs modes=$(echo "$modes" | tr ' ' ,)"
	rep=$((rep + 1))
done

# More repetitions of the loops alone, while the noise leaves a target unresolved.
extra_ms=0
while :; do
	/bin/bench-guest decide $res $((rep - 1)) "$max_reps" $((extra_ms / 1000)) "$extra_budget" "$last_secs" "$last_modes" > /tmp/decide.out 2>&1 \
		|| fail "bench-guest decide failed: $(cat /tmp/decide.out)"
	decision=$(head -n 1 /tmp/decide.out)
	say "bench: after $((rep - 1)) repetition(s): $decision"
	say "bench: $(sed -n 2p /tmp/decide.out)"
	# shellcheck disable=SC2086 # the decision's words become the arguments, split on purpose
	set -- $decision
	[ "$1" = more ] || break
	shift
	# The modes asked for, in the order of the full list (so the A/A pair keeps its place
	# around the tracer), rotated like the full repetitions.
	wanted=" $* "
	these=
	for m in $modes; do
		case $wanted in *" $m "*) these="${these:+$these }$m" ;; esac
	done
	t0=$(now_ms)
	# shellcheck disable=SC2086 # $these is a list of words, split on purpose
	for mode in $(rotated $(( (rep - 1) % $(echo "$these" | wc -w) )) $these); do
		period "$mode" $rep ""
	done
	elapsed=$(( $(now_ms) - t0 ))
	extra_ms=$((extra_ms + elapsed))
	last_secs=$((elapsed / 1000))
	last_modes=$(echo "$these" | wc -w)
	put "repetition rep=$rep kind=extra secs=$last_secs modes=$(echo "$these" | tr ' ' ,)"
	rep=$((rep + 1))
done
cp /tmp/decide.out $out/decision.txt

l=$(/bin/bench-guest load "$load_ms" 1 0) || fail "bench-guest load failed"
put "generator mode=none $l"
l=$(/bin/bench-guest load "$load_ms" 2 0) || fail "bench-guest load failed"
put "generator mode=none $l"

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
say "bench: done"
