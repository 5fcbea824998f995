//! Subscriptions to the log: catch-up reads from the store, then the live
//! feed, then back to store reads whenever the feed lagged, with no gap, no
//! duplicate and no reordering across the switches (invariant I3).
//!
//! The argument, in the order the code does it: subscribe to the live feed
//! first, then read the head `h`. The writer moves the head *before* it
//! publishes a commit, so every commit with an event after `h` is published
//! after the subscription began and reaches it. Catch-up reads deliver every
//! matching event up to `h` and no further (everything up to the head is
//! acknowledged; later events may still be in flight). The live feed then
//! delivers the commits after `h`, skipping what is at or below `checked`,
//! the position through which every event has been examined. When the feed
//! lags, the subscription resubscribes, reads the head again and catches up
//! from `checked`; nothing above `checked` was delivered, nothing at or below
//! it is delivered again.

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use tracing::{debug, warn};

use crate::error::SubscriptionError;
use crate::event::{EventFilter, Position, ReadDirection, RecordedEvent};
use crate::store::{EventStore, FeedError, LiveFeed};

/// Events read per catch-up page unless set with
/// [`Subscription::with_page_size`].
pub const DEFAULT_PAGE_SIZE: usize = 512;

/// Subscribes to the events of the log after `from` that pass `filter`.
///
/// `from` is exclusive: it is the last position already processed
/// ([`Position::START`] for the whole log). The subscription joins the live
/// feed before this function returns, so nothing committed afterwards can be
/// missed; it reads nothing until first polled.
///
/// Guarantees: every committed event after `from` that passes the filter is
/// delivered exactly once, in strictly increasing position order, across
/// the switch from catch-up to live and after the live feed lagged. Only
/// acknowledged events are delivered (never one of a group commit still being
/// flushed). A slow consumer never makes appends wait: it falls behind, the
/// feed drops commits for it, and it re-reads them from the store. Memory is
/// bounded by one catch-up page plus the store's live feed capacity.
pub fn subscribe(store: Arc<dyn EventStore>, from: Position, filter: EventFilter) -> Subscription {
    let feed = store.subscribe_live();
    // Read after subscribing: see the module documentation.
    let head = store.head_position();
    debug!(%from, %head, ?filter, "subscription started");
    let cursor = Cursor {
        store,
        filter,
        feed,
        checked: from,
        reported: from,
        delivered: from,
        buffer: VecDeque::new(),
        mode: Mode::CatchUp { head },
        closing: false,
        page_size: DEFAULT_PAGE_SIZE,
    };
    Subscription {
        cursor: Some(Box::new(cursor)),
        step: None,
        position: from,
        noop_waker: Waker::from(Arc::new(NoopWake)),
    }
}

/// What a subscription hands its consumer next.
#[derive(Debug)]
pub(crate) enum Delivery {
    /// The next matching event.
    Event(RecordedEvent),
    /// No matching event up to and including this position remains: the
    /// consumer has passed it (lets a filtered projection report progress).
    Passed(Position),
    /// The store shut down and every event was delivered.
    End,
}

/// A subscription to the log; see [`subscribe`].
///
/// Use it as a [`futures_core::Stream`] of `Result<RecordedEvent,
/// SubscriptionError>` or call [`Subscription::next`]. An error is not the
/// end: the subscription keeps its place and the next call retries from the
/// same position. The stream ends only if the store's live feed closes.
///
/// Both [`Subscription::next`] and polling the stream are cancel-safe: a
/// step in progress is kept inside the subscription and resumed by the next
/// call, so dropping a `next()` future loses no event.
pub struct Subscription {
    /// The cursor, when no step is in flight.
    cursor: Option<Box<Cursor>>,
    /// The step in flight, which owns the cursor until it completes.
    step: Option<Step>,
    position: Position,
    noop_waker: Waker,
}

type Step = Pin<Box<dyn Future<Output = StepOutput> + Send>>;
type StepOutput = (Box<Cursor>, Result<Delivery, SubscriptionError>);

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("position", &self.position)
            .field("in_flight", &self.step.is_some())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// Sets how many events one catch-up read asks for (default
    /// [`DEFAULT_PAGE_SIZE`]; 0 is taken as 1). Takes effect from the next
    /// read.
    pub fn with_page_size(mut self, page_size: usize) -> Self {
        if let Some(cursor) = &mut self.cursor {
            cursor.page_size = page_size.max(1);
        }
        self
    }

    /// The position through which the consumer has been handed every
    /// matching event: the last delivered event's position, or further when
    /// the events after it did not pass the filter.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Whether the store's live feed closed and every event was delivered
    /// (the last delivery was the end, and every later one is too).
    pub(crate) fn ended(&self) -> bool {
        // While a step is in flight it owns the cursor: not ended, or the
        // step would have completed with the end at once.
        self.cursor
            .as_ref()
            .is_some_and(|cursor| matches!(cursor.mode, Mode::Ended))
    }

    /// The next matching event, in position order; `None` once the store's
    /// live feed closed and every event was delivered.
    ///
    /// # Errors
    /// [`SubscriptionError::Read`] when a catch-up read failed; calling again
    /// retries from the same position.
    pub async fn next(&mut self) -> Option<Result<RecordedEvent, SubscriptionError>> {
        std::future::poll_fn(|cx| self.poll_event(cx)).await
    }

    /// The next delivery, including progress through filtered-out events.
    pub(crate) async fn next_delivery(&mut self) -> Result<Delivery, SubscriptionError> {
        std::future::poll_fn(|cx| self.poll_delivery(cx)).await
    }

    /// The next delivery if it is ready without waiting (already buffered,
    /// or the store answered at once); `None` otherwise. A step it started
    /// stays in flight for the next call.
    pub(crate) fn try_next_delivery(&mut self) -> Option<Result<Delivery, SubscriptionError>> {
        let waker = self.noop_waker.clone();
        let mut cx = Context::from_waker(&waker);
        match self.poll_delivery(&mut cx) {
            Poll::Ready(delivery) => Some(delivery),
            Poll::Pending => None,
        }
    }

    /// Moves up to `max` matching events that the subscription already holds
    /// (read with the last catch-up page or live commit) into `out`, in
    /// order, without reading the store or waiting; returns how many. The
    /// projection actor takes its batches this way: one call per batch
    /// instead of one delivery, with its boxed step, per event.
    pub(crate) fn take_buffered(&mut self, max: usize, out: &mut VecDeque<RecordedEvent>) -> usize {
        // While a step is in flight it owns the cursor, and with it the
        // buffer: the events must then come from that step first.
        let Some(cursor) = &mut self.cursor else {
            return 0;
        };
        let count = max.min(cursor.buffer.len());
        let Some(last) = count
            .checked_sub(1)
            .map(|last| cursor.buffer[last].position)
        else {
            return 0;
        };
        if cfg!(debug_assertions) {
            let mut previous = cursor.delivered;
            for event in cursor.buffer.range(..count) {
                assert!(
                    event.position > previous,
                    "subscription positions must strictly increase: {} after {previous}",
                    event.position,
                );
                previous = event.position;
            }
        }
        if out.is_empty() && count == cursor.buffer.len() {
            std::mem::swap(out, &mut cursor.buffer);
        } else {
            out.extend(cursor.buffer.drain(..count));
        }
        cursor.delivered = last;
        cursor.reported = last;
        self.position = last;
        count
    }

    fn poll_delivery(&mut self, cx: &mut Context<'_>) -> Poll<Result<Delivery, SubscriptionError>> {
        let step = match &mut self.step {
            Some(step) => step,
            None => {
                let cursor = self
                    .cursor
                    .take()
                    .expect("a subscription holds its cursor or a step in flight");
                self.step.insert(Box::pin(cursor.step()))
            }
        };
        let (cursor, result) = ready!(step.as_mut().poll(cx));
        self.step = None;
        self.cursor = Some(cursor);
        match &result {
            Ok(Delivery::Event(event)) => self.position = event.position,
            Ok(Delivery::Passed(position)) => self.position = *position,
            Ok(Delivery::End) | Err(_) => {}
        }
        Poll::Ready(result)
    }

    fn poll_event(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<RecordedEvent, SubscriptionError>>> {
        loop {
            return Poll::Ready(match ready!(self.poll_delivery(cx)) {
                Ok(Delivery::Event(event)) => Some(Ok(event)),
                Ok(Delivery::Passed(_)) => continue,
                Ok(Delivery::End) => None,
                Err(error) => Some(Err(error)),
            });
        }
    }
}

impl futures_core::Stream for Subscription {
    type Item = Result<RecordedEvent, SubscriptionError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_event(cx)
    }
}

struct NoopWake;

impl Wake for NoopWake {
    fn wake(self: Arc<Self>) {}
}

enum Mode {
    /// Reading the store up to `head`, the head read after (re)subscribing.
    CatchUp { head: Position },
    /// Taking commits from the live feed.
    Live,
    /// The feed closed and the last catch-up is done.
    Ended,
}

/// The subscription's state, owned by the step in flight.
struct Cursor {
    store: Arc<dyn EventStore>,
    filter: EventFilter,
    feed: LiveFeed,
    /// Every event at or below `checked` was examined: delivered, buffered,
    /// or filtered out.
    checked: Position,
    /// The last position reported to the consumer (event or progress).
    reported: Position,
    /// The last event delivered, to check the order in debug builds.
    delivered: Position,
    /// Matching events examined but not yet delivered, in order.
    buffer: VecDeque<RecordedEvent>,
    mode: Mode,
    /// The live feed closed: finish with one last catch-up, then end.
    closing: bool,
    page_size: usize,
}

impl Cursor {
    async fn step(mut self: Box<Self>) -> StepOutput {
        let result = self.next_delivery().await;
        (self, result)
    }

    async fn next_delivery(&mut self) -> Result<Delivery, SubscriptionError> {
        loop {
            if let Some(event) = self.buffer.pop_front() {
                debug_assert!(
                    event.position > self.delivered,
                    "subscription positions must strictly increase: {} after {}",
                    event.position,
                    self.delivered
                );
                self.delivered = event.position;
                self.reported = event.position;
                return Ok(Delivery::Event(event));
            }
            if self.checked > self.reported {
                self.reported = self.checked;
                return Ok(Delivery::Passed(self.checked));
            }
            match self.mode {
                Mode::Ended => return Ok(Delivery::End),
                Mode::CatchUp { head } => {
                    if self.checked >= head {
                        self.mode = if self.closing {
                            Mode::Ended
                        } else {
                            Mode::Live
                        };
                        continue;
                    }
                    self.read_page(head).await?;
                }
                Mode::Live => match self.feed.recv().await {
                    Ok(commit) => self.take_commit(&commit),
                    Err(FeedError::Lagged(dropped)) => {
                        debug!(dropped, checked = %self.checked, "live feed lagged; catching up from the store");
                        self.restart_catch_up();
                    }
                    Err(FeedError::Closed) => {
                        debug!("live feed closed; delivering what remains in the store");
                        self.closing = true;
                        self.mode = Mode::CatchUp {
                            head: self.store.head_position(),
                        };
                    }
                },
            }
        }
    }

    /// Reads one page after `checked`, keeping the events up to `head`.
    /// State changes only once the read succeeded, so a failed read is
    /// retried from the same place.
    async fn read_page(&mut self, head: Position) -> Result<(), SubscriptionError> {
        let mut page = self
            .store
            .read_all(
                self.checked.next(),
                ReadDirection::Forward,
                self.page_size,
                &self.filter,
            )
            .await?;
        // A short page means the read reached the end of the log, which is
        // at or beyond `head`; a full page was examined up to its last event.
        let scanned = match page.last() {
            Some(last) if page.len() >= self.page_size => last.position.min(head),
            _ => head,
        };
        // Positions increase along the page, all after `checked` (the read
        // started there): keep those up to `head`.
        page.truncate(page.partition_point(|event| event.position <= head));
        // Only called once the buffer ran dry, so the page replaces it and
        // its allocation is reused instead of moving each event.
        debug_assert!(self.buffer.is_empty(), "a page read over buffered events");
        self.buffer = VecDeque::from(page);
        self.checked = scanned;
        Ok(())
    }

    fn take_commit(&mut self, commit: &[RecordedEvent]) {
        let (Some(first), Some(last)) = (commit.first(), commit.last()) else {
            return;
        };
        if last.position <= self.checked {
            return; // already read during catch-up
        }
        if first.position > self.checked.next() {
            // Cannot happen while the store moves its head before publishing;
            // if a backend ever breaks that rule, re-read rather than skip.
            warn!(
                checked = %self.checked,
                first = %first.position,
                "live feed skipped positions; catching up from the store"
            );
            self.restart_catch_up();
            return;
        }
        for event in commit {
            if event.position > self.checked
                && self
                    .filter
                    .matches(event.stream_id.as_str(), &event.event_type)
            {
                self.buffer.push_back(event.clone());
            }
        }
        self.checked = last.position;
    }

    /// Resubscribes first, then reads the head: the same order as at the
    /// start, so the catch-up and the new feed meet without a gap.
    fn restart_catch_up(&mut self) {
        self.feed = self.store.subscribe_live();
        self.mode = Mode::CatchUp {
            head: self.store.head_position(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ExpectedVersion, NewEvent, StreamId};
    use crate::store::memory::MemoryStore;

    async fn append(store: &dyn EventStore, stream: &str) -> Position {
        store
            .append(
                &StreamId::new(stream).unwrap(),
                ExpectedVersion::Any,
                vec![NewEvent::new("Happened", Vec::new())],
            )
            .await
            .unwrap()
            .last_position
    }

    #[tokio::test]
    async fn buffered_events_are_taken_in_batches_without_gap_or_repeat() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let mut appended = Vec::new();
        for stream in ["user-1", "order-1", "user-2", "user-3", "user-4", "order-2"] {
            appended.push(append(&*store, stream).await);
        }
        let mut subscription = subscribe(
            Arc::clone(&store),
            Position::START,
            EventFilter::Category("user".into()),
        )
        .with_page_size(3);
        let mut out = VecDeque::new();
        assert_eq!(
            subscription.take_buffered(10, &mut out),
            0,
            "nothing read yet"
        );
        // A page is 3 matching events: positions 1, 3 and 4.
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Event(e)) if e.position == appended[0])
        );
        assert_eq!(subscription.take_buffered(1, &mut out), 1);
        assert_eq!(subscription.position(), appended[2]);
        assert_eq!(subscription.take_buffered(10, &mut out), 1);
        assert_eq!(subscription.position(), appended[3]);
        assert_eq!(subscription.take_buffered(10, &mut out), 0);
        // The next page is short: position 5, then 6 is filtered out.
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Event(e)) if e.position == appended[4])
        );
        assert_eq!(subscription.take_buffered(10, &mut out), 0);
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Passed(p)) if p == appended[5])
        );
        let taken: Vec<_> = out.iter().map(|e| e.position).collect();
        assert_eq!(taken, [appended[2], appended[3]]);
        // Live commits are buffered the same way.
        let live = append(&*store, "user-5").await;
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Event(e)) if e.position == live)
        );
        assert_eq!(subscription.take_buffered(10, &mut out), 0);
        assert_eq!(subscription.position(), live);
    }

    #[tokio::test]
    async fn filtered_out_tails_are_reported_as_passed_in_catch_up_and_live() {
        let store: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
        let user = append(&*store, "user-1").await;
        let order = append(&*store, "order-1").await;
        let mut subscription = subscribe(
            Arc::clone(&store),
            Position::START,
            EventFilter::Category("user".into()),
        )
        .with_page_size(1);
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Event(e)) if e.position == user)
        );
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Passed(p)) if p == order)
        );
        assert!(
            subscription.try_next_delivery().is_none(),
            "nothing more yet"
        );
        let live_order = append(&*store, "order-2").await;
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Passed(p)) if p == live_order)
        );
        let live_user = append(&*store, "user-2").await;
        assert!(
            matches!(subscription.next_delivery().await, Ok(Delivery::Event(e)) if e.position == live_user)
        );
        assert_eq!(subscription.position(), live_user);
    }
}
