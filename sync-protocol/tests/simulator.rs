//! The deterministic simulator over many seeds, its teeth (planted bugs it
//! must catch), and the cost of a reconnect.
//!
//! `CONCORD_SIM_SEED=<seed>` replays one seed; `CONCORD_SIM_SEEDS=<n>` runs
//! `n` seeds instead of the default.

mod sim;

use concord_sync_protocol::PlantedBug;
use sim::{SimConfig, run, seeds};

#[test]
fn replicas_converge_under_faults() {
    let seeds = seeds(0, 500);
    let mut totals = sim::Report::default();
    let started = std::time::Instant::now();
    for seed in &seeds {
        let config = SimConfig::from_seed(*seed);
        match run(config) {
            Ok(report) => {
                totals.docs += report.docs;
                totals.writes += report.writes;
                totals.crashes += report.crashes;
                totals.cuts += report.cuts;
                totals.partitions += report.partitions;
                totals.frames += report.frames;
                totals.bytes += report.bytes;
            }
            Err(failure) => panic!("{failure}"),
        }
    }
    eprintln!(
        "{} seeds in {:.1?}: {} documents, {} acknowledged writes, {} crashes, {} cuts, {} partitions, {} frames, {} bytes",
        seeds.len(),
        started.elapsed(),
        totals.docs,
        totals.writes,
        totals.crashes,
        totals.cuts,
        totals.partitions,
        totals.frames,
        totals.bytes
    );
}

/// Runs seeds with `bug` planted until one fails; returns that seed.
fn first_failing_seed(bug: PlantedBug, max_seeds: u64) -> Option<u64> {
    (10_000..10_000 + max_seeds).find(|seed| {
        let mut config = SimConfig::from_seed(*seed);
        config.bug = Some(bug);
        run(config).is_err()
    })
}

#[test]
fn the_simulator_catches_acknowledging_before_persisting() {
    let seed = first_failing_seed(PlantedBug::AcknowledgeBeforePersisting, 300);
    assert!(seed.is_some(), "planted bug not caught in 300 seeds");
}

#[test]
fn the_simulator_catches_a_checkpoint_advanced_too_far() {
    let seed = first_failing_seed(PlantedBug::CheckpointTooFar, 300);
    assert!(seed.is_some(), "planted bug not caught in 300 seeds");
}

#[test]
fn the_simulator_catches_dropped_relay_announcements() {
    let seed = first_failing_seed(PlantedBug::DropRelayAnnouncements, 100);
    assert!(seed.is_some(), "planted bug not caught in 100 seeds");
}
