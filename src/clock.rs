//! Wall-clock time as the daemon records it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Current wall-clock time in Unix milliseconds (0 before 1970, saturating far after).
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
