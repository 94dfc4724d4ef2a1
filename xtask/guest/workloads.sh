# shellcheck shell=dash
# /vm/workloads.sh: the built-in hotplug workloads (docs/vm.md, "Workloads"), one function
# per workload: cycle_NAME for a sequential one (one teardown and bring-up; run_workload
# checks the topology came back), run_NAME for a racing one (two loops, then a restore).
# One file, not one per workload: they share their helpers (reload, the race loops mix and
# reload-mix both use), and the guest sources it once. vm/workload.rs lists the same names
# (a test keeps them in step).
#
# Sourced in the guest after /vm/config and /vm/lib.sh; a script runs a workload with
# `/vm/run-workload NAME CYCLES`.

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
		race=run_${fn#cycle_}
		"$race" "$cycles"
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
		[ "$(driver_of "$CXL/devices/$m")" = cxl_mem ] || sysw "$CXL"/drivers/cxl_mem/bind "$m"
	done
}

cycle_memdev_bind() {
	for m in $(memdev_names); do sysw "$CXL"/drivers/cxl_mem/unbind "$m"; done
	expect_no_memdev_bound "after unbinding the memdevs"
	for m in $(memdev_names); do sysw "$CXL"/drivers/cxl_mem/bind "$m"; done
}

# The modules that use module $1's symbols, each after those that use it in turn: the order
# they unload in. Kernels differ: 7.2's cxl_pci needs cxl_mem (it imports
# devm_cxl_add_classdev from it), 6.1's and 6.12's do not.
holders() {
	local h
	for h in /sys/module/"$1"/holders/*; do
		[ -e "$h" ] || continue
		holders "${h##*/}"
		echo "${h##*/}"
	done
}

# The words of $1 in reverse order.
reversed() {
	r=
	for w in $1; do r="$w $r"; done
	echo "${r% }"
}

# reload MODULE CHECK: unloads MODULE (after the modules holding it, which cannot stay
# without it), runs CHECK, and loads them all back, MODULE first.
reload() {
	above=$(holders "$1" | awk '!seen[$0]++ { printf "%s%s", sep, $0; sep = " " }')
	if [ -n "$above" ] && [ "$RELOAD_NOTED" != "$1" ]; then
		say "$1 is used by $above: they are unloaded and loaded with it"
		RELOAD_NOTED=$1
	fi
	for m in $above $1; do
		# EAGAIN is transient: someone (a tracer registering a kprobe on the module, say)
		# holds a reference for a moment. Try a few times before calling it a failure.
		tries=0
		until rmmod "$m" 2> /tmp/rmmod.err; do
			tries=$((tries + 1))
			if ! grep -q "temporarily unavailable" /tmp/rmmod.err || [ $tries -ge 20 ]; then
				fail "rmmod $m failed: $(cat /tmp/rmmod.err)"
			fi
			sleep 0.1
		done
		[ ! -e "/sys/module/$m" ] || fail "module $m still loaded after rmmod"
	done
	$2 "after rmmod ${above:+$above }$1"
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
	for p in "$CXL"/devices/port*; do
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

# The platform device cxl_acpi binds to make the CXL root: ACPI0017:00 from the firmware
# tables of QEMU's CXL host bridge, cxl_acpi.0 made by cxl_test's mocks.
cxl_root_device() {
	for d in /sys/bus/platform/devices/ACPI0017:* /sys/bus/platform/devices/cxl_acpi.*; do
		[ -e "$d" ] && echo "${d##*/}"
	done
}

NO_ROOT_DEVICE="no CXL root platform device (ACPI0017 of an emulated CXL host bridge, or cxl_test's cxl_acpi.0)"


cycle_acpi_unbind() {
	dev=$(cxl_root_device)
	[ -n "$dev" ] || fail "$NO_ROOT_DEVICE"
	sysw /sys/bus/platform/drivers/cxl_acpi/unbind "$dev"
	left=$(ls -d "$CXL"/devices/root* "$CXL"/devices/port* 2> /dev/null)
	[ -z "$left" ] || fail "CXL ports left after unbinding $dev from cxl_acpi: $left"
	# The memdevs lose their driver asynchronously (cxl_core's detach work): wait for it, or
	# it could undo the rebind below.
	wait_until "releasing the memdevs from cxl_mem after the root went away" no_memdev_bound
	sysw /sys/bus/platform/drivers/cxl_acpi/bind "$dev"
}

# The ports the endpoints hang off (the parent device of each endpoint) that cxl_port
# drives: cxl_test's RCD hangs off the root, which no driver binds.
endpoint_parents() {
	for e in "$CXL"/devices/endpoint*; do
		[ -e "$e" ] || continue
		p=$(readlink -f "$e/..")
		[ "$(driver_of "$p")" = cxl_port ] && echo "${p##*/}"
	done | sort -u
}

# How many endpoints hang off another parent than the ports in $1 (they stay bound).
endpoints_elsewhere() {
	n=0
	for e in "$CXL"/devices/endpoint*; do
		[ -e "$e" ] || continue
		p=$(readlink -f "$e/..")
		case " $1 " in
		*" ${p##*/} "*) ;;
		*) n=$((n + 1)) ;;
		esac
	done
	echo $n
}

only_kept_bound() { [ "$(count bound)" = "$KEPT" ] && [ "$(count endpoints)" = "$KEPT" ]; }

cycle_port_unbind() {
	ports=$(endpoint_parents)
	[ -n "$ports" ] || fail "no port bound to cxl_port with an endpoint below it"
	ports=$(echo "$ports" | tr '\n' ' ')
	KEPT=$(endpoints_elsewhere "$ports")
	for p in $ports; do sysw "$CXL"/drivers/cxl_port/unbind "$p"; done
	# The memdevs lose their driver asynchronously (cxl_core's detach work).
	wait_until "releasing the memdevs below $ports from cxl_mem" only_kept_bound
	# A switch port with no endpoint left is unregistered (cxl_detach_ep), asynchronously:
	# memdev probe enumerates it again. A host-bridge port stays and is bound back here. A
	# bind that fails because the port went away meanwhile is that unregistering.
	for p in $ports; do
		[ -e "$CXL/devices/$p" ] || continue
		echo "$p" 2> /tmp/sysw.err > "$CXL"/drivers/cxl_port/bind && continue
		usleep 500000
		[ ! -e "$CXL/devices/$p" ] || fail "binding $p back to cxl_port failed: $(sed 's/^.*: //' /tmp/sysw.err)"
	done
	bind_unbound_memdevs
}

# The first root decoder that can hold a pmem region (a CFMWS window with the pmem flag)
# over a single host bridge.
pmem_root_decoder() {
	for d in "$CXL"/devices/root*/decoder*; do
		[ -e "$d/create_pmem_region" ] && [ "$(cat "$d/interleave_ways")" = 1 ] && echo "$d" && return
	done
}

# The first decoder of each endpoint: the memdev's own, which a region takes as a target.
endpoint_decoders() {
	for e in "$CXL"/devices/endpoint*; do
		for d in "$e"/decoder*.0; do [ -e "$d" ] && echo "$d"; done
	done
}

# region_targets ROOT_DECODER: the endpoint decoders a region on it takes. QEMU's one host
# bridge has every endpoint below it: all of them, one way each. cxl_test's windows each
# route to their own host bridges, below which its boot-time auto region holds some
# decoders: one free endpoint decoder below the window's host bridge (the port whose uport
# is the root's dport the window targets).
region_targets() {
	local id hb p e d
	if [ "$TOPOLOGY" != cxl-test ]; then
		endpoint_decoders
		return
	fi
	id=$(cut -d, -f1 < "$1/target_list")
	hb=$(readlink -f "${1%/*}/dport$id")
	for p in "$CXL"/devices/port*; do
		[ "$(readlink -f "$p/uport")" = "$hb" ] || continue
		for e in "$CXL"/devices/endpoint*; do
			case "$(readlink -f "$e")" in
			*/"${p##*/}"/*) ;;
			*) continue ;;
			esac
			for d in "$e"/decoder*.0; do
				# dpa_size reads as hex (0x0000000000000000).
				[ -e "$d" ] && [ $(($(cat "$d/dpa_size"))) = 0 ] && echo "$d" && return
			done
		done
	done
}

# A manual pmem region on the first pmem root decoder, one endpoint decoder per way, as
# `cxl create-region` builds one through sysfs: the attach of each target is
# cxl_region_attach(), which looks the root port's dport up for the target's host bridge.
# It is committed only where the kernel can (REGION_COMMIT: a kernel built with
# CXL_REGION_INVALIDATION_TEST; a stock kernel in a VM WARNs and fails the commit); then
# everything is taken down again, so the next cycle starts from the same topology.
cycle_region_attach() {
	# Its own names: run_workload counts cycles in the global i.
	local root targets ways region r size i d
	root=$(pmem_root_decoder)
	[ -n "$root" ] || fail "no root decoder over one host bridge with create_pmem_region (no pmem CFMWS window?)"
	targets=$(region_targets "$root")
	[ -n "$targets" ] || fail "no free endpoint decoder below ${root##*/} to attach"
	ways=$(echo "$targets" | wc -l)
	region=$(cat "$root/create_pmem_region")
	sysw "$root/create_pmem_region" "$region"
	r=$CXL/devices/$region
	[ -d "$r" ] || fail "$region was not created under ${root##*/}"
	sysw "$r/interleave_granularity" "$(cat "$root/interleave_granularity")"
	sysw "$r/interleave_ways" "$ways"
	sysw "$r/uuid" "$(cat /proc/sys/kernel/random/uuid)"
	size=$((256 * 1024 * 1024))
	sysw "$r/size" $((size * ways))
	i=0
	for d in $targets; do
		sysw "$d/mode" pmem
		sysw "$d/dpa_size" $size
		sysw "$r/target$i" "${d##*/}"
		i=$((i + 1))
	done
	if [ "$REGION_COMMIT" = 1 ]; then
		sysw "$r/commit" 1
		sysw "$r/commit" 0
	fi
	i=0
	for d in $targets; do
		sysw "$r/target$i" ""
		sysw "$d/dpa_size" 0
		i=$((i + 1))
	done
	sysw "$root/delete_region" "$region"
	[ ! -e "$r" ] || fail "$region still there after delete_region"
}

# ndctl's cxl tool through the maintainers' flows, in the Debian userland (cxl-cli.sh): each
# flow prints its own result line and restores the topology; a failed flow fails the cycle.
cycle_cxl_cli() {
	/vm/debian /vm/cxl-cli || fail "cxl-cli: a flow failed (its flow line above says why)"
}

# The racing loops of `mix`: the same operations, errors only counted.
race_memdev_bind() {
	i=0
	while [ $i -lt "$1" ]; do
		for m in $(memdev_names); do tryw "$CXL"/drivers/cxl_mem/unbind "$m"; done
		for m in $(memdev_names); do tryw "$CXL"/drivers/cxl_mem/bind "$m"; done
		i=$((i + 1))
	done
	say "mix: memdev-bind loop done ($1 cycles)"
}

race_acpi_unbind() {
	dev=$(cxl_root_device)
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
	dev=$(cxl_root_device)
	[ -e "/sys/bus/platform/drivers/cxl_acpi/$dev" ] || sysw /sys/bus/platform/drivers/cxl_acpi/bind "$dev"
	for m in $LOAD_MODULES; do
		[ -e "/sys/module/$m" ] || modprobe "$m" 2> /tmp/modprobe.err || fail "modprobe $m failed after $1: $(cat /tmp/modprobe.err)"
	done
	n=0
	while [ "$(topology)" != "$BASE" ] && [ $n -lt $((SETTLE_SECS * 10)) ]; do
		for m in $(memdev_names); do
			[ "$(driver_of "$CXL/devices/$m")" = cxl_mem ] || tryw "$CXL"/drivers/cxl_mem/bind "$m"
		done
		usleep 100000
		n=$((n + 1))
	done
	settle "$BASE" || fail "$1 did not restore the topology: expected $BASE, got $(topology)"
}

run_mix() {
	[ -n "$(cxl_root_device)" ] || fail "$NO_ROOT_DEVICE"
	run_race mix race_memdev_bind race_acpi_unbind "$1"
}

run_reload_mix() { run_race reload-mix race_memdev_bind race_cxl_mem_reload "$1"; }
