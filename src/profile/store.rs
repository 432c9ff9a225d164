//! Versions.
pub struct ProfileDiff; pub struct ProfileStore; pub struct ProfileVersion; pub enum Reason{} pub struct SkippedFile; #[derive(Debug, thiserror::Error)] pub enum StoreError{} pub struct SyncReport; pub struct VersionSummary;
