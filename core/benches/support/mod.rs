//! What the replica benchmarks share: their flags, and the directory they
//! write their stores in. A flag that cannot be read, or a directory that
//! cannot be made, ends the benchmark with a message and exit status 2,
//! not a panic.

// Each benchmark uses part of this module.
#![allow(dead_code)]

pub mod process;
pub mod raw;

use std::path::PathBuf;
use std::str::FromStr;

/// The value after flag `name` (`--name value`), if the flag is given.
/// Anything else on the command line is ignored: `cargo bench` passes
/// `--bench`.
pub fn flag(name: &str) -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == name {
            return Some(
                args.next()
                    .unwrap_or_else(|| panic!("{name} needs a value")),
            );
        }
    }
    None
}

/// Flag `name` parsed, or `default` when it is not given. A value that
/// does not parse stops the benchmark with a message naming the flag.
pub fn flag_or<T: FromStr>(name: &str, default: T) -> T {
    match flag(name) {
        Some(value) => parse(name, &value),
        None => default,
    }
}

/// Flag `name` as a comma-separated list, or `default` when it is not
/// given.
pub fn list_or<T: FromStr>(name: &str, default: Vec<T>) -> Vec<T> {
    match flag(name) {
        Some(values) => values.split(',').map(|v| parse(name, v.trim())).collect(),
        None => default,
    }
}

fn parse<T: FromStr>(name: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| fail(format!("{name}: cannot read {value:?}")))
}

/// A temporary directory for a benchmark's files, removed when dropped:
/// inside `--dir` when that is given, else next to the build output, on
/// the disk the project lives on.
pub fn bench_dir() -> tempfile::TempDir {
    let parent =
        flag("--dir").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    tempfile::tempdir_in(&parent).unwrap_or_else(|e| {
        fail(format!(
            "cannot make a temporary directory in {}: {e}",
            parent.display()
        ))
    })
}

/// Ends the benchmark: it was given something it cannot run with.
fn fail(message: String) -> ! {
    eprintln!("error: {message}");
    std::process::exit(2)
}
