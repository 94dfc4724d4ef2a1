#!/bin/sh
# shellcheck shell=dash
# /vm/run-workloads: the run's built-in workloads ($WORKLOADS, $CYCLES cycles each) in
# order, then the user's command ($USER_CMD, already quoted by the host), with the
# --count-calls kretprobes around all of it.
#
# Runs in the guest, from /vm/workload. By hand in a guest: `/vm/run-workloads` (settings
# from /vm/config).
# shellcheck source=config.example
. /vm/config
# shellcheck source=lib.sh
. /vm/lib.sh
# shellcheck source=workloads.sh
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
