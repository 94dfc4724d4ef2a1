#!/bin/bash
# shellcheck shell=bash
# /vm/cxl-cli: one cycle of the cxl-cli workload (docs/vm.md, "The cxl-cli workload"): the
# flows ndctl's own CXL tests exercise, driven with ndctl's `cxl` tool ($CXL) and jq as a
# CXL tester types them. Each flow prints one result line for the host,
#   tracer-vm: flow NAME pass|fail|skip: WHY (ms=N)
# leaves the topology as it found it (checked before the next flow starts), and a flow that
# cannot apply on this kernel is a skip with its reason. Exits 1 when a flow failed.
#
# Flows: topology (cxl list -B -P -E -T -D -M -R against sysfs), memdev-toggle
# (disable-memdev --force / enable-memdev; a switch port goes with its last memdev and
# comes back with it), port-toggle (disable-port --force / enable-port -m; a switch port,
# once gone, is brought back by enabling its memdevs), region-create (create-region, which
# commits: only on a kernel that can commit in a VM, REGION_COMMIT), region-disable
# (disable-region / enable-region), region-destroy (disable-region, destroy-region),
# bus-teardown (disable-bus --force, then the root's platform device bound to cxl_acpi).
#
# Runs in the guest's Debian userland (bash, jq, ndctl's tools), from cycle_cxl_cli in
# workloads.sh: `/vm/debian /vm/cxl-cli`. By hand:
# `cargo xtask vm run --kernel 7.2 --no-tracer --workload cxl-cli --cycles 1`.
# shellcheck source=config.example
. /vm/config
set -u -o pipefail

SYS=/sys/bus/cxl/devices
: "${CXL:?run it through /vm/debian, which sets CXL}"

say() { echo "tracer-vm: $*"; }
ms() { echo $(( ${EPOCHREALTIME/./} / 1000 )); }

# Why the current flow failed or was skipped, set by the helpers below; OUT holds the last
# command's standard output.
WHY=
OUT=
FAILED=0

# run CMD ARGS: runs a command, its output in OUT; on failure says which and its error.
run() {
	if ! OUT=$("$@" 2> /tmp/cxl-cli.err); then
		WHY="\`$*\` failed: $(grep -v '^\s*$' /tmp/cxl-cli.err | tail -n 2 | tr '\n' ' ')"
		return 1
	fi
}

# check WHAT TEST ARGS: the test must hold, else WHAT is why the flow failed.
check() {
	local what=$1
	shift
	"$@" && return 0
	WHY=$what
	return 1
}

# wait_for WHAT TEST ARGS: polls the test for up to SETTLE_SECS.
wait_for() {
	local what=$1 n=0
	shift
	until "$@"; do
		n=$((n + 1))
		if [ $n -ge $((SETTLE_SECS * 10)) ]; then
			WHY="$what did not happen within $SETTLE_SECS s: $(topology)"
			return 1
		fi
		sleep 0.1
	done
}

count_of() { local n=0 f; for f in "$@"; do [ -e "$f" ] && n=$((n + 1)); done; echo $n; }

driver_of() { [ -e "$1/driver" ] && basename "$(readlink "$1/driver")"; }

# The topology as workloads.sh sees it (lib.sh `topology`): roots, ports, dports, memdevs,
# memdevs bound to cxl_mem, endpoints.
topology() {
	local bound=0 m
	for m in "$SYS"/mem*; do [ "$(driver_of "$m")" = cxl_mem ] && bound=$((bound + 1)); done
	echo "roots=$(count_of "$SYS"/root*) ports=$(count_of "$SYS"/port*) dports=$(count_of "$SYS"/*/dport*)" \
		"memdevs=$(count_of "$SYS"/mem*) bound=$bound endpoints=$(count_of "$SYS"/endpoint*)"
}

# shellcheck disable=SC2317 # a test wait_for or check runs
is_topology() { [ "$(topology)" = "$1" ]; }

# jq over the last command's output.
q() { jq -r "$@" <<< "$OUT"; }

# Objects with key $1 anywhere in cxl list's nested output.
nested() { q "[.. | objects | select(has(\"$1\"))] | length"; }

# flow NAME: runs flow_NAME (0 pass, 1 fail, 77 skip, as ndctl's tests) and prints its
# line; a flow that leaves the topology other than it found it fails.
flow() {
	local name=$1 before t0 rc verdict
	before=$(topology)
	WHY=
	t0=$(ms)
	case $name in
	topology) flow_topology ;;
	memdev-toggle) flow_memdev_toggle ;;
	port-toggle) flow_port_toggle ;;
	region-create) flow_region_create ;;
	region-disable) flow_region_disable ;;
	region-destroy) flow_region_destroy ;;
	bus-teardown) flow_bus_teardown ;;
	*) WHY="no flow $name" && false ;;
	esac
	rc=$?
	if [ $rc = 0 ] && ! wait_for "restoring the topology ($before)" is_topology "$before"; then
		rc=1
	fi
	case $rc in
	0) verdict=pass ;;
	77) verdict=skip ;;
	*) verdict=fail FAILED=1 ;;
	esac
	say "flow $name $verdict: ${WHY:-no reason given} (ms=$(( $(ms) - t0 )))"
	[ $rc = 1 ] && restore "$before"
}

# After a failed flow, the topology brought back as far as it goes (the root bound, every
# memdev enabled), so that the next flows start from it; what stays broken fails them too.
restore() {
	local dev m
	dev=$(root_device) && [ ! -e "/sys/bus/platform/drivers/cxl_acpi/$dev" ] \
		&& echo "$dev" > /sys/bus/platform/drivers/cxl_acpi/bind
	for m in "$SYS"/mem*; do
		[ -e "$m" ] && [ -z "$(driver_of "$m")" ] && "$CXL" enable-memdev "${m##*/}" > /dev/null 2>&1
	done
	wait_for "restoring the topology after a failed flow" is_topology "$1" \
		|| say "cxl-cli: the topology is not what it was before the failed flow: $(topology), was $1"
	return 0
}

# The memdevs bound now, by name.
enabled_memdevs() { local m; for m in "$SYS"/mem*; do [ "$(driver_of "$m")" = cxl_mem ] && basename "$m"; done; }

# Ports by depth (1: host bridge ports, 2 and more: switch ports).
ports_at() {
	run "$CXL" list -P || return 1
	q ".. | objects | select(has(\"port\")) | select(.depth $1) | .port"
}

# The memdevs below a port, enabled ones only.
memdevs_below() {
	run "$CXL" list -M -p "$1" || return 1
	q '.[].memdev'
}

flow_topology() {
	local bad=() got want what
	run "$CXL" list -B -i || return 1
	got=$(q length) want=$(count_of "$SYS"/root*)
	[ "$got" = "$want" ] || bad+=("buses: cxl list -B $got, sysfs root* $want")
	run "$CXL" list -P -i || return 1
	got=$(nested port) want=$(count_of "$SYS"/port*)
	[ "$got" = "$want" ] || bad+=("ports: cxl list -P $got, sysfs port* $want")
	run "$CXL" list -E -i || return 1
	got=$(nested endpoint) want=$(count_of "$SYS"/endpoint*)
	[ "$got" = "$want" ] || bad+=("endpoints: cxl list -E $got, sysfs endpoint* $want")
	run "$CXL" list -B -P -T || return 1
	got=$(q '[.. | objects | select(has("dports")) | .dports | length] | add // 0') want=$(count_of "$SYS"/*/dport*)
	[ "$got" = "$want" ] || bad+=("dports: cxl list -B -P -T $got, sysfs */dport* $want")
	run "$CXL" list -B -P -E -D -i || return 1
	got=$(nested decoder) want=$(count_of "$SYS"/decoder*)
	[ "$got" = "$want" ] || bad+=("decoders: cxl list -B -P -E -D -i $got, sysfs decoder* $want")
	run "$CXL" list -M -i || return 1
	got=$(q length) want=$(count_of "$SYS"/mem*)
	[ "$got" = "$want" ] || bad+=("memdevs: cxl list -M $got, sysfs mem* $want")
	run "$CXL" list -R || return 1
	got=$(q length) want=$(count_of "$SYS"/region*)
	[ "$got" = "$want" ] || bad+=("regions: cxl list -R $got, sysfs region* $want")
	if [ ${#bad[@]} -gt 0 ]; then
		what=$(IFS=';'; echo "${bad[*]}")
		WHY="cxl list disagrees with sysfs: $what"
		return 1
	fi
	WHY="cxl list matches sysfs: $(topology) decoders=$(count_of "$SYS"/decoder*) regions=$(count_of "$SYS"/region*)"
}

# shellcheck disable=SC2317 # a test wait_for or check runs
memdev_disabled() { [ -z "$(driver_of "$SYS/$1")" ]; }
# shellcheck disable=SC2317 # a test wait_for or check runs
memdev_enabled() { [ "$(driver_of "$SYS/$1")" = cxl_mem ] && endpoint_of "$1" > /dev/null; }
# The endpoint port of a memdev: the endpoint whose upstream device (uport) it is.
# shellcheck disable=SC2317 # a test wait_for or check runs
endpoint_of() {
	local e
	for e in "$SYS"/endpoint*; do
		[ -e "$e/uport" ] && [ "$(basename "$(readlink -f "$e/uport")")" = "$1" ] && basename "$e" && return 0
	done
	return 1
}
# shellcheck disable=SC2317 # a test wait_for or check runs
port_gone() { [ ! -e "$SYS/$1" ]; }
# shellcheck disable=SC2317 # a test wait_for or check runs
port_back() { [ -e "$SYS/$1" ]; }

# Each memdev disabled and enabled alone; then, as ndctl's topology test does, every memdev
# below a switch port disabled (the port goes with the last one) and enabled (it comes back).
flow_memdev_toggle() {
	local mems m s below n=0 switches=0
	mems=$(enabled_memdevs)
	[ -n "$mems" ] || { WHY="no memdev bound to cxl_mem"; return 1; }
	for m in $mems; do
		run "$CXL" disable-memdev --force "$m" || return 1
		wait_for "$m losing its driver after disable-memdev" memdev_disabled "$m" || return 1
		run "$CXL" list -i -m "$m" || return 1
		check "$m: cxl list says state $(q '.[0].state // "enabled"') after disable-memdev" \
			[ "$(q '.[0].state // "enabled"')" = disabled ] || return 1
		run "$CXL" enable-memdev "$m" || return 1
		wait_for "$m bound with its endpoint after enable-memdev" memdev_enabled "$m" || return 1
		n=$((n + 1))
	done
	for s in $(ports_at '>= 2'); do
		below=$(memdevs_below "$s") || return 1
		[ -n "$below" ] || continue
		switches=$((switches + 1))
		for m in $below; do run "$CXL" disable-memdev --force "$m" || return 1; done
		wait_for "switch port $s going away with its last memdev" port_gone "$s" || return 1
		# shellcheck disable=SC2086 # one word per memdev
		run "$CXL" enable-memdev $below || return 1
		wait_for "switch port $s coming back with its memdevs" port_back "$s" || return 1
		for m in $below; do wait_for "$m enabled again" memdev_enabled "$m" || return 1; done
	done
	WHY="$n memdevs disabled and enabled; $switches switch port(s) gone with their memdevs and back"
}

# shellcheck disable=SC2317 # a test wait_for or check runs
port_disabled() { [ -e "$SYS/$1" ] && [ -z "$(driver_of "$SYS/$1")" ]; }
# shellcheck disable=SC2317 # a test wait_for or check runs
port_enabled() { [ "$(driver_of "$SYS/$1")" = cxl_port ]; }
# shellcheck disable=SC2317 # a test wait_for or check runs
all_enabled() { local m; for m in "$@"; do memdev_enabled "$m" || return 1; done; }

# Each host-bridge port disabled with everything below it and enabled with its memdevs
# (`enable-port -m`); each switch port disabled, which unregisters it, and brought back by
# enabling its memdevs.
flow_port_toggle() {
	local p below hb=0 sw=0 off unlisted=()
	for p in $(ports_at '== 1'); do
		below=$(memdevs_below "$p") || return 1
		# A port with no memdev below is left alone: `enable-port -m` would have nothing to
		# bring back. Seen on 6.1 with ndctl 85: `cxl list -M -p port1` lists none of the
		# memdevs below port1, so enable-port -m left them unbound (with or without the tracer).
		[ -n "$below" ] || { unlisted+=("$p"); continue; }
		run "$CXL" disable-port --force "$p" || return 1
		check "$p still bound to cxl_port after disable-port" port_disabled "$p" || return 1
		run "$CXL" list -M -i -p "$p" || return 1
		off=$(q 'map(select(.state == "disabled")) | length')
		check "$p: $off of $(wc -w <<< "$below") memdevs below it disabled after disable-port --force" \
			[ "$off" = "$(wc -w <<< "$below")" ] || return 1
		run "$CXL" enable-port -m "$p" || return 1
		check "$p not bound to cxl_port after enable-port" port_enabled "$p" || return 1
		# shellcheck disable=SC2086 # one word per memdev
		wait_for "the memdevs below $p ($below) enabled after enable-port -m" all_enabled $below || return 1
		hb=$((hb + 1))
	done
	for p in $(ports_at '>= 2'); do
		below=$(memdevs_below "$p") || return 1
		[ -n "$below" ] || continue
		run "$CXL" disable-port --force "$p" || return 1
		wait_for "switch port $p going away after disable-port --force" port_gone "$p" || return 1
		# shellcheck disable=SC2086 # one word per memdev
		run "$CXL" enable-memdev $below || return 1
		wait_for "switch port $p coming back with its memdevs" port_back "$p" || return 1
		# shellcheck disable=SC2086 # one word per memdev
		wait_for "the memdevs below $p ($below) enabled again" all_enabled $below || return 1
		sw=$((sw + 1))
	done
	if [ $hb = 0 ] && [ ${#unlisted[@]} -gt 0 ]; then
		WHY="cxl list -M -p lists no memdev below ${unlisted[*]} on this kernel: enable-port -m could not bring them back"
		return 77
	fi
	[ $hb -gt 0 ] || { WHY="no host-bridge port to disable"; return 1; }
	WHY="$hb host-bridge port(s) disabled and enabled with their memdevs; $sw switch port(s) disabled and brought back by their memdevs"
}

REGION=
REGION_WHY=

# A one-way pmem region on the first memdev that has a pmem-capable single-target root
# decoder above it with room, as ndctl's create-region test makes one: create-region
# programs and commits the decoders and enables the region.
flow_region_create() {
	local m dec tried=()
	REGION=
	if [ "$REGION_COMMIT" != 1 ]; then
		REGION_WHY="this kernel cannot commit a region in a VM (CONFIG_CXL_REGION_INVALIDATION_TEST off)"
		WHY=$REGION_WHY
		return 77
	fi
	for m in $(enabled_memdevs); do
		run "$CXL" list -D -d root -m "$m" || return 1
		dec=$(q '[.[] | select(.pmem_capable == true and .nr_targets == 1 and (.max_available_extent // 0) > 0)][0].decoder // empty')
		[ -n "$dec" ] || continue
		if ! run "$CXL" create-region -t pmem -d "$dec" -m "$m"; then
			tried+=("$m on $dec: $WHY")
			continue
		fi
		REGION=$(q '.region // empty')
		check "create-region printed no region: $OUT" [ -n "$REGION" ] || return 1
		check "$REGION not committed after create-region (commit=$(cat "$SYS/$REGION/commit" 2> /dev/null))" \
			[ "$(cat "$SYS/$REGION/commit" 2> /dev/null)" = 1 ] || return 1
		check "$REGION not bound to cxl_region after create-region" [ "$(driver_of "$SYS/$REGION")" = cxl_region ] || return 1
		WHY="$REGION on $dec with $m: committed and enabled"
		return 0
	done
	REGION_WHY="region-create failed"
	if [ ${#tried[@]} -gt 0 ]; then
		WHY="no region could be made: ${tried[*]}"
	else
		WHY="no memdev has a pmem-capable single-target root decoder with room above it"
	fi
	return 1
}

# shellcheck disable=SC2317 # a test wait_for or check runs
region_disabled() { [ -z "$(driver_of "$SYS/$REGION")" ]; }
# shellcheck disable=SC2317 # a test wait_for or check runs
region_enabled() { [ "$(driver_of "$SYS/$REGION")" = cxl_region ]; }

flow_region_disable() {
	[ -n "$REGION" ] || { WHY="no region to disable: ${REGION_WHY}"; return 77; }
	run "$CXL" disable-region "$REGION" || return 1
	check "$REGION still bound after disable-region" region_disabled || return 1
	run "$CXL" enable-region "$REGION" || return 1
	check "$REGION not bound after enable-region" region_enabled || return 1
	run "$CXL" disable-region "$REGION" || return 1
	check "$REGION still bound after the second disable-region" region_disabled || return 1
	check "$REGION lost its commit on disable-region" [ "$(cat "$SYS/$REGION/commit")" = 1 ] || return 1
	WHY="$REGION disabled, enabled and disabled again, still committed"
}

flow_region_destroy() {
	[ -n "$REGION" ] || { WHY="no region to destroy: ${REGION_WHY}"; return 77; }
	run "$CXL" destroy-region "$REGION" || return 1
	check "$REGION still in sysfs after destroy-region" [ ! -e "$SYS/$REGION" ] || return 1
	WHY="$REGION destroyed (decoders reset, region deleted)"
	REGION=
}

# The platform device cxl_acpi binds to make the CXL root (as workloads.sh's
# cxl_root_device): ACPI0017:00 on QEMU, cxl_acpi.0 with cxl_test.
root_device() {
	local d
	for d in /sys/bus/platform/devices/ACPI0017:* /sys/bus/platform/devices/cxl_acpi.*; do
		[ -e "$d" ] && basename "$d" && return 0
	done
	return 1
}

# shellcheck disable=SC2317 # a test wait_for or check runs
no_memdev_bound() { [ -z "$(enabled_memdevs)" ]; }

# The bus disabled as ndctl's topology test ends (`disable-bus --force`: cxl_acpi unbound
# from the root's platform device, every port gone), then brought back as a tester does:
# the platform device bound to cxl_acpi again, which re-probes the memdevs.
flow_bus_teardown() {
	local dev bus before left
	before=$(topology)
	dev=$(root_device) || { WHY="no CXL root platform device (ACPI0017:* or cxl_acpi.*)"; return 1; }
	run "$CXL" list -B || return 1
	bus=$(q '.[0].bus // empty')
	[ -n "$bus" ] || { WHY="cxl list -B lists no bus"; return 1; }
	run "$CXL" disable-bus --force "$bus" || return 1
	left=$(for d in "$SYS"/root* "$SYS"/port* "$SYS"/endpoint*; do [ -e "$d" ] && printf '%s ' "${d##*/}"; done)
	check "CXL devices left after disable-bus: $left" [ -z "$left" ] || return 1
	wait_for "the memdevs released after disable-bus" no_memdev_bound || return 1
	if ! echo "$dev" 2> /tmp/cxl-cli.err > /sys/bus/platform/drivers/cxl_acpi/bind; then
		WHY="binding $dev to cxl_acpi failed: $(cat /tmp/cxl-cli.err)"
		return 1
	fi
	wait_for "the topology coming back after binding $dev" is_topology "$before" || return 1
	run "$CXL" list -B || return 1
	check "cxl list -B does not list $bus after the bind" [ "$(q '.[0].bus // empty')" = "$bus" ] || return 1
	WHY="$bus disabled (no port left, memdevs released), $dev bound to cxl_acpi again, topology back"
}

for f in topology memdev-toggle port-toggle region-create region-disable region-destroy bus-teardown; do
	flow "$f"
done
exit $FAILED
