//! Replay throughput: a large synthetic hotplug trace, read from the binary format and fed
//! through the engine, as `tracer analyze` does. Prints events per second.
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tracer::{
    analysis::Analysis,
    engine::Limits,
    format::tracefile::{TraceHeader, TraceReader, TraceWriter},
    synth::Churn,
};

fn trace(churn: &Churn) -> (Vec<u8>, u64) {
    let mut writer = TraceWriter::new(Vec::new(), &TraceHeader::default()).unwrap();
    let mut n = 0;
    for event in churn.events() {
        writer.write_event(&event).unwrap();
        n += 1;
    }
    (writer.into_inner().unwrap(), n)
}

fn replay(bytes: &[u8]) -> usize {
    let mut analysis = Analysis::new(Limits::default());
    for event in TraceReader::new(bytes).unwrap() {
        analysis.feed(&event.unwrap(), |_| {});
    }
    analysis.groups().len()
}

fn bench(c: &mut Criterion) {
    let churn = Churn { dports: 50_000, ..Churn::default() };
    let (bytes, events) = trace(&churn);
    // One plain timed pass first, so the figure is printed whatever criterion's output mode.
    let start = Instant::now();
    let groups = replay(&bytes);
    let elapsed = start.elapsed();
    println!(
        "replay: {events} events ({} MiB binary trace), {groups} finding groups, {:.2?}: {:.1} million events/s on one core",
        bytes.len() >> 20,
        elapsed,
        events as f64 / elapsed.as_secs_f64() / 1e6
    );
    let mut group = c.benchmark_group("replay");
    group.throughput(Throughput::Elements(events));
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("decode+engine", |b| b.iter(|| replay(&bytes)));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
