//! Thin binary over the `understudy` library; see [`understudy::cli`].

fn main() -> std::process::ExitCode {
    understudy::cli::main()
}
