//! Repo.
pub struct DirectoryRepository; pub trait ProfileRepository{} #[derive(Debug, thiserror::Error)] pub enum RepoError{}
