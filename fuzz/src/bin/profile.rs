//! AFL target: see [`understudy_fuzz::profile`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::profile::check(data));
}
