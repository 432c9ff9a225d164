//! Integration tests against the real lab (libvirtd + TCG guests in the understudy-lab
//! namespace). Run them with `make test`; they are serial (`--test-threads=1`) because every
//! guest boot takes a full core under TCG.

mod common;
mod failover;
mod faults;
mod lab_basics;
mod ops;
mod profile;
mod standby;
mod stateful;
