//! Blocking work on either flavour of tokio runtime (the crate docs'
//! "Runtime" section says what each costs).

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs blocking work `f` from a node task: in `block_in_place` on a
/// multi-threaded runtime (its other tasks move to another worker), inline
/// on a current-thread one (which `block_in_place` refuses, and which has
/// no other thread to run them on).
pub(crate) fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let multi_threaded = Handle::try_current()
        .is_ok_and(|runtime| runtime.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_threaded {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}
