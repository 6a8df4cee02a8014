//! Hermes / Qwen JSON calls: `{"name": ..., "arguments": {...}}` inside
//! `<tool_call>` tags. Llama 3's `{"name": ..., "parameters": {...}}` is the
//! same object with another key, so it is parsed here too.

use serde_json::Value;

/// The call's name and arguments object, or `None` if `inner` is not one.
pub fn parse(inner: &str) -> Option<(String, Value)> {
    let v: Value = serde_json::from_str(inner.trim()).ok()?;
    let name = v.get("name")?.as_str()?.to_string();
    if name.is_empty() {
        return None;
    }
    let args = match v.get("arguments").or_else(|| v.get("parameters")) {
        None | Some(Value::Null) => Value::Object(Default::default()),
        // Some models write the arguments as a JSON string.
        Some(Value::String(s)) => serde_json::from_str::<Value>(s).ok().filter(Value::is_object)?,
        Some(o @ Value::Object(_)) => o.clone(),
        Some(_) => return None,
    };
    Some((name, args))
}
