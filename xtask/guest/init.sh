#!/bin/sh
# shellcheck shell=dash
# /init of the QEMU CXL guest (docs/vm.md, "What a run does"): mounts, loads the modules the
# results share needs and the CXL drivers, waits for the topology, runs /vm/workload (under
# the tracer unless told otherwise), saves dmesg, prints the result line the host waits for
# and powers off. It must never return: the kernel panics when init exits.
#
# Runs as PID 1 of every guest `cargo xtask vm run` boots (the harness puts it at /init of
# the initramfs, with /vm/config beside it). Not for running by hand: boot it with
# `cargo xtask vm run --no-tracer` and read console.log.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t debugfs debugfs /sys/kernel/debug
mount -t tracefs tracefs /sys/kernel/tracing
mount -t bpf bpf /sys/fs/bpf
# shellcheck source=config.example
. /vm/config
# shellcheck source=lib.sh
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

# The Debian userland (vm/userland.rs), for /vm/debian: the host's sid root, read-only over
# 9p (cache=loose: it never changes under a run), with the guest's own /proc, /sys, /dev,
# /tmp, /share, /vm and kernel modules bound in. kmod reads only its binary module index,
# which depmod makes from the guest's modules; the harness's text modules.dep, which
# busybox's modprobe reads, is kept as the harness wrote it.
mount_debian() {
	t0=$(now_ms)
	mkdir -p /debian
	mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 debian /debian 2> /tmp/mount.err \
		|| setup_failed "cannot mount the Debian userland share: $(cat /tmp/mount.err)"
	for d in proc sys dev tmp share vm; do
		mount -o rbind "/$d" "/debian/$d" 2> /tmp/mount.err \
			|| setup_failed "cannot bind /$d into the Debian userland: $(cat /tmp/mount.err)"
	done
	mount -o bind /lib/modules /debian/usr/lib/modules 2> /tmp/mount.err \
		|| setup_failed "cannot bind /lib/modules into the Debian userland: $(cat /tmp/mount.err)"
	# /usr/local/bin there: the guest's tracer, when it has one, and busybox's usleep, which
	# /vm/lib.sh uses (Debian has none), so that scripts there have both.
	mount -t tmpfs -o mode=755 tmpfs /debian/usr/local/bin 2> /tmp/mount.err \
		|| setup_failed "cannot mount a tmpfs at /usr/local/bin in the Debian userland: $(cat /tmp/mount.err)"
	[ ! -x /bin/tracer ] || cp /bin/tracer /debian/usr/local/bin/tracer
	cp /bin/busybox /debian/usr/local/bin/busybox && ln -s busybox /debian/usr/local/bin/usleep
	release=$(uname -r)
	cp "/lib/modules/$release/modules.dep" /tmp/modules.dep.harness
	chroot /debian /usr/sbin/depmod -a "$release" 2> /tmp/depmod.err \
		|| setup_failed "depmod in the Debian userland failed: $(cat /tmp/depmod.err)"
	cp /tmp/modules.dep.harness "/lib/modules/$release/modules.dep"
	say "debian userland mounted at /debian, modules indexed for kmod: ms=$(( $(now_ms) - t0 ))"
}
[ "$DEBIAN" != 1 ] || mount_debian

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
	# -v: the kernel side's diagnostics, if any, in tracer.log (and the programs with their
	# logging are what every kernel's verifier checks).
	set -- --format json --record /share/out/trace.bin -v
	[ -z "$TRACER_KNOWN" ] || set -- "$@" --known "$TRACER_KNOWN"
	say "running the workload under: tracer run $*"
	/bin/tracer run "$@" -- /vm/workload > /share/out/findings.jsonl 2> /share/out/tracer.log
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
