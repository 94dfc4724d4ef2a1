//! The engine's state stays within its caps on long churns, and what it forgets is counted.
use std::sync::Arc;

use tracer::{
    analysis::Analysis,
    engine::Limits,
    event::{Event, Kind},
    synth::Churn,
};

#[test]
fn a_100k_dport_churn_keeps_state_bounded_and_counts_evictions() {
    // Every dport at a fresh address: nothing is replaced by address reuse.
    let churn = Churn { dports: 100_000, live: 100_000, reads_per_dport: 2, unlocked_every: 0, threads: 4 };
    let limits = Limits { max_freed_dports: 4_096, ..Limits::default() };
    let mut analysis = Analysis::new(limits);
    let mut peak = 0;
    for (i, event) in churn.events().enumerate() {
        analysis.feed(&event, |_| {});
        if i % 1000 == 0 {
            peak = peak.max(analysis.engine().tracked_dports());
        }
    }
    let stats = analysis.summary().engine;
    // Each dport is live until its free, then remembered in the freed FIFO.
    assert!(peak <= limits.max_freed_dports + 1, "peak {peak} tracked dports");
    assert_eq!(analysis.engine().tracked_dports(), limits.max_freed_dports);
    assert_eq!(stats.evicted_dports, 100_000 - limits.max_freed_dports as u64);
    assert!(analysis.groups().is_empty(), "a clean churn has no findings");
}

#[test]
fn the_thread_cap_evicts_and_counts() {
    let churn = Churn { dports: 2_000, live: 2_000, reads_per_dport: 1, unlocked_every: 0, threads: 50 };
    let limits = Limits { max_threads: 10, ..Limits::default() };
    let mut analysis = Analysis::new(limits);
    for event in churn.events() {
        analysis.feed(&event, |_| {});
    }
    assert!(analysis.engine().tracked_threads() <= 10);
    let stats = analysis.summary().engine;
    assert!(stats.evicted_threads > 0, "{stats:?}");
    assert!(analysis.summary().lost_anything());
}

#[test]
fn exited_threads_are_forgotten_once_quiet() {
    let churn = Churn { dports: 2_000, live: 2_000, reads_per_dport: 1, unlocked_every: 0, threads: 50 };
    let mut analysis = Analysis::new(Limits::default());
    let mut last_ts = 0;
    for event in churn.events() {
        last_ts = event.ts;
        analysis.feed(&event, |_| {});
    }
    let before = analysis.engine().tracked_threads();
    assert!(before > 10, "{before} threads");
    // A thread with an event at or after `quiet_since` may still have events on the way.
    assert_eq!(analysis.engine_mut().forget_exited_threads(0, |_| true), 0);
    let odd = analysis.engine_mut().forget_exited_threads(last_ts + 1, |tid| tid % 2 == 1);
    assert!(odd > 0);
    assert_eq!(analysis.engine().tracked_threads(), before - odd);
    // What is forgotten after an exit is no loss.
    assert!(!analysis.summary().lost_anything());
}

#[test]
fn the_live_dport_cap_evicts_and_counts() {
    let limits = Limits { max_dports: 100, ..Limits::default() };
    let mut analysis = Analysis::new(limits);
    for i in 0..250u64 {
        let port = 0xffff_8881_0300_0000 + i * 0x1000;
        let event = Event {
            ts: i,
            cpu: 0,
            tid: 1,
            comm: Arc::from("modprobe"),
            kind: Kind::DportAdd {
                dport: 0xffff_8881_0400_0000 + i * 0x100,
                port,
                xa: port + 0x318,
                port_lock: port + 0x90,
                free_lock: port + 0x90,
                uport_lock: 0,
                root: false,
            },
            stack: None,
            free_lock_held: None,
            port_lock_held: None,
        };
        analysis.feed(&event, |_| {});
    }
    assert_eq!(analysis.engine().tracked_dports(), 100);
    assert_eq!(analysis.summary().engine.evicted_dports, 150);
}
