#!/bin/sh
# shellcheck shell=dash
# Checks a guest booted on a source-built kernel (docs/source-kernel.md) for what it is built
# for; prints `srckernel: NAME ok|FAIL ...` lines and exits 1 when a check fails.
#
# Runs in the guest as /vm/script. By hand, with the CXL drivers loaded at boot:
#   cargo xtask vm run --kernel 7.2-src --no-tracer -- xtask/kernel/check-guest.sh
# and for cxl_test, its modules passed with --module and nothing CXL loaded at boot:
#   cargo xtask vm run --kernel 7.2-src --no-tracer --no-cxl-at-boot \
#     $(for m in BUILD/cxl_test/*.ko; do echo --module $m; done) -- xtask/kernel/check-guest.sh cxl-test
#
# shellcheck source=../guest/config.example
. /vm/config
# shellcheck source=../guest/lib.sh
. /vm/lib.sh

failed=0
ok() { say "srckernel: $1 ok${2:+: $2}"; }
bad() {
	say "srckernel: $1 FAIL: $2"
	failed=1
}

say "srckernel: kernel $(uname -r)"

# Region commits and cxl_test need these; /proc/config.gz is the kernel's own config.
check_config() {
	for want in CONFIG_CXL_BUS=m CONFIG_CXL_REGION_INVALIDATION_TEST=y CONFIG_DEBUG_INFO_BTF_MODULES=y; do
		if zcat /proc/config.gz | grep -qx "$want"; then ok "config $want"; else bad "config" "$want is not in /proc/config.gz"; fi
	done
}

# The CXL core is a module here: its types are in its own BTF, not in vmlinux's.
check_btf() {
	for m in vmlinux cxl_core cxl_port cxl_acpi cxl_pci cxl_mem; do
		if [ -e "/sys/kernel/btf/$m" ]; then ok "btf $m"; else bad "btf $m" "no /sys/kernel/btf/$m"; fi
	done
}

# A kprobe on a cxl_mem function and one on a cxl_core function (the static cxl_add_ep, a
# dport user) through tracefs, each seen firing on a memdev unbind/bind.
check_kprobes() {
	t=/sys/kernel/tracing
	[ -w $t/kprobe_events ] || { bad kprobes "no writable $t/kprobe_events"; return; }
	for probe in "probe cxl_mem:cxl_mem_probe" "add_ep cxl_core:cxl_add_ep"; do
		name=${probe%% *}
		if ! echo "p:srckernel/$name ${probe#* }" 2> /tmp/kprobe.err >> $t/kprobe_events; then
			bad "kprobe $name" "defining it failed: $(cat /tmp/kprobe.err)"
			continue
		fi
		echo 1 > "$t/events/srckernel/$name/enable"
	done
	for m in $(bound_memdevs); do
		sysw "$CXL/drivers/cxl_mem/unbind" "$m"
		sysw "$CXL/drivers/cxl_mem/bind" "$m"
	done
	topology_ready 30 || bad kprobes "the memdevs did not come back: $(topology)"
	for name in probe add_ep; do
		[ -d "$t/events/srckernel/$name" ] || continue
		# kprobe_profile: event name (without its group), hits, misses.
		hits=$(awk -v n="$name" '$1 == n { print $2 }' $t/kprobe_profile)
		if [ "${hits:-0}" -gt 0 ]; then ok "kprobe $name" "$hits hits"; else bad "kprobe $name" "never fired"; fi
		echo 0 > "$t/events/srckernel/$name/enable"
	done
	echo "-:srckernel/probe" >> $t/kprobe_events 2> /dev/null
	echo "-:srckernel/add_ep" >> $t/kprobe_events 2> /dev/null
}

# cxl_test's modules (passed with --module, in updates/) in place of the real CXL drivers:
# its mock topology comes up as platform devices and CXL devices.
check_cxl_test() {
	# Dependencies first, one by one: the guest's modules.dep gives a --module only the
	# modules it names itself (modinfo depends), and busybox modprobe does not follow a chain.
	for m in cxl_core cxl_mock cxl_pmem cxl_port cxl_mem cxl_acpi cxl_mock_mem cxl_test; do
		if modprobe "$m" 2> /tmp/modprobe.err; then ok "modprobe $m"; else bad "modprobe $m" "$(cat /tmp/modprobe.err)"; fi
	done
	for m in cxl_core cxl_acpi cxl_mem; do
		case "$(modinfo -F filename "$m" 2> /dev/null)" in
			*/updates/*) ok "module $m" "cxl_test's build (updates/)" ;;
			*) bad "module $m" "not cxl_test's build: $(modinfo -F filename "$m" 2> /dev/null)" ;;
		esac
	done
	sleep 5
	say "srckernel: cxl_test topology: $(topology)"
	for d in /sys/bus/platform/devices/cxl_*; do [ -e "$d" ] && say "srckernel: platform device ${d##*/}"; done
	if [ "$(count memdevs)" -gt 0 ]; then ok "cxl_test memdevs" "$(count memdevs)"; else bad "cxl_test memdevs" "none: $(topology)"; fi
}

check_config
case "${1:-}" in
	cxl-test) check_cxl_test ;;
	*)
		check_btf
		check_kprobes
		;;
esac
dmesg > /share/out/check-dmesg.txt
[ $failed = 0 ] || exit 1
say "srckernel: all checks passed"
