//! Profile version files (`<state_dir>/profiles/<service>/v<N>.json`, and the same files in a
//! directory repository, which other hosts write).
//!
//! Properties: a file that loads is the version and service it is named for, re-encodes to
//! itself, predicts finite non-negative envelopes at any time and shows no change against
//! itself; an error says why the file is unusable.

use understudy::profile::layout;
use understudy::profile::{Metric, ProfileDiff};

const SERVICE: &str = "web";
const VERSION: u64 = 3;

/// Runs one input.
pub fn check(data: &[u8]) {
    let v = match layout::parse(data, SERVICE, VERSION) {
        Ok(v) => v,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    assert_eq!((v.service.as_str(), v.version), (SERVICE, VERSION));
    let bytes = serde_json::to_vec(&v).expect("a version encodes");
    let back = layout::parse(&bytes, SERVICE, VERSION)
        .unwrap_or_else(|e| panic!("an encoded version does not load: {e}"));
    assert_eq!(back, v, "version round trip");

    let model = &v.profile.model;
    for ts in [0, 1_764_590_000_000, 1_764_590_000_000 + 3_600_000 * 77] {
        let p = model.predict(ts);
        for m in Metric::ALL {
            let e = p.envelopes.get(m);
            for x in [e.p50, e.p95, e.limit] {
                assert!(x.is_finite() && x >= 0.0, "{m} envelope {e:?} at {ts}");
            }
        }
    }
    for m in Metric::ALL {
        let f = model.level_factor(m);
        assert!(f.is_finite() && f > 0.0, "{m} level factor {f}");
        for h in 0..168 {
            if let Some(e) = model.bucket_envelope(m, h) {
                assert!(
                    e.limit.is_finite() && e.limit >= 0.0,
                    "{m} bucket {h}: {e:?}"
                );
            }
        }
    }
    let diff = ProfileDiff::between(VERSION, &v.profile, VERSION, &v.profile);
    assert!(diff.is_empty(), "a profile differs from itself: {diff}");
    let _ = diff.to_string();
}
