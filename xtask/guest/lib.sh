# shellcheck shell=dash
# /vm/lib.sh: the helpers /init, the workloads and scripts share (say, topology, fail,
# sysw, load_modules, topology_ready, wait_for_text, the --count-calls kretprobes). It
# expects /vm/config sourced first (NONCE, EXPECT_MEMDEVS, LOAD_MODULES, SETTLE_SECS, ...).
#
# Sourced in the guest, never run: a script uses it as `. /vm/config; . /vm/lib.sh`
# (docs/vm.md, "Scripts in the guest").
CXL=/sys/bus/cxl

say() { echo "tracer-vm: $*"; }

# Milliseconds since boot, from /proc/uptime (10 ms resolution).
now_ms() {
	read -r up _ < /proc/uptime
	echo $(( ${up%.*}${up#*.} * 10 ))
}

# The driver a device (sysfs directory) is bound to, or nothing.
driver_of() {
	[ -e "$1/driver" ] || return 0
	l=$(readlink "$1/driver")
	echo "${l##*/}"
}

memdev_names() { for d in "$CXL"/devices/mem*; do [ -e "$d" ] && echo "${d##*/}"; done; }
bound_memdevs() { for d in "$CXL"/devices/mem*; do [ "$(driver_of "$d")" = cxl_mem ] && echo "${d##*/}"; done; }
endpoint_names() { for d in "$CXL"/devices/endpoint*; do [ -e "$d" ] && echo "${d##*/}"; done; }

# The topology as one comparable line: roots, ports, dports, memdevs, bound memdevs, endpoints.
topology() {
	r=0; p=0; d=0; m=0; b=0; e=0
	for x in "$CXL"/devices/root*; do [ -e "$x" ] && r=$((r + 1)); done
	for x in "$CXL"/devices/port*; do [ -e "$x" ] && p=$((p + 1)); done
	for x in "$CXL"/devices/*/dport*; do [ -e "$x" ] && d=$((d + 1)); done
	for x in "$CXL"/devices/mem*; do
		[ -e "$x" ] || continue
		m=$((m + 1))
		[ "$(driver_of "$x")" = cxl_mem ] && b=$((b + 1))
	done
	for x in "$CXL"/devices/endpoint*; do [ -e "$x" ] && e=$((e + 1)); done
	echo "roots=$r ports=$p dports=$d memdevs=$m bound=$b endpoints=$e"
}

# count KEY: one field of `topology`.
count() { topology | tr ' ' '\n' | sed -n "s/^$1=//p"; }

dump_state() {
	say "state: $(topology)"
	for d in "$CXL"/devices/*; do
		[ -e "$d" ] || continue
		say "state: ${d##*/} driver=$(driver_of "$d")"
	done
	say "state: last kernel messages:"
	dmesg | tail -n 25 | sed 's/^/tracer-vm:   /'
}

fail() {
	say "FAIL: $*"
	dump_state
	exit 1
}

# Writes $2 to the sysfs file $1, failing the workload with the kernel's error.
sysw() {
	if ! echo "$2" 2> /tmp/sysw.err > "$1"; then
		fail "writing $2 to $1 failed: $(sed 's/^.*: //' /tmp/sysw.err)"
	fi
}

# Like sysw, but a failure only counts (racing loops expect some).
tryw() {
	echo "$2" 2> /dev/null > "$1" && return 0
	echo x >> /tmp/race.errors
	return 1
}

# wait_until WHAT CMD ARGS: polls CMD for up to SETTLE_SECS, failing the workload with WHAT.
wait_until() {
	what=$1
	shift
	n=0
	until "$@"; do
		n=$((n + 1))
		[ $n -ge $((SETTLE_SECS * 10)) ] && fail "$what did not happen within $SETTLE_SECS s: $(topology)"
		usleep 100000
	done
}

# Loads the CXL drivers and the user's modules ($LOAD_MODULES, in order); on failure
# returns 1 with the reason in LOAD_ERROR.
load_modules() {
	for m in $LOAD_MODULES; do
		if ! modprobe "$m" 2> /tmp/modprobe.err; then
			# shellcheck disable=SC2034 # the caller reads it (init.sh, scripts)
			LOAD_ERROR="modprobe $m failed: $(cat /tmp/modprobe.err)"
			return 1
		fi
	done
	say "modules loaded: $LOAD_MODULES"
	for m in $LOAD_MODULES; do
		[ -e "/sys/module/$m/taint" ] || continue
		t=$(cat "/sys/module/$m/taint")
		[ -z "$t" ] || say "module $m taints the kernel: $t"
	done
	return 0
}

# topology_ready SECS: waits until every expected memdev is bound to cxl_mem with its
# endpoint port.
topology_ready() {
	n=0
	while [ $n -lt $(($1 * 10)) ]; do
		if [ "$EXPECT_MEMDEVS" = "$(count memdevs)" ] && [ "$EXPECT_MEMDEVS" = "$(count bound)" ] \
			&& [ "$EXPECT_MEMDEVS" = "$(count endpoints)" ]; then
			return 0
		fi
		usleep 100000
		n=$((n + 1))
	done
	return 1
}

# wait_for_text FILE TEXT SECS: waits until FILE contains TEXT; returns 1 after SECS.
wait_for_text() {
	n=0
	until grep -q "$2" "$1" 2> /dev/null; do
		n=$((n + 1))
		[ $n -ge $(($3 * 10)) ] && return 1
		usleep 100000
	done
	return 0
}

TRACEFS=/sys/kernel/tracing

# --count-calls: a kretprobe event per function (group vmcount) records every return with
# its value and caller; count_calls_stop saves them for the host (calls.txt) with the
# kprobe hit and miss counts and the trace buffer's overruns (calls-profile.txt). Each
# kretprobe has 64 instances (r64): the default, 10 on one vCPU, misses the returns of
# cxl_test's 11 memdevs probing at once from kworkers.
count_calls_start() {
	[ -n "$COUNT_CALLS" ] || return 0
	for f in $COUNT_CALLS; do
		if ! echo "r64:vmcount/${f#*:} $f ret=\$retval" 2> /tmp/kprobe.err >> $TRACEFS/kprobe_events; then
			fail "cannot count calls of $f (--count-calls): the kernel refused a kretprobe on it: $(sed 's/^.*: //' /tmp/kprobe.err)"
		fi
	done
	: > $TRACEFS/trace
	# Enabling an event with record-cmd on also hooks sched_switch to save task names, and
	# disabling it unhooks it: two static-key flips in __schedule that the counting does not
	# need (task names come out as <...>; calls.rs keeps the pid).
	echo 0 > $TRACEFS/options/record-cmd
	echo 1 > $TRACEFS/events/vmcount/enable || fail "cannot enable the vmcount kretprobes"
	COUNTING=1
	say "counting calls of: $COUNT_CALLS"
}

count_calls_stop() {
	[ "$COUNTING" = 1 ] || return 0
	COUNTING=0
	echo 0 > $TRACEFS/events/vmcount/enable
	grep -v '^#' $TRACEFS/trace > /share/out/calls.txt
	{
		for f in $COUNT_CALLS; do
			awk -v n="${f#*:}" '$1 == n { print "profile", $1, $2, $3 }' $TRACEFS/kprobe_profile
		done
		for s in "$TRACEFS"/per_cpu/cpu*/stats; do
			echo "$(basename "$(dirname "$s")") $(grep '^overrun:' "$s")"
		done
	} > /share/out/calls-profile.txt
	for f in $COUNT_CALLS; do echo "-:vmcount/${f#*:}" >> $TRACEFS/kprobe_events; done
	say "call counts saved: $(wc -l < /share/out/calls.txt) returns"
}

# Waits up to SETTLE_SECS for the topology to read $1.
settle() {
	n=0
	while [ "$(topology)" != "$1" ]; do
		n=$((n + 1))
		[ $n -ge $((SETTLE_SECS * 10)) ] && return 1
		usleep 100000
	done
	return 0
}
