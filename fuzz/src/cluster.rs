//! What a host reads from the other hosts: heartbeat datagrams (anything may arrive on the
//! port) and etcd's keys and values (written by any host of the cluster, or anyone else with
//! access to etcd).
//!
//! The input is read three ways: whole, as a heartbeat datagram; whole, as the value of every
//! record kind at a fixed key; and split at its first newline into a key and the value a watch
//! event carries for it.
//!
//! Properties: a beat that decodes stays within its bounds, names only valid hosts and
//! services, and comes back unchanged through its encoding; a key that parses is the key its
//! parts make again; a record read at a key names what the key names (owner generations start
//! at 1), and comes back unchanged through its encoding; every error names the key.

use understudy::cluster::etcd::codec;
use understudy::cluster::etcd::keys::{KeyOf, Keys};
use understudy::cluster::liveness::{Beat, MAX_BEAT_BYTES, MAX_HEARD, MAX_SERVICES};
use understudy::cluster::{check_name, ClusterEvent, CoordError, HostId};

/// The cluster's key prefix here; beats must carry it too.
pub const PREFIX: &str = "/u";

/// Runs one input.
pub fn check(data: &[u8]) {
    beat(data);
    let keys = Keys::new(PREFIX).expect("a valid prefix");
    records(&keys, data);
    let (key, value) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    key_and_event(&keys, key, value);
}

fn beat(data: &[u8]) {
    let Ok(b) = Beat::decode(data, PREFIX) else {
        return;
    };
    assert!(data.len() <= MAX_BEAT_BYTES);
    assert_eq!(b.prefix, PREFIX);
    assert!(b.hears.len() <= MAX_HEARD, "{} hosts heard", b.hears.len());
    assert!(b.answering.len() <= MAX_SERVICES && b.unreachable.len() <= MAX_SERVICES);
    for h in std::iter::once(&b.host).chain(&b.hears) {
        assert!(check_name("host", h).is_ok(), "host {h:?} accepted");
    }
    for s in b.answering.iter().chain(&b.unreachable) {
        assert!(check_name("service", s).is_ok(), "service {s:?} accepted");
    }
    // What this daemon would send for it: within a datagram whenever the services fit, and
    // read back as it was, but for service lists cut to fit.
    let wire = b.encode();
    match Beat::decode(&wire, PREFIX) {
        Ok(back) => {
            assert_eq!(
                (&back.host, back.seq, back.mode, &back.hears),
                (&b.host, b.seq, b.mode, &b.hears)
            );
            assert!(b.answering.starts_with(&back.answering));
            assert!(b.unreachable.starts_with(&back.unreachable));
            if (back.answering.len(), back.unreachable.len())
                == (b.answering.len(), b.unreachable.len())
            {
                assert_eq!(back, b, "beat round trip");
            }
        }
        // Only when the fields beside the service lists fill a datagram by themselves (an
        // input without the lists, at the limit, gains their empty brackets).
        Err(e) => assert!(wire.len() > MAX_BEAT_BYTES, "own encoding refused: {e}"),
    }
}

/// Errors of reading `key` name it.
fn names_key<T>(key: &str, r: &Result<T, CoordError>) {
    if let Err(e) = r {
        let text = e.to_string();
        assert!(
            text.contains(key),
            "error does not name key {key:?}: {text}"
        );
    }
}

/// Reads `value` with `read` (the decoder of one key): an error names the key; a record read
/// passes `names` and comes back unchanged through its encoding.
fn record<T>(
    key: &str,
    value: &[u8],
    read: impl Fn(&[u8]) -> Result<T, CoordError>,
    names: impl Fn(&T),
) where
    T: serde::Serialize + PartialEq + std::fmt::Debug,
{
    let r = read(value);
    names_key(key, &r);
    if let Ok(x) = &r {
        names(x);
        let back = read(&codec::encode(x)).expect("an encoded record decodes");
        assert_eq!(&back, x, "record round trip");
    }
}

/// The names of the fixtures in `src/cluster/etcd/fixtures`, the seeds.
const SERVICE: &str = "web1";
const SHADOW: &str = "web1-shadow-3";

fn records(keys: &Keys, value: &[u8]) {
    let (h1, h2) = (HostId("h1".into()), HostId("h2".into()));
    let k = keys.owner(SERVICE).unwrap();
    record(
        &k,
        value,
        |v| codec::owner(&k, SERVICE, v),
        |o| {
            assert_eq!(o.service, SERVICE);
            assert!(o.generation >= 1);
        },
    );
    let k = keys.alive(&h1).unwrap();
    record(
        &k,
        value,
        |v| codec::facts(&k, &h1, v),
        |f| assert_eq!(f.host, h1),
    );
    let k = keys.drain(&h2).unwrap();
    record(
        &k,
        value,
        |v| codec::drain(&k, &h2, v),
        |f| assert_eq!(f.host, h2),
    );
    let k = keys.spec(SERVICE).unwrap();
    record(
        &k,
        value,
        |v| codec::spec(&k, SERVICE, v),
        |s| assert_eq!(s.service, SERVICE),
    );
    let k = keys.failure(SERVICE).unwrap();
    record(
        &k,
        value,
        |v| codec::failure(&k, SERVICE, v),
        |f| assert_eq!(f.service, SERVICE),
    );
    let k = keys.shadow(SERVICE, &h2, SHADOW).unwrap();
    let names = (SERVICE, &h2, SHADOW);
    record(
        &k,
        value,
        |v| codec::shadow(&k, names, v),
        |s| assert_eq!((s.service.as_str(), &s.host, s.shadow.as_str()), names),
    );
}

/// The key `of` names, as this daemon writes it.
fn key_of(keys: &Keys, of: &KeyOf) -> String {
    match of {
        KeyOf::Host(h) => keys.host(h),
        KeyOf::Alive(h) => keys.alive(h),
        KeyOf::Drain(h) => keys.drain(h),
        KeyOf::Owner(s) => keys.owner(s),
        KeyOf::Spec(s) => keys.spec(s),
        KeyOf::Failure(s) => keys.failure(s),
        KeyOf::Shadow {
            service,
            host,
            shadow,
        } => keys.shadow(service, host, shadow),
        KeyOf::Profile { service, version } => keys.profile(service, *version),
    }
    .expect("a parsed key's names are valid")
}

fn key_and_event(keys: &Keys, key: &[u8], value: &[u8]) {
    let parsed = keys.parse(key);
    if let Some(of) = &parsed {
        assert_eq!(key_of(keys, of).as_bytes(), key, "key round trip of {of:?}");
    }
    let lossy = String::from_utf8_lossy(key);
    for v in [Some(value), None] {
        let r = codec::event(keys, key, v);
        names_key(&lossy, &r);
        let Ok(Some(ev)) = r else {
            continue;
        };
        // The event is about what the key names.
        let of = parsed
            .as_ref()
            .expect("an event from a key outside the layout");
        match (&ev, of) {
            (ClusterEvent::HostUp(f), KeyOf::Alive(h)) => assert_eq!(&f.host, h),
            (ClusterEvent::HostLost(x), KeyOf::Alive(h)) => assert_eq!(x, h),
            (ClusterEvent::Drain { host, .. }, KeyOf::Drain(h)) => assert_eq!(host, h),
            (ClusterEvent::Owner(o), KeyOf::Owner(s)) => assert_eq!(&o.service, s),
            (ClusterEvent::OwnerReleased { service }, KeyOf::Owner(s)) => assert_eq!(service, s),
            (ClusterEvent::Spec(x), KeyOf::Spec(s)) => assert_eq!(&x.service, s),
            (ClusterEvent::SpecWithdrawn { service }, KeyOf::Spec(s)) => assert_eq!(service, s),
            (ClusterEvent::Failure(x), KeyOf::Failure(s)) => assert_eq!(&x.service, s),
            (ClusterEvent::FailureCleared { service }, KeyOf::Failure(s)) => {
                assert_eq!(service, s)
            }
            (
                ClusterEvent::Shadow(x),
                KeyOf::Shadow {
                    service,
                    host,
                    shadow,
                },
            ) => {
                assert_eq!((&x.service, &x.host, &x.shadow), (service, host, shadow))
            }
            (
                ClusterEvent::ShadowGone {
                    service,
                    host,
                    shadow,
                },
                KeyOf::Shadow {
                    service: s,
                    host: h,
                    shadow: d,
                },
            ) => assert_eq!((service, host, shadow), (s, h, d)),
            (ev, of) => panic!("event {ev:?} from key {of:?}"),
        }
    }
}
