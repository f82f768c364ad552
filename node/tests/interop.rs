//! Interop with the JavaScript automerge library (npm `@automerge/automerge`,
//! the real client of the ecosystem): a document created and edited through
//! Concord's HTTP API, exported, loads in JavaScript with the same content;
//! the edits JavaScript makes, posted back, merge and replicate to a second
//! node; a document made in JavaScript imports as a new document.
//!
//! Needs Node.js and npm; installs the package into `tests/interop/` with
//! `npm ci` when it is not there yet (`.ci/run` does so up front).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use support::{Concord, agent, http, init};

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// Makes sure `@automerge/automerge` is installed.
fn install_js() {
    let dir = interop_dir();
    if dir
        .join("node_modules/@automerge/automerge/package.json")
        .exists()
    {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .expect("npm is needed for this test (Node.js 20 or later)");
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

fn request(node: &Concord, method: &str, path: &str, body: Option<Vec<u8>>) -> (u16, Vec<u8>) {
    let url = format!("http://{}{path}", node.api);
    http(&agent(), method, &url, body, &[]).expect("node reachable")
}

/// A JSON answer that must be a success.
fn json_call(node: &Concord, method: &str, path: &str, body: Option<Value>) -> Value {
    let (status, bytes) = request(node, method, path, body.map(|b| b.to_string().into_bytes()));
    let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    assert!(
        (200..300).contains(&status),
        "{method} {path}: {status} {value}"
    );
    value
}

/// Posts automerge bytes to a document; its new heads.
fn import(node: &Concord, doc: &str, bytes: Vec<u8>) -> Value {
    let (status, body) = request(
        node,
        "POST",
        &format!("/v1/docs/{doc}/automerge"),
        Some(bytes),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice::<Value>(&body).expect("json")["heads"].clone()
}

#[test]
fn documents_round_trip_through_javascript_automerge() {
    install_js();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a_dir, b_dir) = (tmp.path().join("a"), tmp.path().join("b"));
    let (a_id, b_id) = (init(&a_dir), init(&b_dir));
    let a = Concord::start(&a_dir, &[format!("--trust={b_id}")]);
    let b = Concord::start(&b_dir, &[a.peer_flag(&a_id)]);

    // Created and edited through Concord.
    let created = json_call(
        &a,
        "POST",
        "/v1/docs",
        Some(json!({"value": {
            "title": "groceries",
            "todos": [{"text": "milk", "done": false}],
            "visits": {"$counter": 1},
            "notes": {"$text": "hello"},
        }})),
    );
    let id = created["id"].as_str().expect("id").to_string();
    json_call(
        &a,
        "PATCH",
        &format!("/v1/docs/{id}"),
        Some(json!({"ops": [
            {"op": "insert", "path": ["todos", 1], "value": {"text": "eggs", "done": false}},
            {"op": "increment", "path": ["visits"], "by": 1},
        ]})),
    );
    let ours = json_call(&a, "GET", &format!("/v1/docs/{id}"), None);
    let (status, saved) = request(&a, "GET", &format!("/v1/docs/{id}/automerge"), None);
    assert_eq!(status, 200);

    // Loaded and edited in JavaScript.
    let input = tmp.path().join("in.automerge");
    let output = tmp.path().join("out.automerge");
    let fresh = tmp.path().join("new.automerge");
    std::fs::write(&input, &saved).expect("write");
    let js = Command::new("node")
        .arg(interop_dir().join("interop.mjs"))
        .args([&input, &output, &fresh])
        .current_dir(interop_dir())
        .output()
        .expect("node is needed for this test");
    assert!(js.status.success(), "javascript failed: {js:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&js.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines[0]["loaded"], ours["value"],
        "same content in JavaScript"
    );
    assert_eq!(lines[0]["heads"], ours["heads"], "same heads in JavaScript");
    let edited = &lines[1];

    // Posted back: merged on a, and replicated to b.
    let merged = import(&a, &id, std::fs::read(&output).expect("out"));
    assert_eq!(merged, edited["heads"]);
    let expected = json!({
        "title": "groceries",
        "todos": [
            {"text": "milk", "done": true},
            {"text": "eggs", "done": false},
            {"text": "from javascript", "done": false},
        ],
        "visits": 4,
        "notes": "hello from js",
        "js": true,
    });
    assert_eq!(edited["edited"], expected, "javascript's view");
    let on_a = json_call(&a, "GET", &format!("/v1/docs/{id}"), None);
    assert_eq!(on_a["value"], expected);
    let history = json_call(&a, "GET", &format!("/v1/docs/{id}/history"), None);
    assert!(
        history["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .any(|c| c["message"] == "edited in javascript")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = request(&b, "GET", &format!("/v1/docs/{id}"), None);
        if status == 200 {
            let on_b: Value = serde_json::from_slice(&body).expect("json");
            if on_b["heads"] == edited["heads"] {
                assert_eq!(on_b["value"], expected);
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "b never received javascript's edits"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A document made in JavaScript becomes a new Concord document.
    let new_id = "5d9c2b1a-3e4f-4a6b-8c7d-9e0f1a2b3c4d";
    let imported = import(&b, new_id, std::fs::read(&fresh).expect("new"));
    assert_eq!(imported, edited["made_heads"]);
    let made = json_call(&b, "GET", &format!("/v1/docs/{new_id}"), None);
    assert_eq!(made["value"], edited["made"]);
    assert_eq!(made["heads"], edited["made_heads"]);
}
