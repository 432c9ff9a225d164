//! AFL target: see [`understudy_fuzz::control`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::control::check(data));
}
