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

/// Runs seeds with `bug` planted until one fails; returns that seed and
/// what the simulator reported.
fn first_failure(bug: PlantedBug, max_seeds: u64) -> Option<(u64, String)> {
    (10_000..10_000 + max_seeds).find_map(|seed| {
        let mut config = SimConfig::from_seed(seed);
        config.bug = Some(bug);
        run(config).err().map(|failure| (seed, failure.to_string()))
    })
}

/// The planted bug is caught within `max_seeds`, as lost or diverged data
/// (not as some other complaint).
fn assert_caught(bug: PlantedBug, max_seeds: u64) {
    match first_failure(bug, max_seeds) {
        Some((seed, message)) => {
            eprintln!("{bug:?} caught at seed {seed}: {message}");
            assert!(
                message.contains("differs")
                    || message.contains("missing")
                    || message.contains("no quiescence"),
                "{bug:?} was caught, but not as lost or diverged data: {message}"
            );
        }
        None => panic!("{bug:?} was not caught in {max_seeds} seeds"),
    }
}

#[test]
fn the_simulator_catches_acknowledging_before_persisting() {
    assert_caught(PlantedBug::AcknowledgeBeforePersisting, 300);
}

#[test]
fn the_simulator_catches_a_checkpoint_advanced_too_far() {
    assert_caught(PlantedBug::CheckpointTooFar, 300);
}

#[test]
fn the_simulator_catches_dropped_relay_announcements() {
    assert_caught(PlantedBug::DropRelayAnnouncements, 100);
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [7, 8] {
        let first = run(SimConfig::from_seed(seed)).unwrap_or_else(|f| panic!("{f}"));
        let again = run(SimConfig::from_seed(seed)).unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(format!("{first:?}"), format!("{again:?}"), "seed {seed}");
    }
}
