//! The live userspace pipeline on this host: ring-buffer records decoded, resolved
//! (task names interned, stacks symbolized through the cache, use sites named) and fed to
//! the engine, as `tracer run` does for every kernel event. Prints events per second.
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::{
    analysis::Analysis,
    decode::{RawEvent, RawPayload, decode, encode},
    engine::Limits,
    event::Kind,
    resolve::Resolver,
    symbolize::Symbols,
    synth::Churn,
};
use tracer_common::{
    DportAdd, DportFree, DportUse, FLAG_FREE_LOCK_HELD, FLAG_FREE_LOCK_KNOWN, LockOp, NO_SITE, XaAccess,
};

/// Kernel-shaped records for a synthetic churn: every event as the kernel side lays it out,
/// with 20-frame stacks on the tracked events.
fn records(churn: &Churn) -> Vec<Vec<u8>> {
    let stack: Vec<u64> = (0..20).map(|i| 0xffff_ffff_8100_0000 + i * 0x1000 + 0x42).collect();
    churn
        .events()
        .map(|e| {
            let (payload, with_stack) = match e.kind {
                Kind::DportAdd { dport, port, xa, port_lock, free_lock, uport_lock, root } => (
                    RawPayload::DportAdd(DportAdd {
                        dport,
                        port,
                        xa,
                        port_lock,
                        free_lock,
                        uport_lock,
                        root: root.into(),
                        origin: 0,
                    }),
                    false,
                ),
                Kind::XaLoad { xa, index, ret } => (RawPayload::XaLoad(XaAccess { xa, index, entry: ret }), true),
                Kind::XaErase { xa, index, ret } => (RawPayload::XaErase(XaAccess { xa, index, entry: ret }), true),
                Kind::XaInsert { xa, index, entry } => (RawPayload::XaInsert(XaAccess { xa, index, entry }), true),
                Kind::Lock { lock, mode, .. } => {
                    (RawPayload::Lock(LockOp { lock, site: NO_SITE, mode: mode as u32 }), true)
                }
                Kind::Unlock { lock, mode } => {
                    (RawPayload::Unlock(LockOp { lock, site: NO_SITE, mode: mode as u32 }), false)
                }
                Kind::Use { dport, .. } => (RawPayload::Use(DportUse { dport, site: 0 }), true),
                Kind::Free { dport } => (RawPayload::Free(DportFree { dport, block: dport - 40 }), true),
                Kind::Deref { dport, .. } => (RawPayload::Deref(DportUse { dport, site: 0 }), true),
            };
            let mut comm = [0u8; 16];
            comm[..e.comm.len().min(15)].copy_from_slice(&e.comm.as_bytes()[..e.comm.len().min(15)]);
            let flags = match e.free_lock_held {
                Some(true) => FLAG_FREE_LOCK_KNOWN | FLAG_FREE_LOCK_HELD,
                Some(false) => FLAG_FREE_LOCK_KNOWN,
                None => 0,
            };
            let raw = RawEvent {
                ts: e.ts,
                cpu: e.cpu,
                tid: e.tid,
                tgid: e.tid,
                comm,
                flags,
                payload,
                stack: if with_stack { stack.clone() } else { Vec::new() },
            };
            encode(&raw)
        })
        .collect()
}

fn symbols() -> Symbols {
    let text: String =
        (0..32).map(|i| format!("{:x} t function_{i}\n", 0xffff_ffff_8100_0000u64 + i * 0x1000)).collect();
    Symbols::parse(text.as_bytes()).unwrap()
}

fn run(records: &[Vec<u8>]) -> usize {
    let mut resolver = Resolver::new(symbols(), vec![Arc::<str>::from("devm_cxl_add_port").into()]);
    let mut analysis = Analysis::new(Limits::default());
    for record in records {
        let raw = decode(record).expect("well-formed");
        analysis.feed(&resolver.resolve(&raw), |_| {});
    }
    analysis.groups().len()
}

fn bench(c: &mut Criterion) {
    let records = records(&Churn { dports: 20_000, ..Churn::default() });
    let start = Instant::now();
    let groups = run(&records);
    let elapsed = start.elapsed();
    println!(
        "pipeline: {} kernel records decoded, resolved and analysed ({groups} finding groups) in {:.2?}: {:.2} million events/s on one core",
        records.len(),
        elapsed,
        records.len() as f64 / elapsed.as_secs_f64() / 1e6
    );
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(records.len() as u64));
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("decode+resolve+engine", |b| b.iter(|| run(&records)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
