//! The live feed across processes. The store publishes every committed
//! event, its own and other processes', in position order, from one cursor
//! (`published`). Its own commits are published by the writer before the
//! append is answered; other processes' commits are read from the table by
//! a poller, woken by LISTEN/NOTIFY or every `poll_interval`. A
//! notification carries nothing (the events are always read from the
//! table), so a lost notification or a dropped LISTEN connection delays
//! events by at most one poll interval and loses none.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{watch, Mutex, Notify};
use tokio_postgres::{AsyncMessage, NoTls};
use tracing::{debug, warn};

use super::reads::read_after;
use super::schema::Statements;
use crate::error::StoreError;
use crate::event::{Position, RecordedEvent};
use crate::store::{LiveFeed, LivePublisher};

/// Events read per page when catching up.
const PAGE: usize = 1024;

/// The publishing side of the store's feed.
#[derive(Debug)]
pub(super) struct Feed {
    publisher: LivePublisher,
    /// The last position published. Held across the reads that fill a gap,
    /// so the writer and the poller publish one after the other, in order.
    published: Mutex<u64>,
    pool: Pool,
    statements: Arc<Statements>,
}

impl Feed {
    pub(super) fn new(capacity: usize, head: u64, pool: Pool, statements: Arc<Statements>) -> Self {
        Self {
            publisher: LivePublisher::new(capacity, Position(head)),
            published: Mutex::new(head),
            pool,
            statements,
        }
    }

    pub(super) fn head(&self) -> Position {
        self.publisher.head()
    }

    pub(super) fn subscribe(&self) -> LiveFeed {
        self.publisher.subscribe()
    }

    pub(super) fn close(&self) {
        self.publisher.close();
    }

    /// Publishes every committed event after the last published one, up to
    /// the committed head (or up to `until`, when given), page by page.
    async fn publish_committed(
        &self,
        published: &mut u64,
        until: Option<u64>,
    ) -> Result<(), StoreError> {
        loop {
            let limit = match until {
                Some(until) if until <= *published => return Ok(()),
                Some(until) => PAGE.min((until - *published) as usize),
                None => PAGE,
            };
            let page = read_after(&self.pool, &self.statements, *published, limit).await?;
            let Some(last) = page.last() else {
                return Ok(());
            };
            *published = last.position.0;
            let full = page.len() == limit;
            self.publisher.publish(page.into());
            if !full && until.is_none() {
                return Ok(());
            }
        }
    }

    /// Publishes other processes' commits that are not published yet.
    pub(super) async fn catch_up(&self) -> Result<(), StoreError> {
        let mut published = self.published.lock().await;
        self.publish_committed(&mut published, None).await
    }

    /// Publishes this store's own commit, after the events of other
    /// processes committed before it (they are committed: the writer read the
    /// head under the lock). If those cannot be read now, the commit is left
    /// to the poller, which publishes everything in order once it can.
    pub(super) async fn publish_own(&self, committed: Vec<RecordedEvent>) {
        let Some(first) = committed.first().map(|e| e.position.0) else {
            return;
        };
        let mut published = self.published.lock().await;
        if first > *published + 1 {
            let filled = self
                .publish_committed(&mut published, Some(first - 1))
                .await
                .and_then(|()| reached(*published, first - 1));
            if let Err(error) = filled {
                warn!(%error, "cannot publish other processes' events; the poller will");
                return;
            }
        }
        let unpublished: Vec<RecordedEvent> = committed
            .into_iter()
            .filter(|event| event.position.0 > *published)
            .collect();
        if let Some(last) = unpublished.last() {
            *published = last.position.0;
            self.publisher.publish(unpublished.into());
        }
    }
}

/// `Ok` when the feed published through `target`.
fn reached(published: u64, target: u64) -> Result<(), StoreError> {
    if published >= target {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "positions {}..={target} are below the head but not readable",
            published + 1
        )))
    }
}

/// Wakes the poller on every notification of the store's channel, on a
/// connection of its own (LISTEN needs one that stays open), reconnecting
/// with a pause when it drops. Stops when `stop` turns true.
pub(super) async fn listen(
    config: tokio_postgres::Config,
    channel: String,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let pause = Duration::from_millis(200);
    while !*stop.borrow() {
        let (client, mut connection) = match config.connect(NoTls).await {
            Ok(pair) => pair,
            Err(error) => {
                debug!(%error, "feed: cannot connect to listen; polling only meanwhile");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let messages = async {
            while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(_)) => wake.notify_one(),
                    Ok(_) => {}
                    Err(error) => {
                        debug!(%error, "feed: the listening connection failed");
                        break;
                    }
                }
            }
        };
        let subscribe = async {
            if let Err(error) = client.batch_execute(&format!("LISTEN {channel}")).await {
                debug!(%error, "feed: LISTEN failed");
            }
            // Whatever was committed before LISTEN took effect is read now.
            wake.notify_one();
            std::future::pending::<()>().await
        };
        tokio::select! {
            () = messages => {}
            () = subscribe => {}
            _ = stop.changed() => return,
        }
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Publishes other processes' commits: on each wake-up, and every
/// `interval` in case a notification was lost. Stops when `stop` turns true.
pub(super) async fn poll(
    feed: Arc<Feed>,
    wake: Arc<Notify>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        if let Err(error) = feed.catch_up().await {
            debug!(%error, "feed: catch-up read failed; trying again");
        }
        tokio::select! {
            () = wake.notified() => {}
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
    }
}
