#!/bin/sh
# shellcheck shell=dash
# /vm/debian CMD ARGS: runs CMD in the Debian userland (docs/vm.md, "The Debian userland"):
# the host's sid root with ndctl's tools, bash, jq and kmod, which /init mounted read-only
# at /debian with the guest's /proc, /sys, /dev, /tmp, /share, /vm and kernel modules bound
# in. The environment is a clean one, with CXL, NDCTL and DAXCTL naming ndctl's tools as
# the maintainers' tests expect; scripts still read the run's settings from /vm/config.
#
# Runs in the guest, from busybox: run-workloads.sh runs the script through it with
# `--userland debian`, cycle_cxl_cli runs /vm/cxl-cli with it. By hand:
# `cargo xtask vm run --userland debian --no-tracer -- cxl list -M`.
if [ ! -x /debian/usr/bin/cxl ]; then
	echo "tracer-vm: error: /vm/debian: the Debian userland is not mounted at /debian (it is with --userland debian or the cxl-cli workload)" >&2
	exit 127
fi
exec chroot /debian /usr/bin/env -i \
	PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TERM=linux LC_ALL=C.UTF-8 \
	CXL=/usr/bin/cxl NDCTL=/usr/bin/ndctl DAXCTL=/usr/bin/daxctl "$@"
