//! A small JSON Schema checker for the OpenAPI document's subset, and its operations.
//!
//! Keywords it does not know make it fail loudly, so the document cannot
//! silently outgrow the checker.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use regex_automata::meta::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Mutex;

/// Keywords that constrain a value, and those that only annotate it.
const CHECKED: &[&str] = &[
    "$ref",
    "type",
    "const",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "anyOf",
    "oneOf",
    "allOf",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "format",
];
const ANNOTATIONS: &[&str] = &["description", "default", "examples", "title"];

pub struct Doc {
    pub root: Value,
    patterns: Mutex<HashMap<String, Regex>>,
}

impl Doc {
    pub fn new(root: Value) -> Self {
        Self {
            root,
            patterns: Mutex::new(HashMap::new()),
        }
    }

    /// Follows a local `$ref` (`#/a/b`).
    pub fn pointer(&self, reference: &str) -> &Value {
        let ptr = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references: {reference}"));
        self.root
            .pointer(ptr)
            .unwrap_or_else(|| panic!("dangling reference {reference}"))
    }

    /// `v`, or what its `$ref` points at (transitively).
    pub fn deref<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            v = self.pointer(r);
        }
        v
    }

    fn regex(&self, pattern: &str) -> bool {
        let mut cache = self.patterns.lock().unwrap();
        if !cache.contains_key(pattern) {
            let re = Regex::new(pattern)
                .unwrap_or_else(|e| panic!("pattern {pattern:?} does not compile: {e}"));
            cache.insert(pattern.to_string(), re);
        }
        true
    }

    fn matches(&self, pattern: &str, s: &str) -> bool {
        self.regex(pattern);
        self.patterns.lock().unwrap()[pattern].is_match(s)
    }

    /// Checks `value` against `schema`; the error names the first failing place.
    pub fn validate(&self, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
        let Some(obj) = schema.as_object() else {
            return match schema {
                Value::Bool(true) => Ok(()),
                Value::Bool(false) => Err(format!("{at}: nothing is allowed here")),
                _ => Err(format!("{at}: schema is not an object: {schema}")),
            };
        };
        for k in obj.keys() {
            assert!(
                CHECKED.contains(&k.as_str()) || ANNOTATIONS.contains(&k.as_str()),
                "schema keyword `{k}` at {at} is not supported by this checker"
            );
        }
        if let Some(r) = obj.get("$ref").and_then(Value::as_str) {
            self.validate(self.pointer(r), value, at)?;
        }
        if let Some(t) = obj.get("type") {
            let types: Vec<&str> = match t {
                Value::String(s) => vec![s.as_str()],
                Value::Array(a) => a.iter().map(|x| x.as_str().unwrap()).collect(),
                _ => panic!("bad type at {at}"),
            };
            if !types.iter().any(|t| type_matches(t, value)) {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        if let Some(c) = obj.get("const")
            && c != value
        {
            return Err(format!("{at}: {value} is not {c}"));
        }
        if let Some(e) = obj.get("enum").and_then(Value::as_array)
            && !e.contains(value)
        {
            return Err(format!("{at}: {value} is not one of {e:?}"));
        }
        if let Some(s) = value.as_str() {
            let chars = s.chars().count() as u64;
            if let Some(min) = obj.get("minLength").and_then(Value::as_u64)
                && chars < min
            {
                return Err(format!("{at}: {chars} characters, fewer than {min}"));
            }
            if let Some(max) = obj.get("maxLength").and_then(Value::as_u64)
                && chars > max
            {
                return Err(format!("{at}: {chars} characters, more than {max}"));
            }
            if let Some(p) = obj.get("pattern").and_then(Value::as_str)
                && !self.matches(p, s)
            {
                return Err(format!("{at}: {s:?} does not match {p}"));
            }
            if let Some(f) = obj.get("format").and_then(Value::as_str) {
                let ok = match f {
                    "uuid" => s.len() == 36 && uuid::Uuid::parse_str(s).is_ok(),
                    "date-time" => time::OffsetDateTime::parse(
                        s,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .is_ok(),
                    other => panic!("format `{other}` at {at} is not supported by this checker"),
                };
                if !ok {
                    return Err(format!("{at}: {s:?} is not a {f}"));
                }
            }
        }
        if let Some(n) = value.as_f64() {
            if let Some(min) = obj.get("minimum").and_then(Value::as_f64)
                && n < min
            {
                return Err(format!("{at}: {n} < {min}"));
            }
            if let Some(max) = obj.get("maximum").and_then(Value::as_f64)
                && n > max
            {
                return Err(format!("{at}: {n} > {max}"));
            }
        }
        if let Some(o) = value.as_object() {
            if let Some(req) = obj.get("required").and_then(Value::as_array) {
                for r in req {
                    let r = r.as_str().unwrap();
                    if !o.contains_key(r) {
                        return Err(format!("{at}: required `{r}` is missing"));
                    }
                }
            }
            let props = obj.get("properties").and_then(Value::as_object);
            for (k, v) in o {
                match props.and_then(|p| p.get(k)) {
                    Some(s) => self.validate(s, v, &format!("{at}.{k}"))?,
                    None => match obj.get("additionalProperties") {
                        Some(Value::Bool(false)) => {
                            return Err(format!("{at}: `{k}` is not a documented property"));
                        }
                        Some(s @ Value::Object(_)) => self.validate(s, v, &format!("{at}.{k}"))?,
                        _ => {}
                    },
                }
            }
        }
        if let (Some(items), Some(a)) = (obj.get("items"), value.as_array()) {
            for (i, v) in a.iter().enumerate() {
                self.validate(items, v, &format!("{at}[{i}]"))?;
            }
        }
        if let Some(all) = obj.get("allOf").and_then(Value::as_array) {
            for s in all {
                self.validate(s, value, at)?;
            }
        }
        if let Some(any) = obj.get("anyOf").and_then(Value::as_array)
            && !any.iter().any(|s| self.validate(s, value, at).is_ok())
        {
            return Err(format!("{at}: {value} matches none of anyOf"));
        }
        if let Some(one) = obj.get("oneOf").and_then(Value::as_array) {
            let n = one
                .iter()
                .filter(|s| self.validate(s, value, at).is_ok())
                .count();
            if n != 1 {
                return Err(format!("{at}: {value} matches {n} of oneOf"));
            }
        }
        Ok(())
    }

    /// The documented path template a concrete path belongs to, for `method`.
    pub fn template(&self, method: &str, path: &str) -> Option<String> {
        let segs: Vec<&str> = path.split('/').collect();
        let paths = self.root["paths"].as_object().unwrap();
        let mut best: Option<(usize, &String)> = None;
        for (tpl, ops) in paths {
            if ops.get(method.to_lowercase()).is_none() {
                continue;
            }
            let t: Vec<&str> = tpl.split('/').collect();
            if t.len() != segs.len() {
                continue;
            }
            let mut literal = 0;
            let fits = t.iter().zip(&segs).all(|(a, b)| {
                if a.starts_with('{') {
                    !b.is_empty()
                } else {
                    literal += 1;
                    a == b
                }
            });
            if fits && best.is_none_or(|(n, _)| literal > n) {
                best = Some((literal, tpl));
            }
        }
        best.map(|(_, t)| t.clone())
    }

    /// The operation object.
    pub fn operation(&self, method: &str, template: &str) -> &Value {
        &self.root["paths"][template][method.to_lowercase()]
    }

    /// The request body schema of an operation, dereferenced.
    pub fn request_schema(&self, method: &str, template: &str) -> Option<&Value> {
        let op = self.operation(method, template);
        op.get("requestBody")
            .map(|b| self.deref(&b["content"]["application/json"]["schema"]))
    }

    /// Checks one answer against the document: the status is documented,
    /// the content type is the documented one, the body fits its schema and
    /// required headers are present.
    pub fn check_response(
        &self,
        method: &str,
        template: &str,
        status: u16,
        content_type: Option<&str>,
        headers: &reqwest::header::HeaderMap,
        body: &[u8],
    ) -> Result<(), String> {
        let op = self.operation(method, template);
        let Some(resp) = op["responses"].get(status.to_string()) else {
            return Err(format!(
                "status {status} is not documented (documented: {:?})",
                op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .collect::<Vec<_>>()
            ));
        };
        let resp = self.deref(resp);
        if let Some(hs) = resp.get("headers").and_then(Value::as_object) {
            for (name, h) in hs {
                let h = self.deref(h);
                let present = headers.get(name.as_str());
                if h["required"] == true && present.is_none() {
                    return Err(format!("required header {name} missing"));
                }
                if let Some(v) = present {
                    let text = v.to_str().map_err(|e| e.to_string())?;
                    let as_json = text
                        .parse::<i64>()
                        .map(Value::from)
                        .unwrap_or_else(|_| Value::String(text.to_string()));
                    self.validate(&h["schema"], &as_json, &format!("header {name}"))?;
                }
            }
        }
        let Some(content) = resp.get("content").and_then(Value::as_object) else {
            return if body.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "documented without a body, got {} bytes",
                    body.len()
                ))
            };
        };
        let essence = |ct: &str| ct.split(';').next().unwrap().trim().to_ascii_lowercase();
        let got = content_type.map(essence).ok_or("no Content-Type")?;
        let Some((_, media)) = content.iter().find(|(k, _)| essence(k) == got) else {
            return Err(format!(
                "Content-Type {got} is not documented ({:?})",
                content.keys().collect::<Vec<_>>()
            ));
        };
        if media["schema"]["format"] == "binary" {
            // Binary bodies (DER): present, and not mistaken for JSON.
            return if body.is_empty() {
                Err("empty binary body".into())
            } else {
                Ok(())
            };
        }
        let value: Value = if got == "application/json" {
            serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?
        } else {
            Value::String(String::from_utf8(body.to_vec()).map_err(|e| e.to_string())?)
        };
        self.validate(&media["schema"], &value, "body")
    }
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        other => panic!("unknown type {other}"),
    }
}
