//! Control socket protocol and Prometheus metrics.
