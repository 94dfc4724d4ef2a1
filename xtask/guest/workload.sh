#!/bin/sh
# shellcheck shell=dash
# /vm/workload: the process /init runs, under `tracer run` or alone. It runs
# /vm/run-workloads with its output on the console and in /share/out/workload.log, and
# leaves its exit status in /tmp/workload.status for /init (a status lost in the pipe would
# read as the tracer's).
#
# Runs in the guest; by hand, from a script: `/vm/workload` (it runs every --workload again).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
{ /vm/run-workloads; echo $? > /tmp/workload.status; } 2>&1 | tee /share/out/workload.log > /dev/console
exit "$(cat /tmp/workload.status 2>/dev/null || echo 255)"
