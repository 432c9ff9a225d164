//! AFL target: see [`understudy_fuzz::cluster`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::cluster::check(data));
}
