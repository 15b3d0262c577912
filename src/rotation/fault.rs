//! Test-only fault injection for the kill -9 matrix: in debug builds, with
//! `KEYWARD_TEST_PAUSE_AT=<step>:<before|after>` set, the executor stops
//! for good at that step boundary (before or after the step's commit),
//! after writing the boundary's name to `KEYWARD_TEST_PAUSE_FILE`. The test
//! then kills the daemon with SIGKILL and restarts it without the variable.
//! Release builds compile this to nothing.

/// Which side of a step's commit.
#[derive(Debug, Clone, Copy)]
pub enum Boundary {
    /// The step's side effects (HSM key, signature) are done, its commit is not.
    Before,
    /// The step's commit is done.
    After,
}

/// Pauses forever if the test asked to stop at this boundary.
pub async fn pause_point(step: &str, at: Boundary) {
    #[cfg(debug_assertions)]
    {
        let want = format!(
            "{step}:{}",
            match at {
                Boundary::Before => "before",
                Boundary::After => "after",
            }
        );
        if std::env::var("KEYWARD_TEST_PAUSE_AT").ok().as_deref() == Some(want.as_str()) {
            if let Ok(file) = std::env::var("KEYWARD_TEST_PAUSE_FILE") {
                let _ = std::fs::write(file, &want);
            }
            tracing::warn!(boundary = %want, "test pause point reached; waiting to be killed");
            std::future::pending::<()>().await;
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = (step, at);
}
