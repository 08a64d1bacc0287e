//! A call's work run in place when it can finish at once. A small call
//! whose payload came with its header (an echo, a quick built-in function)
//! completes within its first poll, inside the HTTP/2 stream's own task:
//! its replies are queued before the response is returned, with no task of
//! its own and no wake-up across threads (on two cores, sequential 1 KiB
//! echoes were led by the kernel switching threads). Work that has to wait
//! — more payload, a queue, a model that takes time — goes on a task of its
//! own right after that first poll, as every call did before, so nothing
//! waits on the response being polled and no call is dropped half-done.

use std::{
    future::Future,
    task::{Context, Waker},
};

/// Polls `work` once; runs the rest on a task of its own unless that poll
/// finished it. `true` when it finished in place.
pub(crate) fn run<F>(work: F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    let mut work = Box::pin(work);
    // Nothing needs waking for this one poll: a future that is not done
    // goes on a task now, whose first poll registers its own waker (and
    // sees anything that became ready in between).
    let mut cx = Context::from_waker(Waker::noop());
    if work.as_mut().poll(&mut cx).is_ready() {
        return true;
    }
    tokio::spawn(work);
    false
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::Duration,
    };

    use super::*;

    #[tokio::test]
    async fn work_that_is_ready_finishes_in_place() {
        let done = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&done);
        assert!(run(async move { flag.store(true, Ordering::SeqCst) }));
        assert!(done.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn work_that_waits_goes_on_a_task_and_still_finishes() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let in_place = run(async move {
            let _ = wait.await;
            let _ = tx.send("finished on its task");
        });
        assert!(!in_place);
        // The value comes only from the spawned task, once woken.
        go.send(()).expect("the work waits");
        let got = tokio::time::timeout(Duration::from_secs(5), rx).await.expect("woken").expect("sent");
        assert_eq!(got, "finished on its task");
    }
}
