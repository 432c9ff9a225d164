//! [`thread_cpu_ns`]: the CPU time of the calling thread, to measure what a tick costs.

/// CPU time the calling thread has used, in nanoseconds (`/proc/thread-self/schedstat`, first
/// field): what a collector's tick costs, measured where it runs. `None` where the kernel does
/// not provide it.
pub fn thread_cpu_ns() -> Option<u64> {
    parse_schedstat(&std::fs::read_to_string("/proc/thread-self/schedstat").ok()?)
}

/// The on-CPU time of a `schedstat` line (`<run ns> <wait ns> <timeslices>`).
fn parse_schedstat(text: &str) -> Option<u64> {
    text.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_cpu_time_is_read_from_schedstat() {
        assert_eq!(parse_schedstat("1234567 890 12\n"), Some(1_234_567));
        assert_eq!(parse_schedstat("garbage"), None);
        assert_eq!(parse_schedstat(""), None);
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("schedstat");
        std::fs::write(&f, "42 7 1\n").unwrap();
        assert_eq!(
            parse_schedstat(&std::fs::read_to_string(&f).unwrap()),
            Some(42)
        );
        // This thread's own counter only grows.
        if let Some(a) = thread_cpu_ns() {
            let b = thread_cpu_ns().unwrap();
            assert!(b >= a);
        }
    }
}
