//! The HTTP API through real HTTP against a real node (in this process, on
//! 127.0.0.1): every endpoint, and every kind of bad input, each of which
//! must get a 4xx with its code and change nothing.

mod support;

use std::time::{Duration, Instant};

use concord_node::identity::Identity;
use concord_node::{Node, NodeConfig, NodeError};
use serde_json::{Value, json};

struct Api {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

/// An answer: status and JSON body (`Value::Null` if the body is not JSON).
struct Answer {
    status: u16,
    body: Value,
    bytes: Vec<u8>,
}

impl Answer {
    fn ok(self) -> Value {
        assert!(
            (200..300).contains(&self.status),
            "expected success, got {}: {}",
            self.status,
            self.body
        );
        self.body
    }

    /// Asserts the error shape, status and code.
    /// Asserts the error shape, status and code; the message.
    fn error(self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"]["code"], code, "{}", self.body);
        let message = self.body["error"]["message"].as_str().expect("message");
        assert!(message.len() > 10, "a sentence, not {message:?}");
        message.to_string()
    }
}

impl Api {
    fn new(node: &Node, token: Option<&str>) -> Self {
        Self {
            base: format!("http://{}", node.api_addr().expect("api")),
            agent: support::agent(),
            token: token.map(str::to_string),
        }
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = headers.to_vec();
        if let Some(auth) = &auth {
            headers.push(("Authorization", auth));
        }
        let (status, bytes) =
            support::http(&self.agent, method, &url, body, &headers).expect("request");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            body,
            bytes,
        }
    }

    fn get(&self, path: &str) -> Answer {
        self.send("GET", path, None, &[])
    }

    fn post(&self, path: &str, body: &Value) -> Answer {
        self.send("POST", path, Some(body.to_string().into_bytes()), &[])
    }

    fn patch(&self, path: &str, body: &Value) -> Answer {
        self.send("PATCH", path, Some(body.to_string().into_bytes()), &[])
    }

    fn create(&self, value: Value) -> (String, Value) {
        let answer = self.post("/v1/docs", &json!({ "value": value }));
        assert_eq!(answer.status, 201, "{}", answer.body);
        let id = answer.body["id"].as_str().expect("id").to_string();
        (id, answer.body["heads"].clone())
    }

    fn seq(&self) -> u64 {
        self.get("/v1/status").ok()["seq"].as_u64().expect("seq")
    }
}

async fn node(token: Option<&str>) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    Identity::create_in(dir.path()).expect("identity");
    let mut config = NodeConfig::new(dir.path(), "127.0.0.1:0".parse().expect("addr"));
    config.api = Some("127.0.0.1:0".parse().expect("addr"));
    config.api_token = token.map(str::to_string);
    let node = Node::start(config).await.expect("start");
    (node, dir)
}

/// Runs blocking HTTP calls off the runtime's threads.
async fn off<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("test body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_can_be_created_read_edited_listed_and_read_in_the_past() {
    let (node, _dir) = node(None).await;
    let api = Api::new(&node, None);
    off(move || {
        let (id, first) = api.create(json!({
            "title": "groceries",
            "todos": [{"text": "milk", "done": false}],
            "visits": {"$counter": 1},
            "notes": {"$text": "hello"},
        }));
        assert!(!first.as_array().expect("heads").is_empty());
        let doc = api.get(&format!("/v1/docs/{id}")).ok();
        assert_eq!(doc["space"], "default");
        assert_eq!(doc["heads"], first);
        assert_eq!(
            doc["value"],
            json!({"title": "groceries", "todos": [{"text": "milk", "done": false}], "visits": 1, "notes": "hello"})
        );

        let ops = json!({"ops": [
            {"op": "set", "path": ["todos", 0, "done"], "value": true},
            {"op": "insert", "path": ["todos", 1], "value": {"text": "eggs", "done": false}},
            {"op": "increment", "path": ["visits"], "by": 41},
            {"op": "splice_text", "path": ["notes"], "pos": 5, "delete": 0, "insert": ", world"},
            {"op": "delete", "path": ["title"]},
        ]});
        let heads = api.patch(&format!("/v1/docs/{id}"), &ops).ok()["heads"].clone();
        assert_ne!(heads, first);
        let now = api.get(&format!("/v1/docs/{id}")).ok();
        assert_eq!(now["heads"], heads);
        assert_eq!(
            now["value"],
            json!({"todos": [{"text": "milk", "done": true}, {"text": "eggs", "done": false}], "visits": 42, "notes": "hello, world"})
        );

        // Point-in-time read, in the ?at= form.
        let at: Vec<String> = serde_json::from_value(first.clone()).expect("hex");
        let then = api.get(&format!("/v1/docs/{id}?at={}", at.join(","))).ok();
        assert_eq!(then["heads"], first);
        assert_eq!(then["value"]["title"], "groceries");
        assert_eq!(then["value"]["visits"], 1);

        // History: the creation and the patch.
        let history = api.get(&format!("/v1/docs/{id}/history")).ok();
        let changes = history["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[1]["deps"], first);
        for field in ["hash", "actor", "seq", "deps", "time", "message"] {
            assert!(changes[0].get(field).is_some(), "{field} missing");
        }

        // Spaces, chosen ids, empty documents, listing with pages.
        let named = api.post(
            "/v1/docs",
            &json!({"id": "67e55044-10b1-426f-9247-bb680e5fe0c8", "space": "work"}),
        );
        assert_eq!(named.status, 201, "{}", named.body);
        assert!(!named.body["heads"].as_array().expect("heads").is_empty());
        api.create(json!({}));
        let page = api.get("/v1/docs?limit=2").ok();
        assert_eq!(page["docs"].as_array().expect("docs").len(), 2);
        let next = page["next"].as_str().expect("a next cursor").to_string();
        let rest = api.get(&format!("/v1/docs?limit=2&after={next}")).ok();
        assert_eq!(rest["docs"].as_array().expect("docs").len(), 1);
        assert!(rest["next"].is_null());
        let all = api.get("/v1/docs").ok();
        let work = all["docs"]
            .as_array()
            .expect("docs")
            .iter()
            .find(|d| d["id"] == "67e55044-10b1-426f-9247-bb680e5fe0c8")
            .expect("listed");
        assert_eq!(work["space"], "work");

        let status = api.get("/v1/status").ok();
        assert_eq!(status["documents"], 3);
        assert_eq!(status["online"], true);
        assert_eq!(status["node_id"].as_str().expect("id").len(), 52);
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_creates_and_changes_several_documents_in_one_commit() {
    let (node, _dir) = node(None).await;
    let api = Api::new(&node, None);
    off(move || {
        let (a, _) = api.create(json!({"balance": 10}));
        let seq = api.seq();
        let new = "0b0e4f8e-8f3c-4f61-9d35-0d7f6c1a2b3c";
        let answer = api
            .post(
                "/v1/tx",
                &json!({"ops": [
                    {"op": "set", "doc": a, "path": ["balance"], "value": 5},
                    {"op": "create", "doc": new, "space": "bank", "value": {"balance": 0}},
                    {"op": "set", "doc": new, "path": ["balance"], "value": 5},
                ]}),
            )
            .ok();
        let docs = answer["docs"].as_object().expect("docs");
        assert_eq!(docs.len(), 2);
        assert_eq!(api.seq(), seq + 1, "one commit");
        assert_eq!(
            api.get(&format!("/v1/docs/{a}")).ok()["value"]["balance"],
            5
        );
        let created = api.get(&format!("/v1/docs/{new}")).ok();
        assert_eq!(created["value"]["balance"], 5);
        assert_eq!(created["space"], "bank");
        assert_eq!(created["heads"], docs[new]["heads"]);

        // A failing op anywhere: nothing of the transaction is stored.
        let before = api.get(&format!("/v1/docs/{a}")).ok();
        let message = api
            .post(
                "/v1/tx",
                &json!({"ops": [
                    {"op": "set", "doc": a, "path": ["balance"], "value": 0},
                    {"op": "create", "space": "bank", "value": {"x": 1}},
                    {"op": "increment", "doc": new, "path": ["balance"], "by": 1},
                ]}),
            )
            .error(422, "wrong_type");
        assert!(
            message.starts_with("op 2:"),
            "names the failing op: {message}"
        );
        assert_eq!(api.get(&format!("/v1/docs/{a}")).ok(), before);
        assert_eq!(api.seq(), seq + 1);
        assert_eq!(api.get("/v1/status").ok()["documents"], 2);
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_export_to_and_import_from_automerge_bytes() {
    let (node, _dir) = node(None).await;
    let api = Api::new(&node, None);
    off(move || {
        let (id, heads) = api.create(json!({"list": [1, 2, 3], "name": "x"}));
        let exported = api.get(&format!("/v1/docs/{id}/automerge"));
        assert_eq!(exported.status, 200);
        let bytes = exported.bytes;
        assert_eq!(&bytes[..4], &[0x85, 0x6f, 0x4a, 0x83], "automerge magic");
        // Into a new document: created with the same content and heads.
        let copy = "9a1f0c3e-2b4d-4e5f-8a6b-7c8d9e0f1a2b";
        let imported = api
            .send(
                "POST",
                &format!("/v1/docs/{copy}/automerge?space=copies"),
                Some(bytes.clone()),
                &[],
            )
            .ok();
        assert_eq!(imported["heads"], heads);
        let doc = api.get(&format!("/v1/docs/{copy}")).ok();
        assert_eq!(doc["value"], json!({"list": [1, 2, 3], "name": "x"}));
        assert_eq!(doc["space"], "copies");
        // Again: idempotent.
        let seq = api.seq();
        let again = api
            .send(
                "POST",
                &format!("/v1/docs/{copy}/automerge"),
                Some(bytes.clone()),
                &[],
            )
            .ok();
        assert_eq!(again["heads"], heads);
        assert_eq!(api.seq(), seq);
        // Into the wrong space.
        api.send(
            "POST",
            &format!("/v1/docs/{copy}/automerge?space=other"),
            Some(bytes),
            &[],
        )
        .error(409, "space_mismatch");
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_answers_long_polls_and_streams_events() {
    let (node, _dir) = node(None).await;
    let api = Api::new(&node, None);
    let api2 = Api::new(&node, None);
    off(move || {
        let (a, _) = api.create(json!({"n": 1}));
        let (b, _) = api.create(json!({"n": 2}));
        let all = api.get("/v1/changes?since=0").ok();
        let changes = all["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0]["doc"], a);
        assert_eq!(changes[1]["doc"], b);
        assert_eq!(changes[0]["seq"], 1);
        let last = all["last_seq"].as_u64().expect("last_seq");
        assert_eq!(last, 2);

        // Nothing newer: an immediate empty answer without `wait`.
        let empty = api.get(&format!("/v1/changes?since={last}")).ok();
        assert!(empty["changes"].as_array().expect("changes").is_empty());
        assert_eq!(empty["last_seq"], last);

        // A long poll returns as soon as a commit lands.
        let path = format!("/v1/docs/{a}");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            api2.patch(
                &path,
                &json!({"ops": [{"op": "set", "path": ["n"], "value": 3}]}),
            )
            .ok();
            api2
        });
        let started = Instant::now();
        let polled = api.get(&format!("/v1/changes?since={last}&wait=20")).ok();
        assert!(started.elapsed() < Duration::from_secs(10));
        let changes = polled["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 1, "{polled}");
        assert_eq!(changes[0]["doc"], a);
        assert_eq!(changes[0]["seq"], 3);
        let api2 = writer.join().expect("writer");

        // Server-Sent Events: the backlog, then a live entry.
        let url = format!("{}/v1/changes?since=1", api.base);
        let mut response = api
            .agent
            .get(&url)
            .header("Accept", "text/event-stream")
            .call()
            .expect("sse");
        assert_eq!(response.status(), 200);
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            api2.create(json!({"n": 4}))
        });
        let mut reader = std::io::BufReader::new(response.body_mut().as_reader());
        let mut events = Vec::new();
        let mut line = String::new();
        while events.len() < 3 {
            line.clear();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).expect("line");
            assert!(n > 0, "stream ended early");
            if let Some(data) = line.trim_end().strip_prefix("data:") {
                events.push(serde_json::from_str::<Value>(data.trim()).expect("entry json"));
            }
        }
        let (new, _) = writer.join().expect("writer");
        assert_eq!(events[0]["doc"], b);
        assert_eq!(events[1]["doc"], a);
        assert_eq!(events[2]["doc"], new.as_str());
        assert_eq!(events[2]["seq"], 4);
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_switches_and_metrics() {
    let (node, _dir) = node(None).await;
    let api = Api::new(&node, None);
    off(move || {
        api.create(json!({"n": 1}));
        assert_eq!(
            api.post("/v1/network/offline", &json!({})).ok()["online"],
            false
        );
        assert_eq!(api.get("/v1/status").ok()["online"], false);
        // Local writes go on while offline.
        api.create(json!({"n": 2}));
        assert_eq!(
            api.post("/v1/network/online", &json!({})).ok()["online"],
            true
        );
        assert_eq!(api.get("/v1/status").ok()["online"], true);

        let metrics = api.get("/metrics");
        assert_eq!(metrics.status, 200);
        let text = String::from_utf8(metrics.bytes).expect("utf-8");
        assert!(text.contains("concord_documents 2"), "{text}");
        assert!(
            text.contains("concord_commits_total{origin=\"local\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("concord_api_commit_duration_seconds_count 2"),
            "{text}"
        );
        assert!(text.contains("concord_peers_connected 0"), "{text}");
        assert!(text.contains("concord_online 1"), "{text}");
    })
    .await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx_and_changes_nothing() {
    let (node, _dir) = node(None).await;
    let api = Api::new(&node, None);
    off(move || {
        let (id, _) = api.create(json!({"list": [1], "map": {"k": "v"}, "n": {"$counter": 0}, "t": {"$text": "ab"}, "s": "str"}));
        let doc = format!("/v1/docs/{id}");
        let before = api.get(&doc).ok();
        let seq = api.seq();
        let patch = |ops: Value| api.patch(&doc, &json!({ "ops": ops }));

        // Malformed and misshapen bodies.
        api.send("PATCH", &doc, Some(b"{\"ops\": [".to_vec()), &[])
            .error(400, "malformed_json");
        api.send("POST", "/v1/docs", Some(b"not json".to_vec()), &[])
            .error(400, "malformed_json");
        api.patch(&doc, &json!({"opz": []})).error(400, "invalid_request");
        patch(json!([{"op": "sett", "path": ["x"], "value": 1}])).error(400, "invalid_request");
        patch(json!([{"op": "set", "path": [-1], "value": 1}])).error(400, "invalid_request");
        api.post("/v1/docs", &json!({"value": [1, 2]})).error(400, "invalid_value");
        api.post("/v1/docs", &json!({"value": {"a": 1}, "space": ""})).error(400, "invalid_space");
        api.post("/v1/tx", &json!({"ops": [{"op": "set", "path": ["x"], "value": 1}]}))
            .error(400, "invalid_request");

        // Unknown documents, ids and endpoints.
        let missing = "/v1/docs/00000000-0000-4000-8000-000000000000";
        api.get(missing).error(404, "document_not_found");
        api.patch(missing, &json!({"ops": []})).error(404, "document_not_found");
        api.get(&format!("{missing}/history")).error(404, "document_not_found");
        api.get(&format!("{missing}/automerge")).error(404, "document_not_found");
        api.get("/v1/docs/not-a-uuid").error(400, "invalid_doc_id");
        api.get("/v1/docs?after=zzz").error(400, "invalid_doc_id");
        api.get("/v1/nothing").error(404, "not_found");
        api.send("PUT", "/v1/docs", Some(Vec::new()), &[]).error(405, "method_not_allowed");
        api.post("/v1/docs", &json!({"id": before["id"]})).error(409, "document_exists");

        // Paths that do not exist or have the wrong type.
        patch(json!([{"op": "set", "path": ["nope", "x"], "value": 1}])).error(422, "path_not_found");
        patch(json!([{"op": "delete", "path": ["nope"]}])).error(422, "path_not_found");
        patch(json!([{"op": "set", "path": ["list", 5], "value": 1}])).error(422, "index_out_of_bounds");
        patch(json!([{"op": "set", "path": ["s", "x"], "value": 1}])).error(422, "wrong_type");
        patch(json!([{"op": "set", "path": ["list", "x"], "value": 1}])).error(422, "wrong_type");
        patch(json!([{"op": "set", "path": [], "value": 1}])).error(400, "invalid_path");

        // Ops on the wrong kind of object.
        patch(json!([{"op": "insert", "path": ["map", "k"], "value": 1}])).error(422, "wrong_type");
        patch(json!([{"op": "increment", "path": ["s"], "by": 1}])).error(422, "wrong_type");
        patch(json!([{"op": "splice_text", "path": ["map"], "pos": 0, "delete": 0, "insert": "x"}]))
            .error(422, "wrong_type");
        patch(json!([{"op": "splice_text", "path": ["t"], "pos": 9, "delete": 0, "insert": "x"}]))
            .error(422, "index_out_of_bounds");
        // A good op before a bad one: neither is stored.
        patch(json!([
            {"op": "set", "path": ["s"], "value": "changed"},
            {"op": "increment", "path": ["map"], "by": 1},
        ]))
        .error(422, "wrong_type");

        // Heads.
        api.get(&format!("{doc}?at=xyz")).error(400, "invalid_heads");
        api.get(&format!("{doc}?at={}", "ab".repeat(32))).error(404, "unknown_heads");

        // Queries.
        api.get("/v1/changes?since=-1").error(400, "invalid_query");
        api.get("/v1/changes?wait=forever").error(400, "invalid_query");
        // Past what a Duration holds: capped, not a panic (a document is
        // there already, so it answers at once).
        let changes = api.get("/v1/changes?since=0&wait=1e300").ok();
        assert!(!changes["changes"].as_array().expect("changes").is_empty());
        api.get("/v1/docs?limit=lots").error(400, "invalid_query");

        // Oversized bodies.
        let big = vec![b' '; concord_node::api::MAX_BODY + 1];
        api.send("PATCH", &doc, Some(big.clone()), &[]).error(413, "payload_too_large");
        api.send("POST", &format!("{doc}/automerge"), Some(big), &[]).error(413, "payload_too_large");

        // Invalid automerge bytes: garbage, empty, and a valid document
        // truncated and with a byte flipped.
        let saved = api.get(&format!("{doc}/automerge")).bytes;
        let import = |bytes: Vec<u8>| api.send("POST", &format!("{doc}/automerge"), Some(bytes), &[]);
        import(b"definitely not automerge".to_vec()).error(400, "invalid_automerge");
        import(Vec::new()).error(400, "invalid_automerge");
        import(saved[..saved.len() / 2].to_vec()).error(400, "invalid_automerge");
        let mut flipped = saved.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x5a;
        import(flipped).error(400, "invalid_automerge");
        let fresh = "/v1/docs/11111111-2222-4333-8444-555555555555/automerge";
        api.send("POST", fresh, Some(b"\x85\x6f\x4a\x83garbage".to_vec()), &[])
            .error(400, "invalid_automerge");

        // Nothing changed.
        assert_eq!(api.get(&doc).ok(), before);
        assert_eq!(api.seq(), seq);
        assert_eq!(api.get("/v1/status").ok()["documents"], 1);
    })
    .await;
    node.shutdown().await;
}

/// The status line of a raw HTTP/1.1 request with these extra headers.
fn raw_status(node: &Node, method: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let addr = node.api_addr().expect("api");
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let body = "{}";
    write!(
        stream,
        "{method} /v1/docs HTTP/1.1\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.lines().next().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_pages_of_other_origins_and_foreign_hosts_are_refused() {
    let (node, _dir) = node(None).await;
    let addr = node.api_addr().expect("api");
    let node = std::sync::Arc::new(node);
    let n = std::sync::Arc::clone(&node);
    off(move || {
        let ok = format!("Host: {addr}\r\n");
        assert!(raw_status(&n, "POST", &ok).contains(" 201 "));
        let localhost = format!(
            "Host: localhost:{}\r\nOrigin: http://localhost:3000\r\n",
            addr.port()
        );
        assert!(raw_status(&n, "POST", &localhost).contains(" 201 "));
        // DNS rebinding: a page's own name resolving to 127.0.0.1.
        let rebound = "Host: evil.example:7401\r\n";
        assert!(raw_status(&n, "POST", rebound).contains(" 403 "));
        // A form or fetch from another page, as a "simple" request.
        let forged =
            format!("Host: {addr}\r\nOrigin: https://evil.example\r\nContent-Type: text/plain\r\n");
        assert!(raw_status(&n, "POST", &forged).contains(" 403 "));
        assert!(
            raw_status(&n, "GET", &format!("Host: {addr}\r\nOrigin: null\r\n")).contains(" 403 ")
        );
    })
    .await;
    // Only the two allowed requests made documents.
    assert_eq!(node.status().documents, 2);
    match std::sync::Arc::try_unwrap(node) {
        Ok(node) => node.shutdown().await,
        Err(_) => panic!("the node is still shared"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_guards_the_api_and_is_required_off_loopback() {
    let (node, _dir) = node(Some("s3cret")).await;
    let without = Api::new(&node, None);
    let wrong = Api::new(&node, Some("guess"));
    let with = Api::new(&node, Some("s3cret"));
    off(move || {
        without.get("/v1/status").error(401, "unauthorized");
        wrong.get("/v1/status").error(401, "unauthorized");
        wrong
            .post("/v1/docs", &json!({}))
            .error(401, "unauthorized");
        without.get("/metrics").error(401, "unauthorized");
        assert_eq!(with.get("/v1/status").ok()["documents"], 0);
        assert_eq!(with.post("/v1/docs", &json!({})).status, 201);
    })
    .await;
    node.shutdown().await;

    let dir = tempfile::tempdir().expect("tempdir");
    Identity::create_in(dir.path()).expect("identity");
    let mut config = NodeConfig::new(dir.path(), "127.0.0.1:0".parse().expect("addr"));
    config.api = Some("0.0.0.0:0".parse().expect("addr"));
    match Node::start(config).await {
        Err(NodeError::ApiWithoutToken(_)) => {}
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_peers_exchange() {
    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let ids: Vec<_> = dirs
        .iter()
        .map(|d| Identity::create_in(d.path()).expect("identity").node_id())
        .collect();
    let sockets: Vec<_> = (0..2)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("port"))
        .collect();
    let addrs: Vec<_> = sockets
        .iter()
        .map(|s| s.local_addr().expect("addr"))
        .collect();
    drop(sockets);
    let mut nodes = Vec::new();
    for i in 0..2 {
        let mut config = NodeConfig::new(dirs[i].path(), addrs[i]);
        config.api = Some("127.0.0.1:0".parse().expect("addr"));
        config.peers = vec![concord_node::PeerConfig::new(
            ids[1 - i],
            (i == 1).then_some(addrs[0]),
        )];
        nodes.push(Node::start(config).await.expect("start"));
    }
    let (a, b) = (Api::new(&nodes[0], None), Api::new(&nodes[1], None));
    let (a_id, b_id) = (ids[0].to_string(), ids[1].to_string());
    off(move || {
        let (doc, heads) = b.create(json!({"from": "b"}));
        let path = format!("/v1/docs/{doc}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while a.get(&path).status != 200 || a.get(&path).body["heads"] != heads {
            assert!(Instant::now() < deadline, "a never received b's document");
            std::thread::sleep(Duration::from_millis(20));
        }
        let text = |api: &Api| String::from_utf8(api.get("/metrics").bytes).expect("utf-8");
        let on_a = text(&a);
        let on_b = text(&b);
        let peer = |name: &str, id: &str| format!("concord_{name}{{peer=\"{id}\"}}");
        assert!(
            support::metric(&on_a, &peer("peer_changes_received_total", &b_id)) >= Some(1.0),
            "{on_a}"
        );
        assert!(
            support::metric(&on_b, &peer("peer_changes_sent_total", &a_id)) >= Some(1.0),
            "{on_b}"
        );
        assert!(
            support::metric(&on_b, &peer("peer_docs_announced_total", &a_id)) >= Some(1.0),
            "{on_b}"
        );
        assert_eq!(
            support::metric(&on_a, &peer("peer_connected", &b_id)),
            Some(1.0),
            "{on_a}"
        );
        assert_eq!(
            support::metric(&on_a, "concord_peers_connected "),
            Some(1.0),
            "{on_a}"
        );
        assert!(
            support::metric(&on_a, &peer("peer_received_bytes_total", &b_id)) > Some(0.0),
            "{on_a}"
        );
        assert!(
            support::metric(&on_a, &peer("peer_sent_bytes_total", &b_id)) > Some(0.0),
            "{on_a}"
        );
        assert!(
            support::metric(&on_a, &peer("peer_sync_lag_seconds", &b_id)).is_some(),
            "{on_a}"
        );
        assert_eq!(
            support::metric(&on_a, "concord_commits_total{origin=\"peer\"}"),
            Some(1.0),
            "{on_a}"
        );
        assert_eq!(
            support::metric(&on_a, "concord_documents "),
            Some(1.0),
            "{on_a}"
        );
    })
    .await;
    for node in nodes {
        node.shutdown().await;
    }
}
