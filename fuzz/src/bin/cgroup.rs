//! AFL target: see [`understudy_fuzz::cgroup`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::cgroup::check(data));
}
