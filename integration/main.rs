//! Integration tests against the real lab (libvirtd + TCG guests in the understudy-lab
//! namespace), and (`cluster`) against a real etcd the tests start themselves. Run them with `make test`; they are serial (`--test-threads=1`) because every
//! guest boot takes a full core under TCG.
//!
//! `three_hosts::` holds the tests that need the three-host lab (`make lab-up HOSTS=3`); they
//! run in a second lab run of their own (see `make test` and `three_hosts/mod.rs`), and the
//! one-host run skips them (`--skip three_hosts::`).

mod cluster;
mod cluster_lab;
mod common;
mod etcd_server;
mod failover;
mod faults;
mod lab_basics;
mod ops;
mod profile;
mod standby;
mod stateful;
mod three_hosts;
