// SPDX-License-Identifier: GPL-2.0
/*
 * cxl_dport_bench: a load generator for `cargo xtask bench` (tracked-event capacity).
 *
 * Writing N to /sys/kernel/debug/cxl_dport_bench/run performs N iterations of the fixed
 * read-side pattern on the first memdev's dport: take the free lock (the dport's port
 * device mutex), look the dport up with cxl_mem_find_port() (its xa_load on
 * port->dports is a probed call site in cxl_core), pass it to cxl_dport_bench_use()
 * (a function taking struct cxl_dport *, so a use site), put the port, unlock.
 *
 * The module is named cxl_* on purpose: the tracer treats cxl_* modules as CXL code, so
 * its mutex_lock/mutex_unlock call sites here are probed like the driver's own. Every
 * event the tracer should see is counted here (read `events`), which is what makes the
 * drop accounting exact: generated = received + dropped.
 */
#include <linux/atomic.h>
#include <linux/debugfs.h>
#include <linux/device.h>
#include <linux/module.h>
#include <linux/sched.h>
#include <linux/version.h>

#include "cxlmem.h"

static char *memdev = "mem0";
module_param(memdev, charp, 0444);
MODULE_PARM_DESC(memdev, "the memdev whose dport is looked up");

static struct dentry *dir;
/* Tracked events caused: lookups that returned the dport, uses, locks, unlocks. */
static atomic64_t events;
static atomic64_t iterations;

/* A use: the tracer probes the entry of functions taking struct cxl_dport *. */
void cxl_dport_bench_use(struct cxl_dport *dport);
noinline void cxl_dport_bench_use(struct cxl_dport *dport)
{
	/*
	 * Keeps the call without touching the dport: an access here would be an inline
	 * dereference in CXL code, which the tracer probes too, and the events an iteration
	 * makes would no longer be the four counted below.
	 */
	barrier_data(dport);
}

static int run_set(void *data, u64 n)
{
	struct cxl_memdev *cxlmd;
	struct cxl_dport *dport, *again;
	struct cxl_port *port, *p;
	struct device *dev;
	u64 i;
	int rc = 0;

	dev = bus_find_device_by_name(&cxl_bus_type, NULL, memdev);
	if (!dev)
		return -ENODEV;
	if (!is_cxl_memdev(dev)) {
		put_device(dev);
		return -EINVAL;
	}
	cxlmd = to_cxl_memdev(dev);
	/* The port whose device mutex is the dport's free lock (a non-root port). */
	port = cxl_mem_find_port(cxlmd, &dport);
	if (!port) {
		put_device(dev);
		return -ENXIO;
	}
	atomic64_inc(&events);
	for (i = 0; i < n; i++) {
		device_lock(&port->dev);
		p = cxl_mem_find_port(cxlmd, &again);
		if (p) {
			cxl_dport_bench_use(again);
			put_device(&p->dev);
		}
		device_unlock(&port->dev);
		atomic64_add(p ? 4 : 2, &events);
		atomic64_inc(&iterations);
		if (!p) {
			rc = -ENXIO;
			break;
		}
		cond_resched();
	}
	put_device(&port->dev);
	put_device(dev);
	return rc;
}
DEFINE_DEBUGFS_ATTRIBUTE(run_fops, NULL, run_set, "%llu\n");

static int events_get(void *data, u64 *val)
{
	*val = atomic64_read(&events);
	return 0;
}
DEFINE_DEBUGFS_ATTRIBUTE(events_fops, events_get, NULL, "%llu\n");

static int iterations_get(void *data, u64 *val)
{
	*val = atomic64_read(&iterations);
	return 0;
}
DEFINE_DEBUGFS_ATTRIBUTE(iterations_fops, iterations_get, NULL, "%llu\n");

static int __init cxl_dport_bench_init(void)
{
	dir = debugfs_create_dir("cxl_dport_bench", NULL);
	debugfs_create_file_unsafe("run", 0200, dir, NULL, &run_fops);
	debugfs_create_file_unsafe("events", 0444, dir, NULL, &events_fops);
	debugfs_create_file_unsafe("iterations", 0444, dir, NULL, &iterations_fops);
	return 0;
}

static void __exit cxl_dport_bench_exit(void)
{
	debugfs_remove_recursive(dir);
}

module_init(cxl_dport_bench_init);
module_exit(cxl_dport_bench_exit);
MODULE_DESCRIPTION("tracked dport event generator for cargo xtask bench");
MODULE_LICENSE("GPL");
/* The namespace became a string literal in v6.13 (include/linux/export.h). */
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 13, 0)
MODULE_IMPORT_NS("CXL");
#else
MODULE_IMPORT_NS(CXL);
#endif
