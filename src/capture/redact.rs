//! Redaction of recorded exchanges, applied before anything is stored: configured header
//! values, query parameters, form fields and JSON keys, and patterns anywhere.

use regex::bytes::Regex;

use super::{Body, CaptureError, Exchange, HttpRequest, HttpResponse};
use crate::config::CaptureConfig;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[redacted]";

/// Bound on a compiled pattern's size.
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// A JSON value in text that may be cut: a string up to its closing quote or the end of the
/// text, or a bare value (without a quote, so that replacing it with a whole string leaves
/// the strings after it as they were).
const JSON_VALUE: &str = r#"(?:"(?:[^"\\]|\\.)*"?|[^,}\]\s"]+)"#;

/// What finds the fields' values in JSON text that does not parse.
#[derive(Debug, Clone)]
struct CutJson {
    /// `"name": value` for each field as configured (any case).
    named: Regex,
    /// `"key": value` for any key: group 2 is the key as written.
    keys: Regex,
}

/// The redaction rules of one class.
#[derive(Debug, Clone)]
pub struct Redactor {
    headers: Vec<String>,
    fields: Vec<String>,
    /// The fields' values in JSON text that does not parse (a body cut at the body bound).
    cut_json: Option<CutJson>,
    patterns: Vec<Regex>,
}

impl Redactor {
    /// Rules from a class's capture settings.
    pub fn new(cfg: &CaptureConfig) -> Result<Self, CaptureError> {
        let patterns = cfg
            .redact_patterns
            .iter()
            .map(|p| {
                regex::bytes::RegexBuilder::new(p)
                    .size_limit(PATTERN_SIZE_LIMIT)
                    .build()
                    .map_err(|source| CaptureError::Pattern {
                        pattern: p.clone(),
                        source,
                    })
            })
            .collect::<Result<_, _>>()?;
        let cut_json = if cfg.redact_fields.is_empty() {
            None
        } else {
            let names: Vec<String> = cfg.redact_fields.iter().map(|f| regex::escape(f)).collect();
            let compile = |pattern: String| {
                regex::bytes::RegexBuilder::new(&pattern)
                    .size_limit(PATTERN_SIZE_LIMIT)
                    .build()
                    .map_err(|source| CaptureError::Pattern { pattern, source })
            };
            Some(CutJson {
                named: compile(format!(
                    r#"("(?i:{})"\s*:\s*){JSON_VALUE}"#,
                    names.join("|")
                ))?,
                keys: compile(format!(r#"("((?:[^"\\]|\\.)*)"\s*:\s*){JSON_VALUE}"#))?,
            })
        };
        Ok(Self {
            cut_json,
            headers: cfg
                .redact_headers
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            fields: cfg.redact_fields.clone(),
            patterns,
        })
    }

    /// Redacts an exchange in place.
    pub fn apply(&self, ex: &mut Exchange) {
        match ex {
            Exchange::Http { request, response } => {
                self.request(request);
                if let Some(r) = response {
                    self.response(r);
                }
            }
            Exchange::Stream {
                to_server,
                to_client,
            } => {
                self.body(to_server);
                self.body(to_client);
            }
        }
    }

    fn request(&self, r: &mut HttpRequest) {
        r.target = self.text(&self.target(&r.target));
        self.headers(&mut r.headers);
        self.body(&mut r.body);
    }

    fn response(&self, r: &mut HttpResponse) {
        self.headers(&mut r.headers);
        self.body(&mut r.body);
    }

    fn headers(&self, headers: &mut [(String, String)]) {
        for (n, v) in headers.iter_mut() {
            if self.headers.contains(&n.to_ascii_lowercase()) {
                *v = REDACTED.to_string();
            } else {
                *v = self.text(v);
            }
        }
    }

    /// A path with the configured query parameters' values replaced.
    fn target(&self, target: &str) -> String {
        match target.split_once('?') {
            Some((path, query)) => format!("{path}?{}", self.form(query)),
            None => target.to_string(),
        }
    }

    /// `a=1&b=2` with the configured fields' values replaced.
    fn form(&self, query: &str) -> String {
        query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if self.field(k) => format!("{k}={REDACTED}"),
                _ => kv.to_string(),
            })
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Whether a query or form field named `name` (percent-encoded, as sent) is configured.
    fn field(&self, name: &str) -> bool {
        let name = name.replace('+', " ");
        let name = percent_encoding::percent_decode_str(&name).decode_utf8_lossy();
        self.fields.iter().any(|f| f.eq_ignore_ascii_case(&name))
    }

    /// Redacts a body whatever its declared type says (a client may declare none, two, or
    /// the wrong one): JSON keys at any depth in a body that parses as JSON; otherwise form
    /// fields in a text body and, in a body cut at the body bound, `"field": value` pairs of
    /// the JSON it was; then the patterns.
    fn body(&self, body: &mut Body) {
        if self.fields.is_empty() && self.patterns.is_empty() {
            return;
        }
        let mut bytes = body.bytes();
        if !self.fields.is_empty() {
            match serde_json::from_slice::<serde_json::Value>(&bytes) {
                // Rewritten only when something was replaced: the rest keeps its bytes.
                Ok(mut v) => {
                    if self.json(&mut v, 0) {
                        bytes = v.to_string().into_bytes();
                    }
                }
                Err(_) => {
                    if let Ok(text) = std::str::from_utf8(&bytes) {
                        bytes = self.form(text).into_bytes();
                    }
                    if let Some(cut) = &self.cut_json {
                        bytes = self.cut_json(cut, &bytes);
                    }
                }
            }
        }
        for p in &self.patterns {
            bytes = p.replace_all(&bytes, REDACTED.as_bytes()).into_owned();
        }
        *body = Body::new(&bytes, body.truncated);
    }

    /// The configured fields' values replaced in JSON text that does not parse: first every
    /// `"name": value` written as configured, wherever it stands (inside a string too: more
    /// is replaced rather than less); then, taking the text's strings from its start, every
    /// value whose key names a field once its escapes are decoded (`"pass\u0077ord"`).
    fn cut_json(&self, cut: &CutJson, bytes: &[u8]) -> Vec<u8> {
        let quoted = format!("${{1}}\"{REDACTED}\"");
        let named = cut.named.replace_all(bytes, quoted.as_bytes());
        cut.keys
            .replace_all(&named, |c: &regex::bytes::Captures<'_>| {
                let key = serde_json::from_slice::<String>(&c[0][..c[2].len() + 2]);
                match key {
                    Ok(k) if self.field(&k) => [&c[1], b"\"", REDACTED.as_bytes(), b"\""].concat(),
                    _ => c[0].to_vec(),
                }
            })
            .into_owned()
    }

    /// Replaces the configured keys' values at any depth (bounded); whether it replaced any.
    fn json(&self, v: &mut serde_json::Value, depth: usize) -> bool {
        // Deeper than anything searched: kept out rather than kept unread.
        if depth > 64 {
            *v = serde_json::Value::String(REDACTED.into());
            return true;
        }
        match v {
            serde_json::Value::Object(m) => {
                let mut replaced = false;
                for (k, x) in m.iter_mut() {
                    if self.field(k) {
                        *x = serde_json::Value::String(REDACTED.into());
                        replaced = true;
                    } else {
                        replaced |= self.json(x, depth + 1);
                    }
                }
                replaced
            }
            serde_json::Value::Array(a) => a
                .iter_mut()
                .fold(false, |replaced, x| self.json(x, depth + 1) | replaced),
            _ => false,
        }
    }

    fn text(&self, s: &str) -> String {
        let mut b = s.as_bytes().to_vec();
        for p in &self.patterns {
            b = p.replace_all(&b, REDACTED.as_bytes()).into_owned();
        }
        String::from_utf8_lossy(&b).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor() -> Redactor {
        Redactor::new(&CaptureConfig {
            redact_fields: vec!["token".into(), "password".into()],
            redact_patterns: vec![r"\b\d{4}-\d{4}-\d{4}-\d{4}\b".into()],
            ..CaptureConfig::default()
        })
        .unwrap()
    }

    fn post(target: &str, ctype: &str, body: &[u8]) -> Exchange {
        Exchange::Http {
            request: HttpRequest {
                method: "POST".into(),
                target: target.into(),
                version: 1,
                headers: vec![("Content-Type".into(), ctype.into())],
                body: Body::new(body, 0),
            },
            response: None,
        }
    }

    /// The body of a POST of `body` as `ctype` once `r` has redacted it.
    fn redacted_body(r: &Redactor, ctype: &str, body: &[u8]) -> String {
        let mut ex = post("/", ctype, body);
        r.apply(&mut ex);
        let Exchange::Http { request, .. } = ex else {
            unreachable!()
        };
        request.body.data
    }

    #[test]
    fn fields_are_found_percent_encoded_and_in_json_cut_at_the_body_bound() {
        let mut ex = post(
            "/login?t%6Fken=s3cret&pass+word=x",
            "application/json",
            br#"{"user":"al", "Password" : "hunter2", "token":12345, "next":"#,
        );
        let r = Redactor::new(&CaptureConfig {
            redact_fields: vec!["token".into(), "pass word".into(), "password".into()],
            ..CaptureConfig::default()
        })
        .unwrap();
        r.apply(&mut ex);
        let Exchange::Http { request, .. } = &ex else {
            unreachable!()
        };
        assert_eq!(
            request.target,
            "/login?t%6Fken=[redacted]&pass+word=[redacted]"
        );
        assert_eq!(
            request.body.data,
            r#"{"user":"al", "Password" : "[redacted]", "token":"[redacted]", "next":"#
        );
        // A string cut inside its value.
        assert_eq!(
            redacted_body(&r, "application/json", br#"{"password":"hun"#),
            r#"{"password":"[redacted]""#
        );
    }

    #[test]
    fn bodies_are_redacted_whatever_their_declared_type() {
        // Found by the capture fuzz target: a JSON body declared as a form (or under two
        // Content-Type headers, the first not JSON) kept its password.
        let r = Redactor::new(&CaptureConfig {
            redact_fields: vec!["password".into()],
            ..CaptureConfig::default()
        })
        .unwrap();
        for (ctype, body, want) in [
            (
                "application/x-www-form-urlencoded",
                r#"{"user":"al","password":"hunter22"}"#,
                r#"{"password":"[redacted]","user":"al"}"#,
            ),
            (
                "text/plain",
                "user=al&password=hunter22",
                "user=al&password=[redacted]",
            ),
            ("", r#"x "password": "hun"#, r#"x "password": "[redacted]""#),
            // Nothing to redact: the bytes stay as they were.
            (
                "application/json",
                "{ \"user\": \"al\" }",
                "{ \"user\": \"al\" }",
            ),
        ] {
            assert_eq!(
                redacted_body(&r, ctype, body.as_bytes()),
                want,
                "{ctype}: {body}"
            );
        }
    }

    #[test]
    fn json_keys_are_read_as_json_reads_them() {
        let r = Redactor::new(&CaptureConfig {
            redact_fields: vec!["password".into(), "token".into()],
            ..CaptureConfig::default()
        })
        .unwrap();
        for (body, want) in [
            // Found by the capture fuzz target: `password` after an escaped quote is part of
            // another key, which JSON that parses keeps.
            (
                r#"{"u\\\\\\i\\\"password":"hunter22"}"#,
                r#"{"u\\\\\\i\\\"password":"hunter22"}"#,
            ),
            // Cut JSON is read from its start: a key whose escapes decode to a field.
            (
                r#"{"pass\u0077ord":"hun"#,
                r#"{"pass\u0077ord":"[redacted]""#,
            ),
            (
                r#"{"a":"x", "t\u006Fken" : 12, "b":"#,
                r#"{"a":"x", "t\u006Fken" : "[redacted]", "b":"#,
            ),
            // A field written as configured is replaced wherever it stands in cut JSON, even
            // inside another string: more rather than less.
            (
                r#"{"note":"x\"password\": \"hun"#,
                r#"{"note":"x\"password\": \"hun"#,
            ),
            (r#"{"u\"password": "hun"#, r#"{"u\"password": "[redacted]""#),
        ] {
            assert_eq!(
                redacted_body(&r, "application/json", body.as_bytes()),
                want,
                "{body}"
            );
        }
    }

    #[test]
    fn headers_fields_json_and_patterns_are_replaced() {
        let mut ex = Exchange::Http {
            request: HttpRequest {
                method: "POST".into(),
                target: "/login?user=al&token=s3cret&x=1".into(),
                version: 1,
                headers: vec![
                    ("Authorization".into(), "Bearer abc".into()),
                    (
                        "Content-Type".into(),
                        "application/x-www-form-urlencoded".into(),
                    ),
                ],
                body: Body::new(b"user=al&password=hunter2", 0),
            },
            response: Some(HttpResponse {
                status: 200,
                headers: vec![
                    ("Set-Cookie".into(), "sid=zzz".into()),
                    ("Content-Type".into(), "application/json".into()),
                ],
                body: Body::new(br#"{"a":{"token":"t0k"},"card":"1234-5678-9012-3456"}"#, 0),
            }),
        };
        redactor().apply(&mut ex);
        let text = serde_json::to_string(&ex).unwrap();
        for secret in ["s3cret", "Bearer abc", "hunter2", "zzz", "t0k", "1234-5678"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("user=al"));
        assert!(text.contains("/login?user=al&token=[redacted]&x=1"));
    }

    #[test]
    fn invalid_pattern_is_an_error_naming_it() {
        let e = Redactor::new(&CaptureConfig {
            redact_patterns: vec!["(".into()],
            ..CaptureConfig::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("\"(\""));
    }
}
