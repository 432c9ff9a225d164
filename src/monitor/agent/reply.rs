//! The envelope of a reply (`return` or `error`, bounded in size) and the walk through its JSON:
//! every array, string and number is checked against [`AgentLimits`] and the field's range, and a
//! failure names the command and the field's path (e.g. `return[3].stats.read-ios`).

use serde_json::{Map, Value};

use super::{AgentError, AgentLimits, Command};
use crate::monitor::base64;

// `field` strings are JSON-path-like and only built for error messages.

pub(super) struct Ctx<'a> {
    pub(super) command: Command,
    pub(super) limits: &'a AgentLimits,
}

pub(super) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

impl Ctx<'_> {
    pub(super) fn shape(&self, field: &str, expected: &'static str) -> AgentError {
        AgentError::Shape {
            command: self.command,
            field: field.to_owned(),
            expected,
        }
    }

    pub(super) fn object<'v>(
        &self,
        v: &'v Value,
        field: &str,
    ) -> Result<&'v Map<String, Value>, AgentError> {
        v.as_object().ok_or_else(|| self.shape(field, "an object"))
    }

    pub(super) fn array<'v>(&self, v: &'v Value, field: &str) -> Result<&'v [Value], AgentError> {
        let a = v.as_array().ok_or_else(|| self.shape(field, "an array"))?;
        if a.len() > self.limits.max_entries {
            return Err(AgentError::TooManyEntries {
                command: self.command,
                field: field.to_owned(),
                count: a.len(),
                max: self.limits.max_entries,
            });
        }
        Ok(a)
    }

    pub(super) fn required<'v>(
        &self,
        obj: &'v Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Result<&'v Value, AgentError> {
        obj.get(key).ok_or_else(|| AgentError::MissingField {
            command: self.command,
            field: join(parent, key),
        })
    }

    /// An integer in `[0, max]`; QAPI ints are int64, so `max` is at most `i64::MAX`.
    pub(super) fn uint(&self, v: &Value, field: &str, max: u64) -> Result<u64, AgentError> {
        let Value::Number(n) = v else {
            return Err(self.shape(field, "an integer"));
        };
        if let Some(u) = n.as_u64() {
            if u > max {
                return Err(AgentError::NumberOutOfRange {
                    command: self.command,
                    field: field.to_owned(),
                    value: u.to_string(),
                    max,
                });
            }
            return Ok(u);
        }
        if let Some(i) = n.as_i64() {
            return Err(AgentError::NegativeNumber {
                command: self.command,
                field: field.to_owned(),
                value: i,
            });
        }
        // A float: either written with a fraction/exponent, or an integer too large for u64.
        match n.as_f64() {
            Some(f) if f.abs() >= 9.2e18 => Err(AgentError::NumberOutOfRange {
                command: self.command,
                field: field.to_owned(),
                value: n.to_string(),
                max,
            }),
            _ => Err(self.shape(field, "an integer")),
        }
    }

    pub(super) fn counter(&self, v: &Value, field: &str) -> Result<u64, AgentError> {
        self.uint(v, field, i64::MAX as u64)
    }

    /// A signed integer in `[min, max]`.
    pub(super) fn int(
        &self,
        v: &Value,
        field: &str,
        min: i64,
        max: i64,
    ) -> Result<i64, AgentError> {
        let Value::Number(n) = v else {
            return Err(self.shape(field, "an integer"));
        };
        match n.as_i64() {
            Some(i) if (min..=max).contains(&i) => Ok(i),
            _ if n.is_f64() && n.as_f64().is_some_and(|f| f.abs() < 9.2e18) => {
                Err(self.shape(field, "an integer"))
            }
            _ => Err(AgentError::NumberOutOfRange {
                command: self.command,
                field: field.to_owned(),
                value: n.to_string(),
                max: max.unsigned_abs(),
            }),
        }
    }

    pub(super) fn string(&self, v: &Value, field: &str) -> Result<String, AgentError> {
        let s = v.as_str().ok_or_else(|| self.shape(field, "a string"))?;
        self.bounded(s, field, self.limits.max_string_len)?;
        Ok(s.to_owned())
    }

    fn bounded(&self, s: &str, field: &str, max: usize) -> Result<(), AgentError> {
        if s.len() > max {
            return Err(AgentError::StringTooLong {
                command: self.command,
                field: field.to_owned(),
                len: s.len(),
                max,
            });
        }
        Ok(())
    }

    pub(super) fn boolean(&self, v: &Value, field: &str) -> Result<bool, AgentError> {
        v.as_bool().ok_or_else(|| self.shape(field, "a boolean"))
    }

    pub(super) fn opt_counter(
        &self,
        obj: &Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Result<Option<u64>, AgentError> {
        obj.get(key)
            .map(|v| self.counter(v, &join(parent, key)))
            .transpose()
    }

    pub(super) fn opt_string(
        &self,
        obj: &Map<String, Value>,
        parent: &str,
        key: &str,
    ) -> Result<Option<String>, AgentError> {
        obj.get(key)
            .map(|v| self.string(v, &join(parent, key)))
            .transpose()
    }

    pub(super) fn invalid(&self, field: &str, value: &str, expected: &'static str) -> AgentError {
        AgentError::InvalidValue {
            command: self.command,
            field: field.to_owned(),
            value: cut(value, 64),
            expected,
        }
    }

    /// Decodes a base64 field whose encoded length was already bounded by the reply size.
    pub(super) fn base64(&self, v: &Value, field: &str) -> Result<Vec<u8>, AgentError> {
        let s = v
            .as_str()
            .ok_or_else(|| self.shape(field, "a base64 string"))?;
        base64::decode(s).map_err(|source| AgentError::Base64 {
            command: self.command,
            field: field.to_owned(),
            source,
        })
    }
}

/// Checks the envelope of a reply and returns its `return` value.
///
/// Rejects oversized text before parsing, invalid JSON, `{"error": ...}` replies (as
/// [`AgentError::Guest`]) and anything that is neither.
pub fn parse_reply(
    command: Command,
    text: &str,
    limits: &AgentLimits,
) -> Result<Value, AgentError> {
    if text.len() > limits.max_reply_bytes {
        return Err(AgentError::ReplyTooLarge {
            command,
            len: text.len(),
            max: limits.max_reply_bytes,
        });
    }
    let value: Value =
        serde_json::from_str(text).map_err(|source| AgentError::InvalidJson { command, source })?;
    let ctx = Ctx { command, limits };
    let Value::Object(mut obj) = value else {
        return Err(ctx.shape("<reply>", "an object with `return` or `error`"));
    };
    if let Some(err) = obj.get("error") {
        let e = ctx.object(err, "error")?;
        let class = match e.get("class") {
            Some(v) => ctx.string(v, "error.class")?,
            None => "<no class>".to_owned(),
        };
        let desc = match e.get("desc") {
            Some(v) => ctx.string(v, "error.desc")?,
            None => String::new(),
        };
        return Err(AgentError::Guest {
            command,
            class,
            desc,
        });
    }
    obj.remove("return")
        .ok_or_else(|| ctx.shape("<reply>", "an object with `return` or `error`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::agent::test_support::{fixture, limits};
    use crate::monitor::agent::{
        parse_cpustats, parse_diskstats, parse_exec_status, parse_interfaces, parse_osinfo,
        parse_ping,
    };

    #[test]
    fn guest_error_reply() {
        let d = tempfile::tempdir().unwrap();
        let e = parse_cpustats(&fixture(d.path(), "error-command-disabled.json"), &limits())
            .unwrap_err();
        match e {
            AgentError::Guest {
                command,
                class,
                desc,
            } => {
                assert_eq!(command, Command::CpuStats);
                assert_eq!(class, "GenericError");
                assert!(desc.contains("disabled"));
            }
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn malformed_replies_are_rejected_with_named_errors() {
        let d = tempfile::tempdir().unwrap();
        let l = limits();
        let e = parse_interfaces(&fixture(d.path(), "truncated.json"), &l).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::InvalidJson {
                    command: Command::NetworkInterfaces,
                    ..
                }
            ),
            "{e}"
        );

        let e = parse_cpustats(&fixture(d.path(), "cpustats-negative.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::NegativeNumber { field, value: -5, .. } if field == "return[0].idle"),
            "{e}"
        );
        assert!(e.to_string().contains("guest-get-cpustats"));

        let e = parse_cpustats(&fixture(d.path(), "cpustats-huge.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::NumberOutOfRange { field, .. } if field == "return[0].user"),
            "{e}"
        );

        let e = parse_cpustats(&fixture(d.path(), "cpustats-wrong-shape.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::Shape { field, .. } if field == "return"),
            "{e}"
        );

        let e = parse_diskstats(&fixture(d.path(), "diskstats-missing-name.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::MissingField { field, .. } if field == "return[0].name"),
            "{e}"
        );

        let e = parse_interfaces(&fixture(d.path(), "interfaces-bad-ip.json"), &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::InvalidValue { field, .. } if field == "return[0].ip-addresses[0].ip-address"),
            "{e}"
        );

        let e = parse_exec_status(&fixture(d.path(), "exec-status-bad-base64.json"), &l, 1024)
            .unwrap_err();
        assert!(
            matches!(&e, AgentError::Base64 { field, .. } if field == "return.out-data"),
            "{e}"
        );

        let e = parse_ping("[]", &l).unwrap_err();
        assert!(
            matches!(&e, AgentError::Shape { field, .. } if field == "<reply>"),
            "{e}"
        );
        let e = parse_ping(r#"{"id": 1}"#, &l).unwrap_err();
        assert!(matches!(e, AgentError::Shape { .. }), "{e}");
        let e = parse_cpustats(
            r#"{"return":[{"type":"linux","cpu":0,"user":1.5,"nice":0,"system":0,"idle":0}]}"#,
            &l,
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::Shape {
                    expected: "an integer",
                    ..
                }
            ),
            "{e}"
        );
        let e = parse_cpustats(r#"{"return":[{"type":"windows","cpu":0}]}"#, &l).unwrap_err();
        assert!(matches!(e, AgentError::InvalidValue { .. }), "{e}");
        let e = parse_interfaces(r#"{"return":[{"name":"eth0","ip-addresses":[{"ip-address-type":"ipv4","ip-address":"10.0.0.1","prefix":33}]}]}"#, &l).unwrap_err();
        assert!(
            matches!(e, AgentError::NumberOutOfRange { max: 32, .. }),
            "{e}"
        );
        let e = parse_interfaces(r#"{"return":[{"name":"eth0","ip-addresses":[{"ip-address-type":"ipv6","ip-address":"10.0.0.1","prefix":8}]}]}"#, &l).unwrap_err();
        assert!(matches!(e, AgentError::InvalidValue { .. }), "{e}");
        let e = parse_exec_status(
            r#"{"return":{"exited":true,"exitcode":4294967296}}"#,
            &l,
            10,
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::NumberOutOfRange { .. }), "{e}");
    }

    #[test]
    fn bounds_are_enforced() {
        let d = tempfile::tempdir().unwrap();
        let text = fixture(d.path(), "cpustats.json");
        let small = AgentLimits {
            max_reply_bytes: 64,
            ..limits()
        };
        let e = parse_cpustats(&text, &small).unwrap_err();
        assert!(
            matches!(e, AgentError::ReplyTooLarge { max: 64, .. }),
            "{e}"
        );

        // 300 interfaces with the default cap of 256.
        let one = r#"{"name":"eth0"}"#;
        let many = format!(r#"{{"return":[{}]}}"#, vec![one; 300].join(","));
        let e = parse_interfaces(&many, &limits()).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::TooManyEntries {
                    count: 300,
                    max: 256,
                    ..
                }
            ),
            "{e}"
        );

        let long = format!(r#"{{"return":{{"id":"{}"}}}}"#, "x".repeat(5000));
        let e = parse_osinfo(&long, &limits()).unwrap_err();
        assert!(
            matches!(&e, AgentError::StringTooLong { field, len: 5000, .. } if field == "return.id"),
            "{e}"
        );

        let e = parse_ping(
            &fixture(d.path(), "oversized.json"),
            &AgentLimits {
                max_reply_bytes: 1024,
                ..limits()
            },
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::ReplyTooLarge { .. }), "{e}");
    }
}
