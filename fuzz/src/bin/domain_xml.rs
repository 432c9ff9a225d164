//! AFL target: see [`understudy_fuzz::domain_xml`].

fn main() {
    afl::fuzz!(|data: &[u8]| understudy_fuzz::domain_xml::check(data));
}
