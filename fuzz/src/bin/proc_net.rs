//! AFL target: see [`understudy_fuzz::proc_net`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::proc_net::check(data));
}
