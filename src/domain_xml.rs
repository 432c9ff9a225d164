//! Domain XML tree.
