//! Bounded waits for conditions the bed can only observe by asking (logind announces no
//! inhibitor changes; a process's log has no watch). Cluster state is waited on with watches.

use std::future::Future;
use std::time::{Duration, Instant};

/// Asks `check` every `every` until it yields a value or `timeout` has passed.
pub async fn until<T, F, Fut>(timeout: Duration, every: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(every).await;
    }
}
