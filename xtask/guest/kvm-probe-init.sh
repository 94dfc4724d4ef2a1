#!/bin/sh
# shellcheck shell=dash
# /init of the KVM probe guest (vm/qemu.rs, kvm_works): a machine without CXL that only
# prints the line the host looks for and powers off. A guest that gets here booted with KVM.
# Its initramfs has busybox with sh, echo, poweroff and sleep, nothing else.
#
# Runs as PID 1 of the probe guest, once per host boot with --accel auto; not for running by
# hand (delete ~/.cache/tracer/kvm-probe-* to probe again).
echo "tracer-vm: kvm-probe exit=0"
poweroff -f
while :; do sleep 1; done
