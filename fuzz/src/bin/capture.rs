//! AFL target: see [`understudy_fuzz::capture`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::capture::check(data));
}
