//! The `keyward` binary: daemon and operator CLI.

#![forbid(unsafe_code)]

/// mimalloc: issuance allocates many small short-lived buffers (DER, JSON,
/// SQL parameters) on several threads; glibc malloc cost ~8% of daemon CPU
/// under load, measurably more than mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keyward::cli::run()
}
