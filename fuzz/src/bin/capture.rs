//! AFL target: see [`understudy_fuzz::capture`].

fn main() {
    understudy_fuzz::capture::prime();
    afl::fuzz!(|data: &[u8]| understudy_fuzz::capture::check(data));
}
