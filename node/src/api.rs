//! The local HTTP/JSON API (INTERFACE.md), served by the node with axum.
//!
//! Every request that writes makes one atomic, durable commit, or none: ops
//! are applied to the transaction's working copies and the transaction is
//! dropped on the first error. Store work runs on tokio's blocking threads.
//! Bad input gets a 4xx answer `{"error":{"code","message"}}` and changes
//! nothing; the codes are listed in the README.
//!
//! Limits: request bodies up to [`MAX_BODY`] bytes (413 `payload_too_large`
//! beyond); long polls of the change feed up to [`MAX_WAIT`]; list pages up
//! to [`MAX_PAGE`] entries.

use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use concord_core::ops::{self, Op, OpError};
use concord_core::{
    ApplyError, CommitError, DEFAULT_SPACE, DocError, DocId, FeedEntry, Heads, Incoming,
    IncomingData, Origin, Receipt, StorageError, Transaction, TxError,
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::node::Inner;

/// The largest request body accepted, in bytes (JSON or automerge).
pub const MAX_BODY: usize = 16 << 20;
/// The longest a change-feed long poll waits (`wait` is capped to it).
pub const MAX_WAIT: Duration = Duration::from_secs(60);
/// The most entries one page of `GET /v1/docs` or `GET /v1/changes` holds.
pub const MAX_PAGE: usize = 1000;
/// The page size when `limit` is absent.
const DEFAULT_PAGE: usize = 100;

#[derive(Clone)]
struct Api {
    node: Arc<Inner>,
    token: Option<Arc<str>>,
}

/// The router of the API over a node.
pub(crate) fn router(node: Arc<Inner>, token: Option<String>) -> Router {
    let api = Api {
        node,
        token: token.map(Arc::from),
    };
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/docs", post(create_doc).get(list_docs))
        .route("/v1/docs/{id}", get(get_doc).patch(patch_doc))
        .route("/v1/docs/{id}/history", get(history))
        .route("/v1/docs/{id}/automerge", get(export).post(import))
        .route("/v1/tx", post(transact))
        .route("/v1/changes", get(changes))
        .route("/v1/network/offline", post(offline))
        .route("/v1/network/online", post(online))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(api.clone(), authorize))
        .with_state(api)
}

/// Serves the API until the node shuts down.
pub(crate) async fn serve(node: Arc<Inner>, listener: tokio::net::TcpListener, router: Router) {
    let mut shutdown = node.shutdown.subscribe();
    let stopped = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stopped)
        .await
    {
        warn!(error = %e, "the HTTP API stopped");
    }
}

/// An error answer: `{"error":{"code","message"}}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    fn internal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }

    fn exists(id: DocId) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "document_exists",
            format!("a document with id {id} already exists"),
        )
    }

    fn invalid_space(space: &str) -> Self {
        Self::bad_request(
            "invalid_space",
            format!(
                "{space:?} is not a valid space name (1 to {} bytes, no control characters)",
                concord_core::MAX_SPACE_LEN
            ),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            warn!(code = self.code, message = %self.message, "API request failed");
        } else {
            debug!(code = self.code, message = %self.message, "API request refused");
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        Self::internal("storage_error", format!("the store failed: {e}"))
    }
}

impl From<DocError> for ApiError {
    fn from(e: DocError) -> Self {
        match e {
            DocError::NotFound(id) => Self::new(
                StatusCode::NOT_FOUND,
                "document_not_found",
                format!("there is no document {id}"),
            ),
            DocError::UnknownHeads { id, heads } => Self::new(
                StatusCode::NOT_FOUND,
                "unknown_heads",
                format!("document {id} has no state with heads {heads}"),
            ),
            DocError::Corrupt { id, reason } => Self::internal(
                "document_corrupt",
                format!("document {id} is damaged in the store and cannot be read: {reason}"),
            ),
            DocError::Storage(e) => e.into(),
            other => Self::internal("storage_error", other.to_string()),
        }
    }
}

impl From<TxError> for ApiError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::AlreadyExists(id) => Self::exists(id),
            TxError::InvalidSpace(space) => Self::invalid_space(&space),
            TxError::Doc(e) => e.into(),
            TxError::Change { id, source } => Self::bad_request(
                "invalid_op",
                format!("the change to document {id} failed: {source}"),
            ),
            other => Self::bad_request("invalid_op", other.to_string()),
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> Self {
        match e {
            // Created by a transaction that committed meanwhile.
            CommitError::AlreadyExists(id) => Self::exists(id),
            CommitError::Doc(e) => e.into(),
            CommitError::Storage(e) => e.into(),
            other => Self::internal("commit_failed", format!("the commit failed: {other}")),
        }
    }
}

impl From<ApplyError> for ApiError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::InvalidData { reason, .. } => Self::bad_request(
                "invalid_automerge",
                format!("the body is not automerge data: {reason}"),
            ),
            ApplyError::SpaceMismatch {
                id,
                existing,
                claimed,
            } => Self::new(
                StatusCode::CONFLICT,
                "space_mismatch",
                format!("document {id} is in space {existing:?}, not {claimed:?}"),
            ),
            ApplyError::InvalidSpace(space) => Self::bad_request(
                "invalid_space",
                format!("{space:?} is not a valid space name"),
            ),
            ApplyError::TooManyPending { .. } => {
                Self::bad_request("too_many_pending", format!("refused: {e}"))
            }
            ApplyError::Doc(e) => e.into(),
            ApplyError::Storage(e) => e.into(),
            other => Self::bad_request("invalid_automerge", other.to_string()),
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        let status = match e {
            OpError::InvalidPath { .. } | OpError::InvalidValue { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Self::new(status, e.code(), e.to_string())
    }
}

/// Runs store work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ApiError::internal(
            "internal_error",
            format!("the request's worker failed: {e}"),
        ))
    })
}

/// A document's heads, without loading its content.
fn heads_of(snapshot: &concord_core::Snapshot, id: DocId) -> Result<Heads, ApiError> {
    match snapshot.summary(id)? {
        Some(summary) => Ok(summary.heads),
        None => Err(DocError::NotFound(id).into()),
    }
}

/// Commits, timing the commit for the metrics.
fn commit(node: &Inner, tx: Transaction) -> Result<Receipt, ApiError> {
    let started = Instant::now();
    let receipt = tx.commit()?;
    if receipt.seq.is_some() {
        node.metrics.commit_latency(started.elapsed());
    }
    Ok(receipt)
}

/// The body, or why there is none.
fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than the limit of {MAX_BODY} bytes"),
            )
        } else {
            ApiError::bad_request("invalid_body", format!("the body could not be read: {e}"))
        }
    })
}

/// A JSON body of type `T`.
fn json_body<T: serde::de::DeserializeOwned>(
    raw: Result<Bytes, BytesRejection>,
    what: &str,
) -> Result<T, ApiError> {
    let raw = body(raw)?;
    if raw.is_empty() {
        return Err(ApiError::bad_request(
            "malformed_json",
            format!("the body is empty; expected {what}"),
        ));
    }
    let value: Value = serde_json::from_slice(&raw).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("the body is not valid JSON: {e}"))
    })?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request("invalid_request", format!("expected {what}: {e}")))
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| {
        ApiError::bad_request(
            "invalid_query",
            format!("the query string is invalid: {}", e.body_text()),
        )
    })
}

fn doc_id(text: &str) -> Result<DocId, ApiError> {
    text.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid_doc_id",
            format!(
                "{:?} is not a document id (a UUID such as 67e55044-10b1-426f-9247-bb680e5fe0c8)",
                text.chars().take(100).collect::<String>()
            ),
        )
    })
}

async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    if let Some(token) = &api.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()));
        if !ok {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API requires the header `Authorization: Bearer <api_token>`",
            )
            .into_response();
        }
    } else if let Some(reason) = from_elsewhere(request.headers()) {
        return ApiError::new(StatusCode::FORBIDDEN, "forbidden", reason).into_response();
    }
    next.run(request).await
}

/// Without a token the API listens on loopback only, and answers whatever
/// reaches it there, so a web page open in a browser on the same machine
/// must not be able to use it: by a form or `fetch` posting to it (the
/// browser sends the page's `Origin`), or by DNS rebinding (a name of the
/// page's that resolves to 127.0.0.1: the browser sends that name as
/// `Host`). Why such a request is refused, if it is; curl and programs
/// send a loopback `Host` and no `Origin`.
fn from_elsewhere(headers: &axum::http::HeaderMap) -> Option<String> {
    if let Some(host) = headers.get(header::HOST) {
        let host = host.to_str().unwrap_or("");
        if !is_loopback_host(host) {
            return Some(format!(
                "a request for host {:?}: without an api_token the API answers only \
                 requests addressed to a loopback host (localhost, 127.0.0.1, [::1])",
                host.chars().take(100).collect::<String>()
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        let host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if !host.is_some_and(is_loopback_host) {
            return Some(format!(
                "a request from the web page {:?}: without an api_token the API \
                 refuses requests from pages of other origins",
                origin.chars().take(100).collect::<String>()
            ));
        }
    }
    None
}

/// Whether `authority` (`host[:port]`) names this machine's loopback.
fn is_loopback_host(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; the API lives under /v1 (see the README)",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

async fn status(State(api): State<Api>) -> Result<Response, ApiError> {
    let node = api.node;
    let status = blocking(move || Ok(node.status())).await?;
    Ok(axum::Json(status).into_response())
}

async fn metrics(State(api): State<Api>) -> Result<Response, ApiError> {
    let node = api.node;
    let text = blocking(move || Ok(node.metrics.render(&node.status()))).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

async fn offline(State(api): State<Api>) -> Response {
    api.node.set_online(false);
    axum::Json(json!({"online": false})).into_response()
}

async fn online(State(api): State<Api>) -> Response {
    api.node.set_online(true);
    axum::Json(json!({"online": true})).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateDoc {
    #[serde(default)]
    value: Option<Value>,
    #[serde(default)]
    space: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

/// Creates `id` in `tx` with `value` at its root. (`ops` checks its input
/// and contains automerge's panics; on an error the caller drops `tx`.)
fn create_in(
    tx: &mut Transaction,
    id: DocId,
    space: &str,
    value: Option<&Value>,
    op: usize,
) -> Result<(), ApiError> {
    let written = tx.create_with_id(id, space, |d| {
        Ok(match value {
            Some(v) => ops::write_root(d, v).map_err(|e| e.at_op(op)),
            None => Ok(()),
        })
    })?;
    written.map_err(ApiError::from)
}

async fn create_doc(
    State(api): State<Api>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let raw = body(raw)?;
    // An empty body creates an empty document.
    let request: CreateDoc = if raw.iter().all(u8::is_ascii_whitespace) {
        CreateDoc {
            value: None,
            space: None,
            id: None,
        }
    } else {
        json_body(
            Ok(raw),
            r#"{"value":{…},"space":"…","id":"…"} (all optional)"#,
        )?
    };
    let id = match &request.id {
        Some(text) => doc_id(text)?,
        None => DocId::random(),
    };
    let node = api.node;
    let heads = blocking(move || {
        let space = request.space.as_deref().unwrap_or(DEFAULT_SPACE);
        let mut tx = node.replica.begin()?;
        create_in(&mut tx, id, space, request.value.as_ref(), 0)?;
        let receipt = commit(&node, tx)?;
        Ok(receipt.heads(id).cloned().unwrap_or_default())
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"id": id.to_string(), "heads": heads})),
    )
        .into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<String>,
    limit: Option<usize>,
}

async fn list_docs(
    State(api): State<Api>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let after = q.after.as_deref().map(doc_id).transpose()?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let node = api.node;
    let docs = blocking(move || Ok(node.replica.read()?.list(after, limit)?)).await?;
    let next = (docs.len() >= limit)
        .then(|| docs.last().map(|d| d.id.to_string()))
        .flatten();
    let docs: Vec<Value> = docs
        .iter()
        .map(|d| json!({"id": d.id.to_string(), "space": d.space, "heads": d.heads}))
        .collect();
    Ok(axum::Json(json!({"docs": docs, "next": next})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AtQuery {
    at: Option<String>,
}

async fn get_doc(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<AtQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let at: Option<Heads> = match query(q)?.at {
        Some(text) => {
            let heads: Heads = text.parse().map_err(|e: concord_core::ParseHeadsError| {
                ApiError::bad_request("invalid_heads", e.to_string())
            })?;
            if heads.is_empty() {
                return Err(ApiError::bad_request(
                    "invalid_heads",
                    "`at` names no heads; give comma-separated change hashes",
                ));
            }
            Some(heads)
        }
        None => None,
    };
    let node = api.node;
    let body = blocking(move || {
        let doc = node.replica.read()?.get(id)?;
        let (heads, value) = match &at {
            Some(heads) => (heads.clone(), doc.to_json_at(heads)?),
            None => (doc.heads().clone(), doc.to_json()),
        };
        Ok(json!({
            "id": id.to_string(),
            "space": doc.space(),
            "heads": heads,
            "value": value,
        }))
    })
    .await?;
    Ok(axum::Json(body).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    ops: Vec<Op>,
}

/// Applies `ops` to document `id` in `tx` as one change. After a contained
/// automerge panic ([`OpError::Automerge`]) the transaction's working copy
/// of the document is dropped: automerge may have left it damaged.
fn edit(tx: &mut Transaction, id: DocId, ops: &[Op]) -> Result<Result<(), OpError>, TxError> {
    let applied = tx.change(id, |d| Ok(ops::apply_ops(d, ops)))?;
    if let Err(OpError::Automerge { .. }) = &applied {
        tx.discard(id);
    }
    Ok(applied)
}

async fn patch_doc(
    State(api): State<Api>,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let patch: Patch = json_body(raw, r#"{"ops":[{"op":"set","path":[…],"value":…},…]}"#)?;
    let node = api.node;
    let heads = blocking(move || {
        let mut tx = node.replica.begin()?;
        edit(&mut tx, id, &patch.ops)??;
        let receipt = commit(&node, tx)?;
        match receipt.heads(id) {
            Some(heads) => Ok(heads.clone()),
            // The ops changed nothing: the document's heads now.
            None => heads_of(&node.replica.read()?, id),
        }
    })
    .await?;
    Ok(axum::Json(json!({"heads": heads})).into_response())
}

/// One op of `POST /v1/tx`.
#[derive(Debug)]
enum TxOp {
    Create {
        doc: Option<DocId>,
        space: String,
        value: Option<Value>,
    },
    Edit {
        doc: DocId,
        op: Op,
    },
}

fn tx_op(index: usize, value: Value) -> Result<TxOp, ApiError> {
    let invalid = |message: String| ApiError::bad_request("invalid_request", message);
    let Value::Object(mut fields) = value else {
        return Err(invalid(format!("op {index} is not a JSON object")));
    };
    let doc = match fields.remove("doc") {
        Some(Value::String(text)) => Some(doc_id(&text)?),
        Some(Value::Null) | None => None,
        Some(_) => return Err(invalid(format!("op {index}: `doc` must be a document id"))),
    };
    if fields.get("op").and_then(Value::as_str) == Some("create") {
        fields.remove("op");
        let space = match fields.remove("space") {
            Some(Value::String(s)) => s,
            None | Some(Value::Null) => DEFAULT_SPACE.to_string(),
            Some(_) => return Err(invalid(format!("op {index}: `space` must be a string"))),
        };
        let value = fields.remove("value");
        if let Some(extra) = fields.keys().next() {
            return Err(invalid(format!(
                "op {index}: unknown field `{extra}` in a create op"
            )));
        }
        return Ok(TxOp::Create { doc, space, value });
    }
    let doc = doc.ok_or_else(|| invalid(format!("op {index} names no `doc`")))?;
    let op = serde_json::from_value(Value::Object(fields))
        .map_err(|e| invalid(format!("op {index}: {e}")))?;
    Ok(TxOp::Edit { doc, op })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TxBody {
    ops: Vec<Value>,
}

async fn transact(
    State(api): State<Api>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: TxBody = json_body(raw, r#"{"ops":[{"doc":ID,"op":…},…]}"#)?;
    let ops = body
        .ops
        .into_iter()
        .enumerate()
        .map(|(i, v)| tx_op(i, v))
        .collect::<Result<Vec<_>, _>>()?;
    let node = api.node;
    let docs = blocking(move || {
        let mut tx = node.replica.begin()?;
        let mut touched: Vec<DocId> = Vec::new();
        let mut requested = ops.into_iter().enumerate().peekable();
        while let Some((i, op)) = requested.next() {
            match op {
                TxOp::Create { doc, space, value } => {
                    let id = doc.unwrap_or_else(DocId::random);
                    create_in(&mut tx, id, &space, value.as_ref(), i)?;
                    touched.push(id);
                }
                TxOp::Edit { doc, op } => {
                    // A run of edits to one document is one automerge change.
                    let mut run = vec![op];
                    while let Some((_, TxOp::Edit { op, .. })) = requested
                        .next_if(|(_, next)| matches!(next, TxOp::Edit { doc: d, .. } if *d == doc))
                    {
                        run.push(op);
                    }
                    edit(&mut tx, doc, &run)?.map_err(|e| e.at_op(i))?;
                    touched.push(doc);
                }
            }
        }
        let receipt = commit(&node, tx)?;
        let snapshot = node.replica.read()?;
        let mut docs = BTreeMap::new();
        for id in touched {
            let heads = match receipt.heads(id) {
                Some(h) => h.clone(),
                // Ops that changed nothing: the heads as they are.
                None => heads_of(&snapshot, id)?,
            };
            docs.insert(id.to_string(), json!({"heads": heads}));
        }
        Ok(docs)
    })
    .await?;
    Ok(axum::Json(json!({"docs": docs})).into_response())
}

async fn history(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let node = api.node;
    let changes = blocking(move || Ok(node.replica.read()?.get(id)?.history())).await?;
    Ok(axum::Json(json!({"changes": changes})).into_response())
}

async fn export(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let node = api.node;
    let bytes = blocking(move || Ok(node.replica.read()?.get(id)?.save())).await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    space: Option<String>,
}

async fn import(
    State(api): State<Api>,
    Path(id): Path<String>,
    q: Result<Query<ImportQuery>, QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = doc_id(&id)?;
    let q = query(q)?;
    let raw = body(raw)?;
    if raw.is_empty() {
        return Err(ApiError::bad_request(
            "invalid_automerge",
            "the body is empty; expected automerge bytes (a saved document or changes)",
        ));
    }
    let node = api.node;
    let heads = blocking(move || {
        let existing = node.replica.read()?.summary(id)?;
        let space = match (q.space, &existing) {
            (Some(space), _) => space,
            (None, Some(summary)) => summary.space.clone(),
            (None, None) => DEFAULT_SPACE.to_string(),
        };
        let incoming = Incoming {
            id,
            space,
            data: IncomingData::Document(raw.to_vec()),
        };
        let started = Instant::now();
        let receipt = node.replica.apply(Origin::Import, vec![incoming])?;
        if receipt.seq.is_some() {
            node.metrics.commit_latency(started.elapsed());
        }
        match receipt.heads(id) {
            Some(heads) => Ok(heads.clone()),
            None => Ok(node
                .replica
                .read()?
                .summary(id)?
                .map(|s| s.heads)
                .unwrap_or_default()),
        }
    })
    .await?;
    Ok(axum::Json(json!({"heads": heads})).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangesQuery {
    since: Option<u64>,
    wait: Option<f64>,
    limit: Option<usize>,
}

fn entry_json(entry: &FeedEntry) -> Value {
    json!({
        "seq": entry.seq,
        "doc": entry.id.to_string(),
        "space": entry.space,
        "heads": entry.heads,
    })
}

/// A page of the feed after `since`, and the sequence number it reaches.
async fn feed_page(
    node: &Arc<Inner>,
    since: u64,
    limit: usize,
) -> Result<(Vec<FeedEntry>, u64), ApiError> {
    let node = Arc::clone(node);
    blocking(move || {
        let page = node.replica.read()?.feed_page(since, limit)?;
        Ok((page.entries, page.up_to))
    })
    .await
}

async fn changes(
    State(api): State<Api>,
    headers: HeaderMap,
    q: Result<Query<ChangesQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let since = q.since.unwrap_or(0);
    let limit = q.limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let wait = match q.wait {
        Some(w) if !w.is_finite() || w < 0.0 => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "`wait` must be a number of seconds, 0 or more",
            ));
        }
        // Capped before converting: `from_secs_f64` panics past u64 seconds.
        Some(w) => Duration::from_secs_f64(w.min(MAX_WAIT.as_secs_f64())),
        None => Duration::ZERO,
    };
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    // Subscribe before reading, so a commit between the read and the wait
    // is not missed.
    let mut feed = api.node.feed.subscribe();
    let mut shutdown = api.node.shutdown.subscribe();
    if streaming {
        return Ok(stream(api.node, since, limit, feed, shutdown).into_response());
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let (entries, up_to) = feed_page(&api.node, since, limit).await?;
        if !entries.is_empty() || tokio::time::Instant::now() >= deadline {
            let last_seq = entries.iter().map(|e| e.seq).max().unwrap_or(up_to);
            let changes: Vec<Value> = entries.iter().map(entry_json).collect();
            return Ok(
                axum::Json(json!({"changes": changes, "last_seq": last_seq})).into_response(),
            );
        }
        tokio::select! {
            changed = feed.changed() => if changed.is_err() { break },
            _ = shutdown.wait_for(|stop| *stop) => break,
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "shutting_down",
        "the node is shutting down",
    ))
}

/// The change feed as Server-Sent Events: every entry after `since`, then
/// each new one as it commits, until the client leaves or the node stops.
fn stream(
    node: Arc<Inner>,
    since: u64,
    limit: usize,
    feed: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    struct Tail {
        node: Arc<Inner>,
        cursor: u64,
        limit: usize,
        feed: watch::Receiver<u64>,
        shutdown: watch::Receiver<bool>,
        buffered: VecDeque<FeedEntry>,
    }
    let tail = Tail {
        node,
        cursor: since,
        limit,
        feed,
        shutdown,
        buffered: VecDeque::new(),
    };
    let events = futures_util::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(entry) = t.buffered.pop_front() {
                let event = SseEvent::default()
                    .id(entry.seq.to_string())
                    .data(entry_json(&entry).to_string());
                return Some((Ok(event), t));
            }
            if *t.shutdown.borrow() {
                return None;
            }
            let (entries, up_to) = feed_page(&t.node, t.cursor, t.limit).await.ok()?;
            t.cursor = t.cursor.max(up_to);
            if !entries.is_empty() {
                t.buffered.extend(entries);
                continue;
            }
            tokio::select! {
                changed = t.feed.changed() => changed.ok()?,
                _ = t.shutdown.wait_for(|stop| *stop) => return None,
            }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
