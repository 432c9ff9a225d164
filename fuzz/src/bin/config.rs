//! AFL target: see [`understudy_fuzz::config`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::config::check(data));
}
