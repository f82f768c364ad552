//! The examples run to the end and show what they claim.

use std::process::Command;

fn run(bin: &str) -> String {
    let output = Command::new(bin).output().expect("run example");
    assert!(output.status.success(), "{bin} failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn the_todo_app_converges_and_shows_the_conflict() {
    let text = run(env!("CARGO_BIN_EXE_todo"));
    assert!(text.contains("converged in"), "{text}");
    assert!(text.contains(" vs "), "{text}");
}

#[test]
fn the_hub_relays_between_spokes() {
    let text = run(env!("CARGO_BIN_EXE_hub"));
    assert!(text.contains("relayed by the hub"), "{text}");
    assert!(text.contains("\"answered_by\":\"west\""), "{text}");
}
