//! Predictive deployment profiles.
