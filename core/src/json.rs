//! The JSON view of a document: nested maps and lists as objects and arrays,
//! counters as numbers, text as strings. Where concurrent writes left a
//! conflict, the deterministic winner (the same on every replica) is shown.

use automerge::{ChangeHash, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use serde_json::{Map, Number, Value as Json};

/// The whole document (its root map) as JSON, now or as of `heads`.
pub fn to_json(doc: &impl ReadDoc, heads: Option<&[ChangeHash]>) -> Json {
    object(doc, &ROOT, ObjType::Map, heads)
}

fn object(doc: &impl ReadDoc, obj: &ObjId, kind: ObjType, heads: Option<&[ChangeHash]>) -> Json {
    match kind {
        ObjType::Map | ObjType::Table => {
            let mut map = Map::new();
            let keys: Vec<String> = match heads {
                Some(h) => doc.keys_at(obj, h).collect(),
                None => doc.keys(obj).collect(),
            };
            for key in keys {
                let value = match heads {
                    Some(h) => doc.get_at(obj, key.as_str(), h),
                    None => doc.get(obj, key.as_str()),
                };
                if let Ok(Some((value, id))) = value {
                    map.insert(key, value_to_json(doc, value, &id, heads));
                }
            }
            Json::Object(map)
        }
        ObjType::List => {
            let len = match heads {
                Some(h) => doc.length_at(obj, h),
                None => doc.length(obj),
            };
            let items = (0..len)
                .filter_map(|i| {
                    let value = match heads {
                        Some(h) => doc.get_at(obj, i, h),
                        None => doc.get(obj, i),
                    };
                    value
                        .ok()
                        .flatten()
                        .map(|(value, id)| value_to_json(doc, value, &id, heads))
                })
                .collect();
            Json::Array(items)
        }
        ObjType::Text => {
            let text = match heads {
                Some(h) => doc.text_at(obj, h),
                None => doc.text(obj),
            };
            Json::String(text.unwrap_or_default())
        }
    }
}

fn value_to_json(
    doc: &impl ReadDoc,
    value: Value<'_>,
    id: &ObjId,
    heads: Option<&[ChangeHash]>,
) -> Json {
    match value {
        Value::Object(kind) => object(doc, id, kind, heads),
        Value::Scalar(s) => scalar(&s),
    }
}

fn scalar(value: &ScalarValue) -> Json {
    match value {
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::Number(i64::from(c).into()),
        ScalarValue::Timestamp(t) => Json::Number((*t).into()),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|x| Json::Number((*x).into())).collect()),
    }
}
