//! The `keyward` binary: daemon and operator CLI.

#![forbid(unsafe_code)]

/// mimalloc: issuance allocates many small short-lived buffers (DER, JSON,
/// SQL parameters) on several threads; glibc malloc cost ~8% of daemon CPU
/// under load, measurably more than mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Before any file exists: the database, its -wal/-shm, tokens written by
    // the CLI are private from their first byte.
    keyward::store::files::restrict_umask();
    keyward::cli::run()
}
