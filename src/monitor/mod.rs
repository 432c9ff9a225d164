//! Collectors and history.
