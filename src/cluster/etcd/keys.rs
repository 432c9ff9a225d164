//! Where each record lives in etcd. Everything is under one prefix (`/understudy/<cluster>` by
//! default), one segment per name:
//!
//! | key | value | lease |
//! |---|---|---|
//! | `<p>/hosts/<host>` | [`HostFacts`](crate::cluster::HostFacts), last known | none |
//! | `<p>/alive/<host>` | the same facts | the host's |
//! | `<p>/drain/<host>` | [`DrainFlag`](super::codec::DrainFlag) | none |
//! | `<p>/owners/<service>` | [`OwnerRecord`](crate::cluster::OwnerRecord) | none |
//! | `<p>/specs/<service>` | [`PrimarySpec`](crate::cluster::PrimarySpec) | none |
//! | `<p>/shadows/<service>/<host>/<shadow>` | [`ShadowRecord`](crate::cluster::ShadowRecord) | the host's |
//! | `<p>/failures/<service>` | [`FailureReport`](crate::cluster::FailureReport) | none |
//! | `<p>/profiles/<service>/v<20 digits>` | a profile version | none |
//!
//! Profile version numbers are zero-padded so that key order is number order.

use crate::cluster::{check_name, CoordError, HostId};

/// Longest accepted key prefix.
pub const MAX_PREFIX_BYTES: usize = 512;

/// The key layout under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// Ends with `/`.
    root: String,
}

/// What a key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOf {
    /// A host's last known facts.
    Host(HostId),
    /// A host's liveness (leased).
    Alive(HostId),
    /// A host's drain flag.
    Drain(HostId),
    /// A service's owner record.
    Owner(String),
    /// A service's primary spec.
    Spec(String),
    /// A shadow registration.
    Shadow {
        /// The service.
        service: String,
        /// The host running it.
        host: HostId,
        /// The shadow's domain name.
        shadow: String,
    },
    /// A service's failure report.
    Failure(String),
    /// A profile version.
    Profile {
        /// The service.
        service: String,
        /// The version number.
        version: u64,
    },
}

/// Checks a key prefix: absolute, no empty or relative segment, no trailing `/`, printable.
pub fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if !prefix.starts_with('/') {
        return Err("must start with '/'");
    }
    if prefix.len() > MAX_PREFIX_BYTES {
        return Err("longer than 512 bytes");
    }
    if prefix.len() > 1 && prefix.ends_with('/') {
        return Err("must not end with '/'");
    }
    if prefix.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if prefix
        .split('/')
        .skip(1)
        .any(|s| s.is_empty() || s == "." || s == "..")
        && prefix != "/"
    {
        return Err("has an empty, '.' or '..' segment");
    }
    Ok(())
}

impl Keys {
    /// The layout under `prefix` (checked with [`check_prefix`]).
    pub fn new(prefix: &str) -> Result<Self, CoordError> {
        check_prefix(prefix).map_err(|why| CoordError::InvalidName {
            what: "key prefix",
            name: prefix.to_string(),
            why,
        })?;
        let root = if prefix == "/" {
            "/".to_string()
        } else {
            format!("{prefix}/")
        };
        Ok(Keys { root })
    }

    /// Every key of the cluster starts with this (it ends with `/`).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The prefix of every key of one kind (`hosts`, `alive`, ...), ending with `/`.
    pub fn kind(&self, kind: &str) -> String {
        format!("{}{kind}/", self.root)
    }

    fn one(&self, kind: &str, what: &'static str, name: &str) -> Result<String, CoordError> {
        check_name(what, name)?;
        Ok(format!("{}{kind}/{name}", self.root))
    }

    /// `<p>/hosts/<host>`.
    pub fn host(&self, host: &HostId) -> Result<String, CoordError> {
        self.one("hosts", "host", &host.0)
    }

    /// `<p>/alive/<host>`.
    pub fn alive(&self, host: &HostId) -> Result<String, CoordError> {
        self.one("alive", "host", &host.0)
    }

    /// `<p>/drain/<host>`.
    pub fn drain(&self, host: &HostId) -> Result<String, CoordError> {
        self.one("drain", "host", &host.0)
    }

    /// `<p>/owners/<service>`.
    pub fn owner(&self, service: &str) -> Result<String, CoordError> {
        self.one("owners", "service", service)
    }

    /// `<p>/specs/<service>`.
    pub fn spec(&self, service: &str) -> Result<String, CoordError> {
        self.one("specs", "service", service)
    }

    /// `<p>/failures/<service>`.
    pub fn failure(&self, service: &str) -> Result<String, CoordError> {
        self.one("failures", "service", service)
    }

    /// `<p>/shadows/<service>/<host>/<shadow>`.
    pub fn shadow(&self, service: &str, host: &HostId, shadow: &str) -> Result<String, CoordError> {
        check_name("service", service)?;
        check_name("host", &host.0)?;
        check_name("domain", shadow)?;
        Ok(format!("{}shadows/{service}/{host}/{shadow}", self.root))
    }

    /// `<p>/profiles/<service>/`: every version of a service.
    pub fn profiles_of(&self, service: &str) -> Result<String, CoordError> {
        check_name("service", service)?;
        Ok(format!("{}profiles/{service}/", self.root))
    }

    /// `<p>/profiles/<service>/v<20 digits>`.
    pub fn profile(&self, service: &str, version: u64) -> Result<String, CoordError> {
        Ok(format!("{}v{version:020}", self.profiles_of(service)?))
    }

    /// What `key` names; `None` for a key outside the layout (another program's, or a
    /// later version's), which readers ignore.
    pub fn parse(&self, key: &[u8]) -> Option<KeyOf> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.root)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name = |s: &str, what| check_name(what, s).ok().map(|()| s.to_string());
        let host = |s: &str| name(s, "host").map(HostId);
        Some(match parts.as_slice() {
            ["hosts", h] => KeyOf::Host(host(h)?),
            ["alive", h] => KeyOf::Alive(host(h)?),
            ["drain", h] => KeyOf::Drain(host(h)?),
            ["owners", s] => KeyOf::Owner(name(s, "service")?),
            ["specs", s] => KeyOf::Spec(name(s, "service")?),
            ["failures", s] => KeyOf::Failure(name(s, "service")?),
            ["shadows", s, h, d] => KeyOf::Shadow {
                service: name(s, "service")?,
                host: host(h)?,
                shadow: name(d, "domain")?,
            },
            ["profiles", s, v] => {
                let digits = v.strip_prefix('v')?;
                if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                KeyOf::Profile {
                    service: name(s, "service")?,
                    version: digits.parse().ok()?,
                }
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new("/understudy/lab").unwrap()
    }

    #[test]
    fn every_key_parses_back_to_what_it_names() {
        let k = keys();
        let h = HostId("h2".into());
        let cases = [
            (k.host(&h).unwrap(), KeyOf::Host(h.clone())),
            (k.alive(&h).unwrap(), KeyOf::Alive(h.clone())),
            (k.drain(&h).unwrap(), KeyOf::Drain(h.clone())),
            (k.owner("web").unwrap(), KeyOf::Owner("web".into())),
            (k.spec("web").unwrap(), KeyOf::Spec("web".into())),
            (k.failure("web").unwrap(), KeyOf::Failure("web".into())),
            (
                k.shadow("web", &h, "web-shadow-1").unwrap(),
                KeyOf::Shadow {
                    service: "web".into(),
                    host: h.clone(),
                    shadow: "web-shadow-1".into(),
                },
            ),
            (
                k.profile("web", 42).unwrap(),
                KeyOf::Profile {
                    service: "web".into(),
                    version: 42,
                },
            ),
        ];
        for (key, want) in cases {
            assert!(key.starts_with("/understudy/lab/"), "{key}");
            assert_eq!(k.parse(key.as_bytes()), Some(want), "{key}");
        }
        assert_eq!(
            k.owner("web").unwrap(),
            "/understudy/lab/owners/web",
            "the documented layout"
        );
        assert_eq!(
            k.profile("web", 7).unwrap(),
            "/understudy/lab/profiles/web/v00000000000000000007"
        );
    }

    #[test]
    fn profile_keys_sort_in_number_order() {
        let k = keys();
        let mut v: Vec<String> = [10, 9, 100, 1]
            .iter()
            .map(|n| k.profile("s", *n).unwrap())
            .collect();
        v.sort();
        let n: Vec<u64> = v
            .iter()
            .map(|key| match k.parse(key.as_bytes()) {
                Some(KeyOf::Profile { version, .. }) => version,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(n, [1, 9, 10, 100]);
    }

    #[test]
    fn foreign_and_malformed_keys_are_not_ours() {
        let k = keys();
        for key in [
            &b"/understudy/other/owners/web"[..],
            b"/understudy/lab/owners",
            b"/understudy/lab/owners/",
            b"/understudy/lab/owners/web/extra",
            b"/understudy/lab/unknown/x",
            b"/understudy/lab/shadows/web/h1",
            b"/understudy/lab/profiles/web/v42",
            b"/understudy/lab/profiles/web/x0000000000000000042",
            b"/understudy/lab/hosts/..",
            b"/understudy/lab/alive/\xff",
        ] {
            assert_eq!(k.parse(key), None, "{}", String::from_utf8_lossy(key));
        }
    }

    #[test]
    fn prefixes_are_checked() {
        for ok in ["/understudy/lab", "/", "/a"] {
            Keys::new(ok).unwrap();
        }
        for bad in ["understudy", "/understudy/", "/a//b", "/a/../b", "/a\n"] {
            assert!(
                matches!(Keys::new(bad), Err(CoordError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        assert!(matches!(
            keys().owner("a/b"),
            Err(CoordError::InvalidName {
                what: "service",
                ..
            })
        ));
    }
}
