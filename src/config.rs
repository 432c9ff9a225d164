//! TOML configuration.
