//! The `flashpack` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    flashpack::cli::main()
}
