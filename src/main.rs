//! The `keyward` binary: daemon and operator CLI.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    keyward::cli::run()
}
