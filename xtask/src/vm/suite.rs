//! The guest suite `cargo xtask test` runs after the host tests: one table of cases, each
//! with its name, the kernels it runs on and its function, written once; `--only`, the order
//! and the names `KERNEL/CASE` all come from it.
//!
//! It proves the harness itself (selftest.rs), then the tracer in the guest: the stock
//! kernel's findings counted against the memdev probes, the fixed driver's silence, the
//! switch topology and replay (traced.rs), doctor, clean detach and bad environments
//! (reliability.rs), and a short soak (soak.rs). Each check fails loudly; none is skipped.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, bail};

use super::{cxl_test, reliability, selftest, soak, traced, tracer};
use crate::{
    debian::{self, STOCK_KERNELS, StockKernel},
    fixture::{self, Fixture},
    source_kernel, util,
};

/// Cycles of each workload in the traced rp cases (every sequential workload: each cycle is
/// at least one memdev probe, so 18 probes a case).
const TRACED_CYCLES: u32 = 3;
/// Cycles of each workload in the traced switch case.
const SWITCH_CYCLES: u32 = 5;
/// Cycles of region-attach (each then a cxl_acpi unbind) in the traced region case.
const REGION_CYCLES: u32 = 2;

/// Cycles of each workload in the cxl_test cases.
const CXL_TEST_CYCLES: u32 = 2;

/// Where a case runs.
#[derive(Clone, Copy, Debug)]
pub enum Kernels {
    /// The harness's default kernel (`debian::DEFAULT_KERNEL`); the case goes by its name.
    Default,
    /// Each of these kernels of the matrix, as `KERNEL/NAME`.
    Each(&'static [&'static str]),
    /// A kernel built from source (source_kernel.rs), as `KERNEL/NAME`; the case picks its
    /// patches and topology itself (its `Env::kernel` is the stock kernel it is built from).
    Source(&'static str),
}

/// One case of the suite.
pub struct Case {
    pub name: &'static str,
    pub kernels: Kernels,
    /// It runs the static tracer (built once, before the first case that needs it).
    pub tracer: bool,
    /// It needs the kernel's seed-fixed cxl_mem (`cargo xtask fixture cxl-mem-fixed`; built
    /// before the case, counted in the kernel's time).
    pub fixed_cxl_mem: bool,
    pub run: fn(&Env<'_>) -> anyhow::Result<()>,
}

/// What a case runs with.
pub struct Env<'a> {
    /// Its results directory, `target/vm/suite/NAME`.
    pub out: &'a Path,
    pub kernel: &'static StockKernel,
    tracer: Option<&'a Path>,
    fixed_cxl_mem: Option<&'a Path>,
}

impl Env<'_> {
    fn tracer(&self) -> anyhow::Result<&Path> {
        self.tracer.context("the case runs the tracer but its Case says `tracer: false` (suite.rs)")
    }

    fn fixed_cxl_mem(&self) -> anyhow::Result<&Path> {
        self.fixed_cxl_mem
            .context("the case needs the fixed cxl_mem but its Case says `fixed_cxl_mem: false` (suite.rs)")
    }
}

/// A case of the harness itself, on the default kernel, without the tracer.
const fn harness(name: &'static str, run: fn(&Env<'_>) -> anyhow::Result<()>) -> Case {
    Case { name, kernels: Kernels::Default, tracer: false, fixed_cxl_mem: false, run }
}

/// A case with the tracer, on each of `kernels`.
const fn traced(name: &'static str, kernels: &'static [&'static str], run: fn(&Env<'_>) -> anyhow::Result<()>) -> Case {
    Case { name, kernels: Kernels::Each(kernels), tracer: true, fixed_cxl_mem: false, run }
}

const MATRIX: &[&str] = &["6.1", "6.12", "7.2"];

/// Every case, in the order the suite runs them, except that a run of cases on several
/// kernels is taken kernel by kernel (each of the first kernel's, then the next one's), so
/// that a kernel's fixture and traces go together and its time can be told. The harness's
/// own cases come first, on the default kernel; then the tracer on each kernel of the matrix
/// (docs/kernels.md). The tracer's lifecycle and bad environments run on the seed's kernel,
/// 7.2, the heaviest profile (442 kprobes): each takes 3 to 5 minutes under TCG, and on
/// every kernel they would take the suite past its half-hour budget.
pub const CASES: &[Case] = &[
    harness("rp-workloads", |e| selftest::rp_workloads(e.out)),
    harness("switch-workloads", |e| selftest::switch_workloads(e.out)),
    harness("user-module", |e| selftest::user_module(e.out, e.kernel)),
    harness("crash-is-detected", |e| selftest::crash_is_detected(e.out)),
    harness("failing-script-fails", |e| selftest::failing_script_fails(e.out)),
    harness("missing-result-fails", |e| selftest::missing_result_fails(e.out)),
    harness("hang-is-bounded", |e| selftest::hang_is_bounded(e.out)),
    harness("text-patching", |e| selftest::text_patching(e.out)),
    traced("rp-stock-traced", MATRIX, |e| traced::rp_stock(e.out, e.tracer()?, e.kernel, TRACED_CYCLES)),
    Case {
        fixed_cxl_mem: true,
        ..traced("rp-fixed-traced", MATRIX, |e| {
            traced::rp_fixed(e.out, e.tracer()?, e.kernel, e.fixed_cxl_mem()?, TRACED_CYCLES)
        })
    },
    traced("switch-traced", &["6.12", "7.2"], |e| traced::switch(e.out, e.tracer()?, e.kernel, SWITCH_CYCLES)),
    traced("region-traced", MATRIX, |e| traced::region(e.out, e.tracer()?, e.kernel, REGION_CYCLES)),
    traced("cxl-cli", &["7.2"], |e| super::cxl_cli::suite_case(e.out, e.tracer()?, e.kernel, 2)),
    Case {
        kernels: Kernels::Source(cxl_test::KERNEL),
        ..traced("cxl-test-stock", &[], |e| cxl_test::suite_case(e.out, e.tracer()?, false, CXL_TEST_CYCLES))
    },
    Case {
        kernels: Kernels::Source(cxl_test::KERNEL),
        ..traced("cxl-test-seed", &[], |e| cxl_test::suite_case(e.out, e.tracer()?, true, CXL_TEST_CYCLES))
    },
    traced("tracer-lifecycle", &["7.2"], |e| reliability::lifecycle(e.out, e.tracer()?, e.kernel)),
    traced("bad-environments", &["7.2"], |e| reliability::environment(e.out, e.tracer()?, e.kernel)),
    Case {
        name: "soak",
        kernels: Kernels::Default,
        tracer: true,
        fixed_cxl_mem: false,
        run: |e| soak::suite_case(e.out, e.tracer()?),
    },
];

/// A case on one kernel, as the suite runs it.
struct Instance {
    case: &'static Case,
    kernel: &'static StockKernel,
    /// The kernel its time counts in: a stock kernel's name or a source kernel's.
    label: &'static str,
    /// `NAME`, or `KERNEL/NAME` for a case on several kernels.
    name: String,
    /// Its time counts in its kernel's.
    per_kernel: bool,
}

/// The cases as the suite runs them, in order (see `CASES`).
fn instances() -> anyhow::Result<Vec<Instance>> {
    let default = debian::stock_kernel(debian::DEFAULT_KERNEL)?;
    let mut out = Vec::new();
    let mut rest = CASES;
    while let Some(first) = rest.first() {
        match first.kernels {
            Kernels::Default => {
                let name = first.name.to_owned();
                out.push(Instance { case: first, kernel: default, label: default.name, name, per_kernel: false });
                rest = &rest[1..];
                continue;
            }
            Kernels::Source(label) => {
                let built = source_kernel::source_kernel(label)
                    .with_context(|| format!("{}: no kernel built from source is named {label}", first.name))?;
                let kernel = debian::stock_kernel(built.base)?;
                let name = format!("{label}/{}", first.name);
                out.push(Instance { case: first, kernel, label, name, per_kernel: true });
                rest = &rest[1..];
                continue;
            }
            Kernels::Each(_) => {}
        }
        let block = rest.iter().position(|c| !matches!(c.kernels, Kernels::Each(_))).unwrap_or(rest.len());
        for kernel in STOCK_KERNELS {
            for case in &rest[..block] {
                if let Kernels::Each(names) = case.kernels
                    && names.contains(&kernel.name)
                {
                    out.push(Instance {
                        case,
                        kernel,
                        label: kernel.name,
                        name: format!("{}/{}", kernel.name, case.name),
                        per_kernel: true,
                    });
                }
            }
        }
        rest = &rest[block..];
    }
    Ok(out)
}

pub fn suite() -> anyhow::Result<()> {
    run(&[])
}

/// The suite, or only the cases named in `only` (all when empty).
pub fn run(only: &[String]) -> anyhow::Result<()> {
    let all = instances()?;
    if let Some(unknown) = only.iter().find(|n| !all.iter().any(|i| i.name == **n)) {
        let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
        bail!("no guest case {unknown:?}; the cases are: {}", names.join(" "));
    }
    let wanted: Vec<&Instance> = all.iter().filter(|i| only.is_empty() || only.contains(&i.name)).collect();
    let start = Instant::now();
    let root = util::workspace_root().join("target/vm/suite");
    if only.is_empty() {
        let _ = fs::remove_dir_all(&root);
    }
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;

    // The tracer in the guest: one musl build for every guest and for replay on the host.
    let tracer = if wanted.iter().any(|i| i.case.tracer) { Some(tracer::tracer_binary()?) } else { None };
    let mut fixed: HashMap<&str, PathBuf> = HashMap::new();
    let mut times: Vec<(&str, f64)> = Vec::new();
    let mut kernel_times: Vec<(&str, f64)> = Vec::new();
    for instance in wanted {
        let started = Instant::now();
        let kernel = instance.kernel;
        if instance.case.fixed_cxl_mem && !fixed.contains_key(kernel.name) {
            fixed.insert(kernel.name, fixture::build_for_kernel(Fixture::CxlMemFixed, kernel)?);
        }
        let name = instance.name.as_str();
        let out = root.join(name);
        let _ = fs::remove_dir_all(&out);
        println!("test: guest: {name}");
        let t = Instant::now();
        let env = Env {
            out: &out,
            kernel,
            tracer: tracer.as_deref().filter(|_| instance.case.tracer),
            fixed_cxl_mem: fixed.get(kernel.name).map(PathBuf::as_path).filter(|_| instance.case.fixed_cxl_mem),
        };
        (instance.case.run)(&env).with_context(|| format!("guest test {name} failed"))?;
        let seconds = t.elapsed().as_secs_f64();
        println!("test: guest: {name} ok ({seconds:.1} s)");
        times.push((name, seconds));
        if instance.per_kernel {
            match kernel_times.iter_mut().find(|(k, _)| *k == instance.label) {
                Some((_, total)) => *total += started.elapsed().as_secs_f64(),
                None => kernel_times.push((instance.label, started.elapsed().as_secs_f64())),
            }
        }
    }
    for (name, seconds) in &times {
        println!("test: guest: {name:<26} {seconds:6.1} s");
    }
    for (kernel, seconds) in &kernel_times {
        println!("test: guest: kernel {kernel:<7} traced cases {seconds:6.1} s (with its fixture or kernel build)");
    }
    println!("test: guest suite took {:.1} s", start.elapsed().as_secs_f64());
    println!("guest: {} passed, 0 failed", times.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn instances_keep_the_table_order_kernel_by_kernel() {
        let all = instances().unwrap();
        let expected: usize = CASES
            .iter()
            .map(|c| match c.kernels {
                Kernels::Default => 1,
                Kernels::Each(k) => k.len(),
                Kernels::Source(_) => 1,
            })
            .sum();
        assert_eq!(all.len(), expected);
        let case_at = |i: &Instance| CASES.iter().position(|c| c.name == i.case.name).unwrap();
        let kernel_at = |i: &Instance| STOCK_KERNELS.iter().position(|k| k.name == i.kernel.name).unwrap();
        for pair in all.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let each = |i: &Instance| matches!(i.case.kernels, Kernels::Each(_));
            if each(a) && each(b) {
                // Within a run of cases on several kernels: kernel by kernel, each in table order.
                assert!((kernel_at(a), case_at(a)) < (kernel_at(b), case_at(b)), "{} before {}", a.name, b.name);
            } else {
                assert!(case_at(a) < case_at(b), "{} before {}", a.name, b.name);
            }
            let name = |i: &Instance| match i.case.kernels {
                Kernels::Default => i.case.name.to_owned(),
                Kernels::Each(_) => format!("{}/{}", i.kernel.name, i.case.name),
                Kernels::Source(k) => format!("{k}/{}", i.case.name),
            };
            assert_eq!(a.name, name(a));
        }
        assert!(all.iter().any(|i| i.name == "7.2/rp-stock-traced"), "the --only names are KERNEL/CASE");
        assert!(all.iter().any(|i| i.name == "7.2-src/cxl-test-seed"), "and SOURCE-KERNEL/CASE");
    }

    #[test]
    fn cases_name_kernels_of_the_matrix_once_each() {
        let mut names = BTreeSet::new();
        for case in CASES {
            assert!(names.insert(case.name), "two cases are named {}", case.name);
            assert!(!case.name.contains('/'), "{}: `/` separates the kernel from the case", case.name);
            if let Kernels::Each(kernels) = case.kernels {
                assert!(!kernels.is_empty(), "{} runs on no kernel", case.name);
                for k in kernels {
                    debian::stock_kernel(k).unwrap_or_else(|e| panic!("{}: {e:#}", case.name));
                }
            }
            if let Kernels::Source(k) = case.kernels {
                assert!(source_kernel::source_kernel(k).is_some(), "{}: no source kernel {k}", case.name);
            }
        }
    }
}
