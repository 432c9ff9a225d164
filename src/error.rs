//! One-line error reports for logs and control-socket answers.

/// Formats `e` with its chain of sources as `error: cause: cause ...`, so one line shows the
/// root of a failure.
pub fn report(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn report_lists_the_whole_chain() {
        let e = Outer(std::io::Error::other("disk on fire"));
        assert_eq!(super::report(&e), "outer: disk on fire");
        assert_eq!(super::report(&std::io::Error::other("x")), "x");
    }
}
