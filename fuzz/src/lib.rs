//! What the fuzz targets share: the runtime that runs the async entry points.

use std::future::Future;
use std::sync::OnceLock;

/// Runs `future` to its end on one thread, with timers (the targets bound their waits).
pub fn block_on<F: Future>(future: F) -> F::Output {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        })
        .block_on(future)
}
