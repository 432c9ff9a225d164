//! AFL target: see [`understudy_fuzz::agent`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::agent::check(data));
}
