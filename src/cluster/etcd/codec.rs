//! Values in etcd: JSON, written by understudy, read back as untrusted input. A value is
//! bounded in size, must parse as the record its key says (unknown fields are ignored: a newer
//! version may add some), and must name what its key names; every error names the key.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::keys::{KeyOf, Keys};
use crate::cluster::{
    ClusterEvent, CoordError, FailureReport, HostFacts, HostId, OwnerRecord, PrimarySpec,
    ShadowRecord,
};

/// Largest value read back (a primary spec holds a domain XML). etcd itself refuses requests
/// over 1.5 MiB by default.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// A host's drain flag: present while it drains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainFlag {
    /// The draining host.
    pub host: HostId,
    /// The host that asked for it.
    pub by: HostId,
    /// When (Unix ms).
    pub since_unix_ms: u64,
}

/// JSON of a record.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // The records are plain structs of strings and numbers: serialising cannot fail.
    serde_json::to_vec(value).expect("records serialise to JSON")
}

/// Parses the value at `key`, within [`MAX_VALUE_BYTES`].
pub fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, CoordError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(CoordError::TooLarge {
            key: key.to_string(),
            bytes: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    serde_json::from_slice(value).map_err(|e| CoordError::Malformed {
        key: key.to_string(),
        why: e.to_string(),
    })
}

/// Refuses a value whose own `field` is not what its key names.
fn same(key: &str, field: &str, in_key: &str, in_value: &str) -> Result<(), CoordError> {
    if in_key == in_value {
        Ok(())
    } else {
        Err(CoordError::Malformed {
            key: key.to_string(),
            why: format!("the key names {field} '{in_key}', the value '{in_value}'"),
        })
    }
}

/// An owner record read from `key` (naming `service`).
pub fn owner(key: &str, service: &str, value: &[u8]) -> Result<OwnerRecord, CoordError> {
    let r: OwnerRecord = decode(key, value)?;
    same(key, "service", service, &r.service)?;
    if r.generation == 0 {
        return Err(CoordError::Malformed {
            key: key.to_string(),
            why: "generation 0 (generations start at 1)".into(),
        });
    }
    Ok(r)
}

/// Host facts read from `key` (naming `host`).
pub fn facts(key: &str, host: &HostId, value: &[u8]) -> Result<HostFacts, CoordError> {
    let f: HostFacts = decode(key, value)?;
    same(key, "host", &host.0, &f.host.0)?;
    Ok(f)
}

/// A drain flag read from `key` (naming `host`).
pub fn drain(key: &str, host: &HostId, value: &[u8]) -> Result<DrainFlag, CoordError> {
    let f: DrainFlag = decode(key, value)?;
    same(key, "host", &host.0, &f.host.0)?;
    Ok(f)
}

/// A primary spec read from `key` (naming `service`).
pub fn spec(key: &str, service: &str, value: &[u8]) -> Result<PrimarySpec, CoordError> {
    let s: PrimarySpec = decode(key, value)?;
    same(key, "service", service, &s.service)?;
    Ok(s)
}

/// A failure report read from `key` (naming `service`).
pub fn failure(key: &str, service: &str, value: &[u8]) -> Result<FailureReport, CoordError> {
    let r: FailureReport = decode(key, value)?;
    same(key, "service", service, &r.service)?;
    Ok(r)
}

/// A shadow registration read from `key` (naming `service`, `host` and `shadow`).
pub fn shadow(
    key: &str,
    (service, host, shadow): (&str, &HostId, &str),
    value: &[u8],
) -> Result<ShadowRecord, CoordError> {
    let r: ShadowRecord = decode(key, value)?;
    same(key, "service", service, &r.service)?;
    same(key, "host", &host.0, &r.host.0)?;
    same(key, "shadow", shadow, &r.shadow)?;
    Ok(r)
}

/// What a change of `key` (a put with `value`, or a delete when `value` is `None`) means.
/// `Ok(None)`: a key the cluster's events do not cover (a profile version, a foreign key).
pub fn event(
    keys: &Keys,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<Option<ClusterEvent>, CoordError> {
    let Some(of) = keys.parse(key) else {
        return Ok(None);
    };
    let k = String::from_utf8_lossy(key);
    let k = k.as_ref();
    Ok(Some(match (of, value) {
        (KeyOf::Host(_), _) | (KeyOf::Profile { .. }, _) => return Ok(None),
        (KeyOf::Alive(h), Some(v)) => ClusterEvent::HostUp(facts(k, &h, v)?),
        (KeyOf::Alive(h), None) => ClusterEvent::HostLost(h),
        (KeyOf::Drain(h), Some(v)) => {
            drain(k, &h, v)?;
            ClusterEvent::Drain {
                host: h,
                draining: true,
            }
        }
        (KeyOf::Drain(h), None) => ClusterEvent::Drain {
            host: h,
            draining: false,
        },
        (KeyOf::Owner(s), Some(v)) => ClusterEvent::Owner(owner(k, &s, v)?),
        (KeyOf::Owner(service), None) => ClusterEvent::OwnerReleased { service },
        (KeyOf::Spec(s), Some(v)) => ClusterEvent::Spec(spec(k, &s, v)?),
        (KeyOf::Spec(service), None) => ClusterEvent::SpecWithdrawn { service },
        (KeyOf::Failure(s), Some(v)) => ClusterEvent::Failure(failure(k, &s, v)?),
        (KeyOf::Failure(service), None) => ClusterEvent::FailureCleared { service },
        (
            KeyOf::Shadow {
                service,
                host,
                shadow: name,
            },
            Some(v),
        ) => ClusterEvent::Shadow(shadow(k, (&service, &host, &name), v)?),
        (
            KeyOf::Shadow {
                service,
                host,
                shadow,
            },
            None,
        ) => ClusterEvent::ShadowGone {
            service,
            host,
            shadow,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::HostState;

    fn keys() -> Keys {
        Keys::new("/understudy/lab").unwrap()
    }

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cluster/etcd/fixtures");

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap()
    }

    #[test]
    fn fixtures_of_each_record_parse() {
        let k = keys();
        let key = k.owner("web1").unwrap();
        let o = owner(&key, "web1", &fixture("owner.json")).unwrap();
        assert_eq!(
            (o.domain.as_str(), o.host.0.as_str(), o.generation),
            ("web1-shadow-2", "h2", 3)
        );
        let h = HostId("h1".into());
        let f = facts(&k.alive(&h).unwrap(), &h, &fixture("host.json")).unwrap();
        assert_eq!(f.capacity.unwrap().cpus, 2);
        let s = spec(&k.spec("web1").unwrap(), "web1", &fixture("spec.json")).unwrap();
        assert!(s.xml.starts_with("<domain"));
        let r = failure(
            &k.failure("web1").unwrap(),
            "web1",
            &fixture("failure.json"),
        )
        .unwrap();
        assert_eq!(r.trigger, crate::failover::Trigger::Pidfd);
        let h2 = HostId("h2".into());
        let sh = shadow(
            &k.shadow("web1", &h2, "web1-shadow-3").unwrap(),
            ("web1", &h2, "web1-shadow-3"),
            &fixture("shadow.json"),
        )
        .unwrap();
        assert_eq!(sh.status, crate::cluster::ShadowStatus::Ready);
        drain(&k.drain(&h2).unwrap(), &h2, &fixture("drain.json")).unwrap();
        // Round trip.
        assert_eq!(owner(&key, "web1", &encode(&o)).unwrap(), o);
        let _ = HostState::Active;
    }

    #[test]
    fn malformed_values_name_their_key() {
        let k = keys();
        let key = k.owner("web1").unwrap();
        let cases: [(&[u8], &str); 6] = [
            (b"", "EOF"),
            (b"{\"service\": \"web1\", \"domain\": ", "EOF"),
            (b"\xff\xfe", "expected value"),
            (
                b"{\"service\":\"web1\",\"domain\":\"d\",\"host\":\"h\",\"generation\":-1}",
                "invalid value",
            ),
            (
                b"{\"service\":\"db\",\"domain\":\"d\",\"host\":\"h\",\"generation\":1}",
                "the key names service 'web1', the value 'db'",
            ),
            (
                b"{\"service\":\"web1\",\"domain\":\"d\",\"host\":\"h\",\"generation\":0}",
                "generation 0",
            ),
        ];
        for (value, want) in cases {
            let e = owner(&key, "web1", value).unwrap_err();
            let text = e.to_string();
            assert!(matches!(e, CoordError::Malformed { .. }), "{e:?}");
            assert!(text.contains("/understudy/lab/owners/web1"), "{text}");
            assert!(text.contains(want), "{text} lacks {want}");
        }
        // A field a newer version added is ignored (hosts upgrade one at a time).
        let o = owner(&key, "web1", &fixture("owner-unknown-field.json")).unwrap();
        assert_eq!(o.generation, 1);
    }

    #[test]
    fn oversized_values_are_refused_before_parsing() {
        let big = vec![b' '; MAX_VALUE_BYTES + 1];
        match decode::<OwnerRecord>("/k", &big) {
            Err(CoordError::TooLarge { key, bytes, limit }) => {
                assert_eq!(
                    (key.as_str(), bytes, limit),
                    ("/k", MAX_VALUE_BYTES + 1, MAX_VALUE_BYTES)
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn changes_become_typed_events() {
        let k = keys();
        let h = HostId("h1".into());
        let ev = |key: String, v: Option<&[u8]>| event(&k, key.as_bytes(), v);
        assert_eq!(
            ev(k.alive(&h).unwrap(), None).unwrap(),
            Some(ClusterEvent::HostLost(h.clone()))
        );
        assert!(matches!(
            ev(k.alive(&h).unwrap(), Some(&fixture("host.json"))).unwrap(),
            Some(ClusterEvent::HostUp(f)) if f.host == h
        ));
        assert_eq!(
            ev(k.drain(&h).unwrap(), None).unwrap(),
            Some(ClusterEvent::Drain {
                host: h.clone(),
                draining: false
            })
        );
        assert_eq!(
            ev(k.shadow("web1", &h, "s1").unwrap(), None).unwrap(),
            Some(ClusterEvent::ShadowGone {
                service: "web1".into(),
                host: h.clone(),
                shadow: "s1".into()
            })
        );
        assert_eq!(
            ev(k.owner("web1").unwrap(), None).unwrap(),
            Some(ClusterEvent::OwnerReleased {
                service: "web1".into()
            })
        );
        // Not an event: profiles, the persistent host facts, foreign keys.
        assert_eq!(
            ev(k.profile("web1", 1).unwrap(), Some(b"{}")).unwrap(),
            None
        );
        assert_eq!(ev(k.host(&h).unwrap(), Some(b"junk")).unwrap(), None);
        assert_eq!(ev("/elsewhere/x".into(), Some(b"junk")).unwrap(), None);
        // A put of garbage is an error naming the key, not a panic.
        let e = ev(k.failure("web1").unwrap(), Some(b"[1,2")).unwrap_err();
        assert!(
            e.to_string().contains("/understudy/lab/failures/web1"),
            "{e}"
        );
    }
}
