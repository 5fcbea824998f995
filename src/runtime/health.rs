//! [`Runtime::health`]: a snapshot of what an operator's health check asks
//! (can the store take writes, are the projections running and how far
//! behind, what went wrong last), as plain data that a service returns from
//! its own health endpoint. Taking it reads memory only: no I/O, no await.

use std::fmt;

use crate::projection::{ProjectionState, ProjectionStatus};
use crate::runtime::{lock, Runtime, RuntimeStore};
use crate::store::WriterStatus;

/// A runtime's health at one moment, from [`Runtime::health`].
///
/// [`Health::is_healthy`] is the usual verdict (writable store, no failed
/// projection, not shut down); the fields say why, for a health endpoint to
/// serve as they are. Lag has no verdict here: how far behind is too far is
/// the service's call ([`Health::max_projection_lag`] helps).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Health {
    /// Whether the store takes writes.
    pub store: StoreHealth,
    /// Every projection the runtime owns ([`Runtime::start_projection`],
    /// [`Runtime::adopt`]), with its state, position and lag behind the
    /// store's head now.
    pub projections: Vec<ProjectionStatus>,
    /// Aggregate actors taking commands.
    pub live_aggregates: usize,
    /// Whether [`Runtime::shutdown`] has begun.
    pub shut_down: bool,
    /// The most recent infrastructure error the runtime saw: a failed
    /// append, a panic in an aggregate, a store or codec error answered to
    /// a command. Domain refusals, conflicts, timeouts and overloads are not
    /// errors of the system and do not appear here (they are counted in
    /// `annals_commands_total`).
    pub last_error: Option<ObservedError>,
}

/// Whether the store takes writes, as far as the runtime can tell without
/// writing.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreHealth {
    /// What the store says of its writer ([`crate::EventStore::writer_status`]):
    /// on the sled store, whether its writer thread runs and is not poisoned.
    pub writer: WriterStatus,
    /// Whether the last append the runtime's aggregates made failed in the
    /// store (cleared by the next one that succeeds). Appends made directly
    /// on the store are not seen.
    pub last_append_failed: bool,
    /// Appends of the runtime's aggregates that failed in the store since
    /// the runtime started.
    pub failed_appends: u64,
    /// The most recent of those failures.
    pub last_append_failure: Option<ObservedError>,
    /// The store's head position now.
    pub head: crate::Position,
}

impl StoreHealth {
    /// The writer takes writes, and the last append did not fail.
    pub fn is_writable(&self) -> bool {
        self.writer.is_writable() && !self.last_append_failed
    }
}

impl Health {
    /// The store is writable, no owned projection has failed or stopped
    /// while the runtime runs, and the runtime is not shut down.
    pub fn is_healthy(&self) -> bool {
        !self.shut_down
            && self.store.is_writable()
            && self.projections.iter().all(|projection| {
                matches!(
                    projection.state,
                    ProjectionState::Running | ProjectionState::Paused
                )
            })
    }

    /// The largest lag of the owned projections (0 when there is none).
    pub fn max_projection_lag(&self) -> u64 {
        self.projections
            .iter()
            .map(|projection| projection.lag)
            .max()
            .unwrap_or(0)
    }
}

impl<S: ?Sized + RuntimeStore> Runtime<S> {
    /// The runtime's health now: the store's writer, the last append's
    /// outcome, each owned projection's status and lag, live aggregates,
    /// the last error. Answers at once from memory (no I/O), so a health
    /// endpoint may call it on every request.
    pub fn health(&self) -> Health {
        let core = &self.core;
        let watch = core.metrics.watch();
        let projections = lock(&core.services)
            .iter()
            .map(crate::ProjectionHandle::status)
            .collect();
        Health {
            store: StoreHealth {
                writer: self.store.writer_status(),
                last_append_failed: watch.last_append_failed(),
                failed_appends: watch.failed_appends(),
                last_append_failure: watch.last_append_failure(),
                head: self.store.head_position(),
            },
            projections,
            live_aggregates: core.registry.live(),
            shut_down: core.registry.is_shut_down(),
            last_error: watch.last_error(),
        }
    }
}

/// An error as the runtime's health reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ObservedError {
    /// The error's message.
    pub message: String,
    /// When it was seen.
    pub at: std::time::SystemTime,
}

impl ObservedError {
    pub(crate) fn now(error: &dyn fmt::Display) -> Self {
        Self {
            message: error.to_string(),
            at: std::time::SystemTime::now(),
        }
    }
}
