//! The guest side: `/init`, the shell library, and the built-in hotplug workloads.
//!
//! Everything here is busybox ash. Each workload cycle tears part of the CXL topology down,
//! checks that the teardown really happened, brings it back, and waits until the topology
//! matches the one seen before the first cycle; a cycle that does not restore it fails the
//! run loudly with a dump of the state. Progress lines start with `tracer-vm:` so the host can
//! pick timings out of the console.
use std::fmt::Write as _;

use anyhow::bail;

use super::Topology;

/// A built-in workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Unbind every memdev from `cxl_mem` and bind it again (each bind is a `cxl_mem_probe`).
    MemdevBind,
    /// `rmmod cxl_mem` then `modprobe cxl_mem`.
    CxlMemReload,
    /// `rmmod cxl_pci` then `modprobe cxl_pci` (memdevs disappear and come back).
    CxlPciReload,
    /// PCI remove of every type3 device, then a PCI bus rescan.
    Type3Rescan,
    /// PCI remove of the switch upstream port (the whole switch), then a rescan (switch only).
    UpstreamRescan,
    /// Unbind ACPI0017 from `cxl_acpi` (tears down the root and every port) and bind it again.
    AcpiUnbind,
    /// Unbind the ports above the endpoints from `cxl_port`, bind them again if they still
    /// exist (a switch port goes away with its last endpoint), then bind the memdevs again.
    PortUnbind,
    /// `memdev-bind` and `acpi-unbind` racing in two parallel loops, then a restore.
    Mix,
    /// `memdev-bind` and `cxl-mem-reload` racing in two parallel loops, then a restore: every
    /// memdev probe races another, but no port (so no dport) is torn down.
    ReloadMix,
}

impl Workload {
    pub const ALL: [Workload; 9] = [
        Workload::MemdevBind,
        Workload::CxlMemReload,
        Workload::CxlPciReload,
        Workload::Type3Rescan,
        Workload::UpstreamRescan,
        Workload::AcpiUnbind,
        Workload::PortUnbind,
        Workload::Mix,
        Workload::ReloadMix,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::MemdevBind => "memdev-bind",
            Workload::CxlMemReload => "cxl-mem-reload",
            Workload::CxlPciReload => "cxl-pci-reload",
            Workload::Type3Rescan => "type3-rescan",
            Workload::UpstreamRescan => "upstream-rescan",
            Workload::AcpiUnbind => "acpi-unbind",
            Workload::PortUnbind => "port-unbind",
            Workload::Mix => "mix",
            Workload::ReloadMix => "reload-mix",
        }
    }

    /// Two loops racing: the cycles are iterations of each loop, with no per-cycle line.
    pub fn is_race(self) -> bool {
        matches!(self, Workload::Mix | Workload::ReloadMix)
    }

    pub fn runs_on(self, topology: Topology) -> bool {
        self != Workload::UpstreamRescan || topology == Topology::Switch
    }
}

/// Fails before booting when a workload cannot run on the topology.
pub fn check(workloads: &[Workload], topology: Topology) -> anyhow::Result<()> {
    for w in workloads {
        if !w.runs_on(topology) {
            bail!("workload {} needs a CXL switch: use --topology switch", w.name());
        }
    }
    Ok(())
}

/// What `/init` is told, written to `/vm/config` and sourced by every guest script.
pub struct GuestConfig<'a> {
    pub nonce: &'a str,
    pub expect_memdevs: usize,
    pub tracer: bool,
    /// The tracer is in the guest but the workloads run without it: the script runs it.
    pub manual_tracer: bool,
    /// Load the CXL modules at boot and wait for the topology (else the script does).
    pub load_cxl: bool,
    /// Modules /init loads, in order, before it mounts the results share (basics.rs).
    pub basic_modules: &'a [String],
    /// `[MODULE:]FUNCTION` specs whose calls are counted during the workloads and script.
    pub count_calls: &'a [String],
    pub workloads: &'a [Workload],
    pub cycles: u32,
    /// The user's command, already shell-quoted, or empty.
    pub user_command: String,
    /// Modules to load at boot, in order (the CXL drivers, then the user's extra modules).
    pub load_modules: &'a [String],
    pub settle_secs: u32,
}

impl GuestConfig<'_> {
    pub fn render(&self) -> String {
        let mut s = String::from("# written by cargo xtask vm run\n");
        let names: Vec<&str> = self.workloads.iter().map(|w| w.name()).collect();
        let vars = [
            ("NONCE", self.nonce.to_owned()),
            ("EXPECT_MEMDEVS", self.expect_memdevs.to_string()),
            (
                "TRACER",
                match (self.tracer, self.manual_tracer) {
                    (true, true) => "manual",
                    (true, false) => "1",
                    (false, _) => "0",
                }
                .to_owned(),
            ),
            ("LOAD_CXL", u8::from(self.load_cxl).to_string()),
            ("BASIC_MODULES", self.basic_modules.join(" ")),
            ("COUNT_CALLS", self.count_calls.join(" ")),
            ("WORKLOADS", names.join(" ")),
            ("CYCLES", self.cycles.to_string()),
            ("USER_CMD", self.user_command.clone()),
            ("LOAD_MODULES", self.load_modules.join(" ")),
            ("SETTLE_SECS", self.settle_secs.to_string()),
        ];
        for (name, value) in vars {
            writeln!(s, "{name}={}", shell_quote(&value)).expect("writing to a String cannot fail");
        }
        s
    }
}

/// Quotes `s` as one word for the guest's shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `/init`: mounts, loads the modules, waits for the topology, runs the workload (under the
/// tracer unless told not to), saves dmesg, prints the result line and powers off. It never
/// returns: the kernel would panic when init exits.
pub const INIT: &str = r#"#!/bin/sh
# /init of the tracer QEMU guest, written by cargo xtask vm run
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
. /vm/config
. /vm/lib.sh
say "init started kernel=$(uname -r) uptime_ms=$(now_ms)"

finish() {
	dmesg > /share/out/dmesg.txt 2>/dev/null
	sync
	umount /share 2>/dev/null
	say "result $NONCE exit=$1"
	poweroff -f
	while :; do sleep 1; done
}

setup_failed() {
	say "error: $*"
	dump_state
	finish 100
}

mkdir -p /share
# What this kernel builds as modules of virtio PCI and 9p, dependencies first (the host chose
# them from its modules.dep and modules.builtin); empty when all of it is built in.
for m in $BASIC_MODULES; do
	modprobe "$m" 2> /tmp/modprobe.err || setup_failed "cannot load $m for the results share: $(cat /tmp/modprobe.err)"
done
[ -z "$BASIC_MODULES" ] || say "basic modules loaded: $BASIC_MODULES"
mount -t 9p -o trans=virtio,version=9p2000.L share /share || setup_failed "cannot mount the 9p results share"
mkdir -p /share/out || setup_failed "the results share is not writable"

if [ "$LOAD_CXL" = 1 ]; then
	load_modules || setup_failed "$LOAD_ERROR"
	topology_ready 60 || setup_failed "CXL topology not ready after 60 s: expected $EXPECT_MEMDEVS memdevs bound to cxl_mem with endpoints, have $(topology)"
	say "topology ready $(topology) uptime_ms=$(now_ms)"
else
	say "CXL modules not loaded at boot (--no-cxl-at-boot): the script loads them (load_modules)"
fi

rm -f /tmp/workload.status
if [ "$TRACER" = manual ]; then
	say "running the workload without the tracer; /bin/tracer is there for the script (--manual-tracer)"
	/vm/workload
elif [ "$TRACER" = 1 ]; then
	say "running the workload under: tracer run --format json --record /share/out/trace.bin"
	/bin/tracer run --format json --record /share/out/trace.bin -- /vm/workload \
		> /share/out/findings.jsonl 2> /share/out/tracer.log
	t=$?
	say "tracer exit=$t"
else
	say "running the workload without the tracer"
	/vm/workload
fi
if [ "$TRACER" = 1 ] && [ "$t" != 0 ] && [ "$t" != 1 ]; then
	say "error: the tracer failed with exit status $t; the end of tracer.log follows"
	tail -n 30 /share/out/tracer.log
	finish 102
fi
if [ ! -e /tmp/workload.status ]; then
	say "error: the workload never ran (the tracer exited $t without starting it)"
	finish 101
fi
w=$(cat /tmp/workload.status)
say "workload exit=$w"
finish "$w"
"#;

/// `/vm/workload`: the workload process (what the tracer runs). Its output goes to the
/// console and to `/share/out/workload.log`; its status to `/tmp/workload.status`.
pub const WORKLOAD: &str = r#"#!/bin/sh
# /vm/workload, written by cargo xtask vm run
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
{ /vm/run-workloads; echo $? > /tmp/workload.status; } 2>&1 | tee /share/out/workload.log > /dev/console
exit "$(cat /tmp/workload.status 2>/dev/null || echo 255)"
"#;

/// `/vm/run-workloads`: the selected built-in workloads in order, then the user's command.
pub const RUN_WORKLOADS: &str = r#"#!/bin/sh
# /vm/run-workloads, written by cargo xtask vm run
. /vm/config
. /vm/lib.sh
. /vm/workloads.sh
# Calls are counted from here (under the tracer, after it attached) to the end.
trap count_calls_stop EXIT
count_calls_start
for w in $WORKLOADS; do
	run_workload "$w" "$CYCLES" || exit 1
done
if [ -n "$USER_CMD" ]; then
	say "script: $USER_CMD"
	eval "set -- $USER_CMD"
	"$@"
	rc=$?
	say "script exit=$rc"
	exit $rc
fi
exit 0
"#;

/// `/vm/run-workload NAME CYCLES`: one built-in workload, for scripts (after
/// `load_modules` and `topology_ready` when the modules were not loaded at boot).
pub const RUN_WORKLOAD: &str = r#"#!/bin/sh
# /vm/run-workload, written by cargo xtask vm run
. /vm/config
. /vm/lib.sh
. /vm/workloads.sh
[ $# = 2 ] || fail "usage: /vm/run-workload NAME CYCLES"
run_workload "$1" "$2"
"#;

/// `/vm/lib.sh`: helpers shared by /init and the workloads.
pub const LIB: &str = r#"# /vm/lib.sh, written by cargo xtask vm run
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

memdev_names() { for d in $CXL/devices/mem*; do [ -e "$d" ] && echo "${d##*/}"; done; }
bound_memdevs() { for d in $CXL/devices/mem*; do [ "$(driver_of "$d")" = cxl_mem ] && echo "${d##*/}"; done; }
endpoint_names() { for d in $CXL/devices/endpoint*; do [ -e "$d" ] && echo "${d##*/}"; done; }

# The topology as one comparable line: roots, ports, dports, memdevs, bound memdevs, endpoints.
topology() {
	r=0; p=0; d=0; m=0; b=0; e=0
	for x in $CXL/devices/root*; do [ -e "$x" ] && r=$((r + 1)); done
	for x in $CXL/devices/port*; do [ -e "$x" ] && p=$((p + 1)); done
	for x in $CXL/devices/*/dport*; do [ -e "$x" ] && d=$((d + 1)); done
	for x in $CXL/devices/mem*; do
		[ -e "$x" ] || continue
		m=$((m + 1))
		[ "$(driver_of "$x")" = cxl_mem ] && b=$((b + 1))
	done
	for x in $CXL/devices/endpoint*; do [ -e "$x" ] && e=$((e + 1)); done
	echo "roots=$r ports=$p dports=$d memdevs=$m bound=$b endpoints=$e"
}

# count KEY: one field of `topology`.
count() { topology | tr ' ' '\n' | sed -n "s/^$1=//p"; }

dump_state() {
	say "state: $(topology)"
	for d in $CXL/devices/*; do
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
# kprobe hit and miss counts and the trace buffer's overruns (calls-profile.txt).
count_calls_start() {
	[ -n "$COUNT_CALLS" ] || return 0
	for f in $COUNT_CALLS; do
		if ! echo "r:vmcount/${f#*:} $f ret=\$retval" 2> /tmp/kprobe.err >> $TRACEFS/kprobe_events; then
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
		for s in $TRACEFS/per_cpu/cpu*/stats; do
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
"#;

/// `/vm/workloads.sh`: one `cycle_NAME` function per workload, and the loop around them.
pub const WORKLOADS: &str = r#"# /vm/workloads.sh, written by cargo xtask vm run

# run_workload NAME CYCLES
run_workload() {
	name=$1
	cycles=$2
	fn=cycle_$(echo "$name" | tr - _)
	command -v "$fn" > /dev/null || fail "unknown workload $name"
	BASE=$(topology)
	say "workload $name: $cycles cycles from $BASE"
	if [ "$name" = mix ] || [ "$name" = reload-mix ]; then
		t0=$(now_ms)
		run_$(echo "$name" | tr - _) "$cycles"
		total=$(( $(now_ms) - t0 ))
		say "workload $name passed cycles=$cycles total_ms=$total per_cycle_ms=$((total / cycles))"
		return 0
	fi
	t0=$(now_ms)
	i=1
	while [ $i -le "$cycles" ]; do
		c0=$(now_ms)
		"$fn"
		settle "$BASE" || fail "$name cycle $i did not restore the topology: expected $BASE, got $(topology)"
		say "cycle $name $i/$cycles ms=$(( $(now_ms) - c0 ))"
		i=$((i + 1))
	done
	total=$(( $(now_ms) - t0 ))
	say "workload $name passed cycles=$cycles total_ms=$total per_cycle_ms=$((total / cycles))"
}

expect_no_memdev_bound() {
	left=$(bound_memdevs)
	[ -z "$left" ] || fail "$1: memdevs still bound to cxl_mem: $left"
	left=$(endpoint_names)
	[ -z "$left" ] || fail "$1: endpoint ports left: $left"
}

no_memdev_bound() { [ -z "$(bound_memdevs)$(endpoint_names)" ]; }

bind_unbound_memdevs() {
	for m in $(memdev_names); do
		[ "$(driver_of "$CXL/devices/$m")" = cxl_mem ] || sysw $CXL/drivers/cxl_mem/bind "$m"
	done
}

cycle_memdev_bind() {
	for m in $(memdev_names); do sysw $CXL/drivers/cxl_mem/unbind "$m"; done
	expect_no_memdev_bound "after unbinding the memdevs"
	for m in $(memdev_names); do sysw $CXL/drivers/cxl_mem/bind "$m"; done
}

# The modules that use module $1's symbols, each after those that use it in turn: the order
# they unload in. Kernels differ: 7.2's cxl_pci needs cxl_mem (it imports
# devm_cxl_add_classdev from it), 6.1's and 6.12's do not.
holders() {
	local h
	for h in /sys/module/$1/holders/*; do
		[ -e "$h" ] || continue
		holders "${h##*/}"
		echo "${h##*/}"
	done
}

# The words of $1 in reverse order.
reversed() {
	r=
	for w in $1; do r="$w $r"; done
	echo $r
}

# reload MODULE CHECK: unloads MODULE (after the modules holding it, which cannot stay
# without it), runs CHECK, and loads them all back, MODULE first.
reload() {
	above=$(holders "$1" | awk '!seen[$0]++')
	if [ -n "$above" ] && [ "$RELOAD_NOTED" != "$1" ]; then
		say "$1 is used by $(echo $above): they are unloaded and loaded with it"
		RELOAD_NOTED=$1
	fi
	for m in $above $1; do
		# EAGAIN is transient: someone (a tracer registering a kprobe on the module, say)
		# holds a reference for a moment. Try a few times before calling it a failure.
		tries=0
		until rmmod "$m" 2> /tmp/rmmod.err; do
			tries=$((tries + 1))
			grep -q "temporarily unavailable" /tmp/rmmod.err && [ $tries -lt 20 ] || fail "rmmod $m failed: $(cat /tmp/rmmod.err)"
			sleep 0.1
		done
		[ ! -e "/sys/module/$m" ] || fail "module $m still loaded after rmmod"
	done
	$2 "after rmmod $(echo $above $1)"
	for m in $1 $(reversed "$above"); do
		modprobe "$m" 2> /tmp/modprobe.err || fail "modprobe $m failed: $(cat /tmp/modprobe.err)"
	done
}

cycle_cxl_mem_reload() { reload cxl_mem expect_no_memdev_bound; }

expect_no_memdev() {
	left=$(memdev_names)
	[ -z "$left" ] || fail "$1: memdevs left: $left"
}

cycle_cxl_pci_reload() { reload cxl_pci expect_no_memdev; }

# PCI functions of class 0x050210: CXL memory device (type3).
type3_functions() {
	for d in /sys/bus/pci/devices/*; do
		[ "$(cat "$d/class")" = 0x050210 ] && echo "${d##*/}"
	done
}

cycle_type3_rescan() {
	devs=$(type3_functions)
	[ -n "$devs" ] || fail "no CXL type3 PCI function (class 0x050210) to remove"
	for d in $devs; do sysw "/sys/bus/pci/devices/$d/remove" 1; done
	expect_no_memdev "after PCI remove of $devs"
	sysw /sys/bus/pci/rescan 1
}

# PCI functions that are the upstream device of a CXL port: switch upstream ports.
switch_upstream_ports() {
	for p in $CXL/devices/port*; do
		[ -e "$p/uport" ] || continue
		u=$(readlink -f "$p/uport")
		case "${u##*/}" in
		????:??:??.?) echo "${u##*/}" ;;
		esac
	done
}

cycle_upstream_rescan() {
	devs=$(switch_upstream_ports)
	[ -n "$devs" ] || fail "no switch upstream port among the CXL ports (this workload needs --topology switch)"
	for d in $devs; do sysw "/sys/bus/pci/devices/$d/remove" 1; done
	expect_no_memdev "after PCI remove of the switch upstream port $devs"
	sysw /sys/bus/pci/rescan 1
}

acpi0017() {
	for d in /sys/bus/platform/devices/ACPI0017:*; do [ -e "$d" ] && echo "${d##*/}"; done
}

cycle_acpi_unbind() {
	dev=$(acpi0017)
	[ -n "$dev" ] || fail "no ACPI0017 platform device (is the CXL host bridge emulated?)"
	sysw /sys/bus/platform/drivers/cxl_acpi/unbind "$dev"
	left=$(ls -d $CXL/devices/root* $CXL/devices/port* 2> /dev/null)
	[ -z "$left" ] || fail "CXL ports left after unbinding $dev from cxl_acpi: $left"
	# The memdevs lose their driver asynchronously (cxl_core's detach work): wait for it, or
	# it could undo the rebind below.
	wait_until "releasing the memdevs from cxl_mem after the root went away" no_memdev_bound
	sysw /sys/bus/platform/drivers/cxl_acpi/bind "$dev"
}

# The ports the endpoints hang off (the parent device of each endpoint).
endpoint_parents() {
	for e in $CXL/devices/endpoint*; do
		[ -e "$e" ] || continue
		p=$(readlink -f "$e/..")
		echo "${p##*/}"
	done | sort -u
}

cycle_port_unbind() {
	ports=$(endpoint_parents)
	[ -n "$ports" ] || fail "no endpoint port to find the ports above it"
	for p in $ports; do sysw $CXL/drivers/cxl_port/unbind "$p"; done
	left=$(endpoint_names)
	[ -z "$left" ] || fail "endpoints left after unbinding $ports from cxl_port: $left"
	# The memdevs lose their driver asynchronously (cxl_core's detach work).
	wait_until "releasing the memdevs from cxl_mem after unbinding $ports" no_memdev_bound
	# A switch port with no endpoint left is unregistered (cxl_detach_ep), asynchronously:
	# memdev probe enumerates it again. A host-bridge port stays and is bound back here. A
	# bind that fails because the port went away meanwhile is that unregistering.
	for p in $ports; do
		[ -e "$CXL/devices/$p" ] || continue
		echo "$p" 2> /tmp/sysw.err > $CXL/drivers/cxl_port/bind && continue
		usleep 500000
		[ ! -e "$CXL/devices/$p" ] || fail "binding $p back to cxl_port failed: $(sed 's/^.*: //' /tmp/sysw.err)"
	done
	bind_unbound_memdevs
}

# The racing loops of `mix`: the same operations, errors only counted.
race_memdev_bind() {
	i=0
	while [ $i -lt "$1" ]; do
		for m in $(memdev_names); do tryw $CXL/drivers/cxl_mem/unbind "$m"; done
		for m in $(memdev_names); do tryw $CXL/drivers/cxl_mem/bind "$m"; done
		i=$((i + 1))
	done
	say "mix: memdev-bind loop done ($1 cycles)"
}

race_acpi_unbind() {
	dev=$(acpi0017)
	i=0
	while [ $i -lt "$1" ]; do
		tryw /sys/bus/platform/drivers/cxl_acpi/unbind "$dev"
		tryw /sys/bus/platform/drivers/cxl_acpi/bind "$dev"
		i=$((i + 1))
	done
	say "mix: acpi-unbind loop done ($1 cycles)"
}

cycle_mix() { :; }
cycle_reload_mix() { :; }

race_cxl_mem_reload() {
	above=$(holders cxl_mem | awk '!seen[$0]++')
	i=0
	while [ $i -lt "$1" ]; do
		for m in $above cxl_mem; do rmmod "$m" 2> /dev/null || echo x >> /tmp/race.errors; done
		for m in cxl_mem $(reversed "$above"); do modprobe "$m" 2> /dev/null || echo x >> /tmp/race.errors; done
		i=$((i + 1))
	done
	say "reload-mix: cxl-mem-reload loop done ($1 cycles)"
}

# run_race NAME LOOP_A LOOP_B CYCLES: the two loops in parallel, then a restore: the root
# bound, every module loaded at boot loaded (a reload loop may have stopped between rmmod and
# modprobe), then every memdev bound, until the topology reads as before.
run_race() {
	: > /tmp/race.errors
	$2 "$4" &
	a=$!
	$3 "$4" &
	b=$!
	wait $a
	wait $b
	say "$1: $(wc -l < /tmp/race.errors) writes failed while racing (expected: the loops undo each other)"
	dev=$(acpi0017)
	[ -e "/sys/bus/platform/drivers/cxl_acpi/$dev" ] || sysw /sys/bus/platform/drivers/cxl_acpi/bind "$dev"
	for m in $LOAD_MODULES; do
		[ -e "/sys/module/$m" ] || modprobe "$m" 2> /tmp/modprobe.err || fail "modprobe $m failed after $1: $(cat /tmp/modprobe.err)"
	done
	n=0
	while [ "$(topology)" != "$BASE" ] && [ $n -lt $((SETTLE_SECS * 10)) ]; do
		for m in $(memdev_names); do
			[ "$(driver_of "$CXL/devices/$m")" = cxl_mem ] || tryw $CXL/drivers/cxl_mem/bind "$m"
		done
		usleep 100000
		n=$((n + 1))
	done
	settle "$BASE" || fail "$1 did not restore the topology: expected $BASE, got $(topology)"
}

run_mix() {
	[ -n "$(acpi0017)" ] || fail "no ACPI0017 platform device (is the CXL host bridge emulated?)"
	run_race mix race_memdev_bind race_acpi_unbind "$1"
}

run_reload_mix() { run_race reload-mix race_memdev_bind race_cxl_mem_reload "$1"; }
"#;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(tracer: bool, manual_tracer: bool, load_cxl: bool) -> String {
        GuestConfig {
            nonce: "n",
            expect_memdevs: 2,
            tracer,
            manual_tracer,
            load_cxl,
            basic_modules: &["virtio_pci".to_owned(), "9p".to_owned()],
            count_calls: &["cxl_mem:cxl_mem_probe".to_owned(), "devm_cxl_add_port".to_owned()],
            workloads: &[Workload::MemdevBind, Workload::Mix],
            cycles: 3,
            user_command: "'/vm/script' 'a b'".to_owned(),
            load_modules: &["cxl_acpi".to_owned()],
            settle_secs: 30,
        }
        .render()
    }

    #[test]
    fn config_tells_init_how_to_run_the_tracer() {
        let c = config(true, false, true);
        assert!(c.contains("TRACER='1'\n") && c.contains("LOAD_CXL='1'\n"), "{c}");
        assert!(c.contains("BASIC_MODULES='virtio_pci 9p'\n"), "{c}");
        assert!(c.contains("COUNT_CALLS='cxl_mem:cxl_mem_probe devm_cxl_add_port'\n"), "{c}");
        assert!(c.contains("WORKLOADS='memdev-bind mix'\n"), "{c}");
        // The user's command is quoted once more, to survive `. /vm/config`.
        assert!(c.contains(r#"USER_CMD=''\''/vm/script'\'' '\''a b'\'''"#), "{c}");
        assert!(config(true, true, false).contains("TRACER='manual'\nLOAD_CXL='0'\n"));
        assert!(config(false, false, true).contains("TRACER='0'\n"));
    }

    #[test]
    fn init_branches_on_every_tracer_mode() {
        for mode in [r#""$TRACER" = manual"#, r#""$TRACER" = 1"#, r#""$LOAD_CXL" = 1"#] {
            assert!(INIT.contains(mode), "/init does not test {mode}");
        }
        assert!(RUN_WORKLOADS.contains("trap count_calls_stop EXIT"));
        assert!(LIB.contains("count_calls_start()") && LIB.contains("topology_ready()"));
    }
}
