//! Chat templates (Jinja, as Hugging Face renders them) through minijinja:
//! trim_blocks and lstrip_blocks on, Python string methods, `raise_exception`,
//! `strftime_now`, `tojson`.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(pub String);

pub struct ChatTemplate {
    env: Environment<'static>,
}

/// What a template is rendered with.
#[derive(Serialize, Default)]
pub struct TemplateInput<'a> {
    pub messages: &'a serde_json::Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<&'a serde_json::Value>,
    pub add_generation_prompt: bool,
    pub bos_token: &'a str,
    pub eos_token: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_thinking: Option<bool>,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(format: String) -> String {
    // Format the current UTC time with the Python strftime codes templates use.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = (now / 86_400) as i64;
    let (y, m, d) = civil_from_days(days);
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Thursday", "Friday", "Saturday", "Sunday", "Monday", "Tuesday", "Wednesday"];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[days.rem_euclid(7) as usize]),
            Some('H') => out.push_str(&format!("{:02}", now / 3600 % 24)),
            Some('M') => out.push_str(&format!("{:02}", now / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", now % 60)),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

/// (year, month, day) of days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `json.dumps(value, ensure_ascii=False, indent=indent)`, as Hugging Face's
/// `tojson` filter writes it: `", "` and `": "` separators (or newlines and
/// `","` with an indent), key order kept, no HTML escaping.
pub fn python_json(value: &serde_json::Value, indent: Option<usize>) -> String {
    fn newline(out: &mut String, indent: Option<usize>, depth: usize) {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    }
    fn write(out: &mut String, v: &serde_json::Value, indent: Option<usize>, depth: usize) {
        use serde_json::Value as J;
        let sep = if indent.is_some() { "," } else { ", " };
        match v {
            J::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    newline(out, indent, depth + 1);
                    write(out, item, indent, depth + 1);
                }
                newline(out, indent, depth);
                out.push(']');
            }
            J::Object(map) if !map.is_empty() => {
                out.push('{');
                for (i, (k, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    newline(out, indent, depth + 1);
                    out.push_str(&J::String(k.clone()).to_string());
                    out.push_str(": ");
                    write(out, item, indent, depth + 1);
                }
                newline(out, indent, depth);
                out.push('}');
            }
            // Scalars and empty containers: serde_json writes them as Python does.
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(&mut out, value, indent, 0);
    out
}

fn tojson(value: Value, kwargs: minijinja::value::Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    // Accepted as Hugging Face does; ensure_ascii=False is the only mode.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(python_json(&json, indent)))
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, TemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string()).map_err(|e| TemplateError(e.to_string()))?;
        Ok(ChatTemplate { env })
    }

    pub fn render(&self, input: &TemplateInput) -> Result<String, TemplateError> {
        let t = self.env.get_template("chat").map_err(|e| TemplateError(e.to_string()))?;
        t.render(Value::from_serialize(input)).map_err(|e| {
            let mut msg = e.to_string();
            if let Some(detail) = e.detail() {
                if !msg.contains(detail) {
                    msg = format!("{msg}: {detail}");
                }
            }
            TemplateError(msg)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let v = serde_json::json!({"b": [1, 2.5, "é<&>"], "a": {}, "c": [], "d": null, "e": "tab\tquote\""});
        assert_eq!(python_json(&v, None), r#"{"b": [1, 2.5, "é<&>"], "a": {}, "c": [], "d": null, "e": "tab\tquote\""}"#);
        assert_eq!(python_json(&serde_json::json!({"k": [1, {}]}), Some(2)), "{\n  \"k\": [\n    1,\n    {}\n  ]\n}");
        let t = ChatTemplate::new("{{ x | tojson }}|{{ x | tojson(indent=1) }}").unwrap();
        let x = serde_json::json!({"z": 1, "a": [true]});
        let ctx = serde_json::json!({"x": x});
        let env = &t.env;
        let out = env.get_template("chat").unwrap().render(&ctx).unwrap();
        assert_eq!(out, "{\"z\": 1, \"a\": [true]}|{\n \"z\": 1,\n \"a\": [\n  true\n ]\n}");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_818), (2026, 12, 31));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn raise_exception_is_an_error_with_the_message() {
        let t = ChatTemplate::new("{{ raise_exception('no system role') }}").unwrap();
        let m = serde_json::json!([]);
        let err = t.render(&TemplateInput { messages: &m, ..Default::default() }).unwrap_err();
        assert!(err.0.contains("no system role"), "{}", err.0);
    }

    #[test]
    fn python_methods_and_trim_blocks() {
        let src = "{% for m in messages %}\n{{ m.role.upper() }}:{{ m.content.strip() }}|{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        let m = serde_json::json!([{"role": "user", "content": "  hi  "}]);
        assert_eq!(t.render(&TemplateInput { messages: &m, ..Default::default() }).unwrap(), "USER:hi|");
    }
}
