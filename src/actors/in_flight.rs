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

/// Requests of one kind (one future type) in flight.
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

    /// Polls `request` once: its output if it finished, else `None`, and it waits in the set
    /// until [`InFlight::next_finished`] returns its output.
    pub(super) async fn start(&mut self, request: F) -> Option<F::Output> {
        let mut boxed = match self.spare.take() {
            Some(mut spare) => {
                // The previous request is finished; this drops what is left of it in place.
                spare.set(request);
                spare
            }
            None => Box::pin(request),
        };
        match std::future::poll_fn(|cx| Poll::Ready(boxed.as_mut().poll(cx))).await {
            Poll::Ready(output) => {
                self.spare = Some(boxed);
                Some(output)
            }
            // The set polls a request it is given before anything wakes it, so the request
            // then registers the set's waker in place of this task's.
            Poll::Pending => {
                self.waiting.push(boxed);
                None
            }
        }
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

    #[tokio::test]
    async fn a_request_that_finishes_at_once_returns_its_output_and_leaves_its_box() {
        let mut in_flight = InFlight::new();
        for value in 0..3 {
            assert_eq!(
                in_flight.start(std::future::ready(value)).await,
                Some(value)
            );
            assert!(in_flight.spare.is_some());
            assert!(in_flight.is_idle());
        }
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
