//! The requests one subscription has taken and not yet answered.
//!
//! Most requests finish in their first poll (cached principal, cached key, AES-GCM). Pushed
//! straight into a `FuturesUnordered`, each would still pay for a task node of its own (an
//! allocation, and two copies of a future of some 2.4 KiB), for linking it into and out of the
//! set's lists, and for a trip through its ready queue. [`InFlight::start`] instead polls a
//! request once in a box kept from the last request that finished that way, so a request that
//! finishes at once costs one copy and no allocation. Only a request that has to wait (storage,
//! an actor) joins the set, in its box, and the next request gets a new one.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use futures::stream::FuturesUnordered;
use futures::StreamExt;

/// Requests of one kind (one future type) in flight. A finished request stays in the spare
/// box until the next one replaces it, so `F` should hold nothing once it has finished (an
/// `async` block drops what it captured as it returns).
pub(super) struct InFlight<F> {
    /// The box of the last request that finished in its first poll, for the next one.
    spare: Option<Pin<Box<F>>>,
    waiting: FuturesUnordered<Pin<Box<F>>>,
}

impl<F: Future> InFlight<F> {
    pub(super) fn new() -> Self {
        Self {
            spare: None,
            waiting: FuturesUnordered::new(),
        }
    }

    /// Boxes `request` now, and polls it once when awaited: its output if it finished, else
    /// `None`, and it waits in the set until [`InFlight::next_finished`] returns its output.
    ///
    /// Not an `async fn`: its future would hold `request` itself, and be moved, request and
    /// all, into the caller's future when awaited. This one holds the box. A request whose
    /// future is dropped unpolled is dropped with it.
    pub(super) fn start(
        &mut self,
        request: F,
    ) -> impl Future<Output = Option<F::Output>> + Send + '_
    where
        F: Send,
    {
        let boxed = match self.spare.take() {
            Some(mut spare) => {
                // The previous request is finished; this drops what is left of it in place.
                spare.set(request);
                spare
            }
            None => Box::pin(request),
        };
        let mut unpolled = Some(boxed);
        std::future::poll_fn(move |cx| {
            let Some(mut request) = unpolled.take() else {
                return Poll::Ready(None);
            };
            Poll::Ready(match request.as_mut().poll(cx) {
                Poll::Ready(output) => {
                    self.spare = Some(request);
                    Some(output)
                }
                // `push` queues the request to be polled by the set whether or not anything
                // woke it, and that poll registers the set's waker in place of this task's.
                Poll::Pending => {
                    self.waiting.push(request);
                    None
                }
            })
        })
    }

    /// The output of the next waiting request to finish; `None` when none is waiting.
    pub(super) async fn next_finished(&mut self) -> Option<F::Output> {
        self.waiting.next().await
    }

    /// Whether no request is waiting.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Ready at once with its value; counts its drops.
    struct Counted(u32, Arc<AtomicUsize>);

    impl Future for Counted {
        type Output = u32;
        fn poll(self: Pin<&mut Self>, _: &mut std::task::Context<'_>) -> Poll<u32> {
            Poll::Ready(self.0)
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn spare_address<F>(in_flight: &InFlight<F>) -> Option<usize> {
        let spare = in_flight.spare.as_ref()?;
        Some(std::ptr::from_ref(spare.as_ref().get_ref()) as usize)
    }

    #[tokio::test]
    async fn a_request_that_finishes_at_once_returns_its_output_and_leaves_its_box() {
        let drops = Arc::new(AtomicUsize::new(0));
        let mut in_flight = InFlight::new();
        assert_eq!(in_flight.start(Counted(0, drops.clone())).await, Some(0));
        let first_box = spare_address(&in_flight);
        assert!(first_box.is_some());
        for value in 1..4 {
            assert_eq!(
                in_flight.start(Counted(value, drops.clone())).await,
                Some(value)
            );
            // The next request took the same box, and dropped the one before it there.
            assert_eq!(spare_address(&in_flight), first_box);
            assert_eq!(drops.load(Ordering::SeqCst), value as usize);
            assert!(in_flight.is_idle());
        }
    }

    #[tokio::test]
    async fn a_request_woken_before_the_set_first_polls_it_is_still_finished() {
        let (send, receive) = tokio::sync::oneshot::channel::<u32>();
        let mut in_flight = InFlight::new();
        assert_eq!(
            in_flight
                .start(async move { receive.await.unwrap_or(0) })
                .await,
            None
        );
        // The wake goes to the waker of the first poll, which the set never sees.
        send.send(42).unwrap();
        let finished =
            tokio::time::timeout(std::time::Duration::from_secs(5), in_flight.next_finished())
                .await;
        assert_eq!(finished, Ok(Some(42)));
    }

    #[tokio::test]
    async fn a_request_that_waits_is_finished_by_the_set_when_woken() {
        let (send, receive) = tokio::sync::oneshot::channel::<u32>();
        let mut in_flight = InFlight::new();
        let waits = async move { receive.await.unwrap_or(0) };
        assert_eq!(
            in_flight.start(futures::future::Either::Left(waits)).await,
            None
        );
        assert!(!in_flight.is_idle());
        assert!(in_flight.spare.is_none());
        // A request after it finishes at once while the first still waits.
        let at_once = futures::future::Either::Right(std::future::ready(7));
        assert_eq!(in_flight.start(at_once).await, Some(7));
        // Woken after it joined the set: the set must have its waker, not the starter's.
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            let _ = send.send(42);
        });
        let finished =
            tokio::time::timeout(std::time::Duration::from_secs(5), in_flight.next_finished())
                .await;
        assert_eq!(finished, Ok(Some(42)));
        assert_eq!(in_flight.next_finished().await, None);
    }
}
