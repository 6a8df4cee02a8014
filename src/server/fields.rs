//! Reading request JSON field by field, so every bad input gets an error
//! naming the field and what was expected.

use serde_json::{Map, Value};

use super::error::ApiError;

/// A JSON type's name as error messages say it.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong(path: &str, want: &str, got: &Value) -> ApiError {
    ApiError::invalid(path, format!("{path}: expected {want}, got {}", type_name(got)))
}

/// The body as a JSON object.
pub fn body_object(v: &Value) -> Result<&Map<String, Value>, ApiError> {
    v.as_object().ok_or_else(|| ApiError::invalid("body", format!("request body: expected a JSON object, got {}", type_name(v))))
}

pub struct Fields<'a> {
    pub map: &'a Map<String, Value>,
    pub path: String,
}

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>, path: impl Into<String>) -> Self {
        Fields { map, path: path.into() }
    }

    pub fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// A field that is present and not null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub fn required(&self, key: &str) -> Result<&'a Value, ApiError> {
        self.get(key).ok_or_else(|| ApiError::invalid(self.at(key), format!("{}: field required", self.at(key))))
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(wrong(&self.at(key), "a string", v)),
        }
    }

    pub fn req_str(&self, key: &str) -> Result<&'a str, ApiError> {
        self.str(key)?.ok_or_else(|| ApiError::invalid(self.at(key), format!("{}: field required", self.at(key))))
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong(&self.at(key), "a boolean", v)),
        }
    }

    /// A number within `[min, max]`.
    pub fn f64_in(&self, key: &str, min: f64, max: f64) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(min..=max).contains(&x) {
                    return Err(ApiError::invalid(self.at(key), format!("{}: {x} is out of range [{min}, {max}]", self.at(key))));
                }
                Ok(Some(x))
            }
            Some(v) => Err(wrong(&self.at(key), "a number", v)),
        }
    }

    /// An integer within `[min, max]`.
    pub fn int_in(&self, key: &str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_i64().ok_or_else(|| ApiError::invalid(self.at(key), format!("{}: expected an integer, got {n}", self.at(key))))?;
                if !(min..=max).contains(&x) {
                    return Err(ApiError::invalid(
                        self.at(key),
                        format!("{}: {x} is out of range: it must be between {min} and {max}", self.at(key)),
                    ));
                }
                Ok(Some(x))
            }
            Some(v) => Err(wrong(&self.at(key), "an integer", v)),
        }
    }

    pub fn array(&self, key: &str) -> Result<Option<&'a Vec<Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(wrong(&self.at(key), "an array", v)),
        }
    }

    pub fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(o)) => Ok(Some(o)),
            Some(v) => Err(wrong(&self.at(key), "an object", v)),
        }
    }

    /// A string or an array of strings (stop sequences).
    pub fn strings(&self, key: &str) -> Result<Vec<String>, ApiError> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| v.as_str().map(str::to_string).ok_or_else(|| wrong(&format!("{}[{i}]", self.at(key)), "a string", v)))
                .collect(),
            Some(v) => Err(wrong(&self.at(key), "a string or an array of strings", v)),
        }
    }

    /// Stop strings: at most [`MAX_STOPS`], each at most [`MAX_STOP_BYTES`]
    /// bytes (the caps OpenAI documents; Anthropic's API gets the same).
    pub fn stop_strings(&self, key: &str) -> Result<Vec<String>, ApiError> {
        let stops = self.strings(key)?;
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(self.at(key), format!("{}: {} sequences given; at most {MAX_STOPS}", self.at(key), stops.len())));
        }
        if let Some((i, s)) = stops.iter().enumerate().find(|(_, s)| s.len() > MAX_STOP_BYTES) {
            let at = format!("{}[{i}]", self.at(key));
            return Err(ApiError::invalid(at.clone(), format!("{at}: {} bytes; at most {MAX_STOP_BYTES}", s.len())));
        }
        Ok(stops)
    }
}

/// Most stop strings one request may give.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Element `i` of array field `path` as an object.
pub fn item<'a>(v: &'a Value, path: &str, i: usize) -> Result<Fields<'a>, ApiError> {
    let p = format!("{path}[{i}]");
    match v {
        Value::Object(o) => Ok(Fields::new(o, p)),
        other => Err(wrong(&p, "an object", other)),
    }
}
