//! Qwen3-Coder XML calls:
//! `<function=NAME>\n<parameter=P>\nVALUE\n</parameter>\n...</function>`
//! inside `<tool_call>` tags. Values are text; a parameter the tool's schema
//! does not declare as a string is read as JSON when it parses as JSON.

use serde_json::{Map, Value};

/// The schema type of `param` of tool `name`, if declared.
fn param_type<'a>(tools: &'a [Value], name: &str, param: &str) -> Option<&'a str> {
    tools
        .iter()
        .map(|t| t.get("function").unwrap_or(t))
        .find(|f| f.get("name").and_then(Value::as_str) == Some(name))?
        .pointer(&format!("/parameters/properties/{param}/type"))?
        .as_str()
}

/// The call's name and arguments object, or `None` if `inner` is not one.
pub fn parse(inner: &str, tools: &[Value]) -> Option<(String, Value)> {
    let body = inner.trim();
    let rest = body.strip_prefix("<function=")?;
    let close = rest.find('>')?;
    let name = rest[..close].trim().to_string();
    let mut rest = rest[close + 1..].trim_start();
    let mut args = Map::new();
    loop {
        if let Some(after) = rest.strip_prefix("</function>") {
            return after.trim().is_empty().then_some((name, Value::Object(args)));
        }
        let p = rest.strip_prefix("<parameter=")?;
        let close = p.find('>')?;
        let param = p[..close].trim().to_string();
        let p = &p[close + 1..];
        let end = p.find("</parameter>")?;
        let raw = p[..end].strip_prefix('\n').unwrap_or(&p[..end]);
        let raw = raw.strip_suffix('\n').unwrap_or(raw);
        let value = match param_type(tools, &name, &param) {
            Some("string") => Value::String(raw.to_string()),
            _ => serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string())),
        };
        args.insert(param, value);
        rest = p[end + "</parameter>".len()..].trim_start();
    }
}
