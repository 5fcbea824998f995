//! How to open a [`PostgresStore`](crate::store::PostgresStore): where the server
//! is, which schema holds the store, and the limits of its writer and feed.

use std::time::Duration;

use crate::error::{at_least_one, InvalidInput};
use crate::event::DEFAULT_MAX_EVENT_SIZE;
use crate::store::DEFAULT_LIVE_FEED_CAPACITY;

/// The longest schema name accepted, in bytes. PostgreSQL truncates
/// identifiers at 63 bytes; the store's notification channel adds a prefix.
pub const MAX_SCHEMA_NAME_LEN: usize = 48;

/// How to open a [`PostgresStore`](crate::store::PostgresStore).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// The server, as a `postgresql://user@host:port/database` URL or a
    /// `host=... user=... dbname=...` string (tokio-postgres's syntax).
    pub url: String,
    /// The schema that holds the store's tables, created by `open` if
    /// missing, so that one database can host several stores. Lowercase
    /// ASCII letters, digits and `_`, starting with a letter or `_`, at most
    /// [`MAX_SCHEMA_NAME_LEN`] bytes. Default `annals`.
    pub schema: String,
    /// Connections the store keeps open for its writer, its feed and its
    /// readers (the feed's LISTEN connection comes on top). Default 8.
    pub pool_size: usize,
    /// The largest event accepted, in bytes. Default 1 MiB.
    pub max_event_size: usize,
    /// Commits kept for slow live subscribers before they lag. Default 4096.
    pub live_feed_capacity: usize,
    /// Appends waiting for the writer before `append` waits for room.
    /// Default 65,536.
    pub queue_capacity: usize,
    /// The most appends one transaction takes. Default 4,096. A group also
    /// stops at 32 MiB of events.
    pub max_group_commit: usize,
    /// How often the feed reads the head when no notification arrived: the
    /// longest a lost notification delays other processes' events here.
    /// Default 250 ms.
    pub poll_interval: Duration,
    /// How long to wait for a connection (opening one or from the pool)
    /// before an operation fails. Default 10 s.
    pub connect_timeout: Duration,
    /// How many times a write transaction that failed for a transient
    /// reason (a lost connection, a serialization failure, a deadlock, a
    /// unique violation) is tried again before its appends get the error.
    /// Default 5.
    pub retries: u32,
    /// How long a write transaction waits for a lock (the head row, which
    /// every append transaction of every process locks) before it gives up
    /// (PostgreSQL's `lock_timeout`), so that a hung session holding the
    /// lock cannot stall the writer forever: the group is retried (see
    /// [`PostgresConfig::retries`]) and then answered with
    /// [`StoreError::Busy`](crate::StoreError::Busy), nothing written.
    /// Default 2 s.
    pub lock_timeout: Duration,
}

impl PostgresConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            schema: "annals".to_owned(),
            pool_size: 8,
            max_event_size: DEFAULT_MAX_EVENT_SIZE,
            live_feed_capacity: DEFAULT_LIVE_FEED_CAPACITY,
            queue_capacity: 65_536,
            max_group_commit: 4_096,
            poll_interval: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(10),
            retries: 5,
            lock_timeout: Duration::from_secs(2),
        }
    }

    /// Sets the schema that holds the store.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Sets how many pooled connections the store keeps.
    pub fn pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections;
        self
    }

    /// Sets the largest event accepted, in bytes.
    pub fn max_event_size(mut self, bytes: usize) -> Self {
        self.max_event_size = bytes;
        self
    }

    /// Sets how many commits the live feed keeps for slow subscribers.
    pub fn live_feed_capacity(mut self, commits: usize) -> Self {
        self.live_feed_capacity = commits;
        self
    }

    /// Sets how many appends may wait for the writer.
    pub fn queue_capacity(mut self, appends: usize) -> Self {
        self.queue_capacity = appends;
        self
    }

    /// Sets the most appends one transaction takes.
    pub fn max_group_commit(mut self, appends: usize) -> Self {
        self.max_group_commit = appends;
        self
    }

    /// Sets how often the feed polls without a notification.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets how long to wait for a connection.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how many times a transiently failed write transaction is retried.
    pub fn retries(mut self, retries: u32) -> Self {
        self.retries = retries;
        self
    }

    /// Sets how long a write transaction waits for a lock (at least 1 ms).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Checks the settings [`PostgresStore::open`](crate::store::PostgresStore::open)
    /// needs: the schema name's syntax and every size, count and interval at
    /// least 1.
    ///
    /// # Errors
    /// [`InvalidInput::EmptyName`], [`InvalidInput::NameTooLong`] or
    /// [`InvalidInput::InvalidCharacter`] for the schema name;
    /// [`InvalidInput::TooSmall`] naming the first setting below its minimum.
    pub fn validate(&self) -> Result<(), InvalidInput> {
        validate_schema_name(&self.schema)?;
        at_least_one("pool_size", self.pool_size as u64)?;
        at_least_one("max_event_size", self.max_event_size as u64)?;
        at_least_one("live_feed_capacity", self.live_feed_capacity as u64)?;
        at_least_one("queue_capacity", self.queue_capacity as u64)?;
        at_least_one("max_group_commit", self.max_group_commit as u64)?;
        at_least_one("poll_interval_ms", self.poll_interval.as_millis() as u64)?;
        at_least_one(
            "connect_timeout_ms",
            self.connect_timeout.as_millis() as u64,
        )?;
        at_least_one("lock_timeout_ms", self.lock_timeout.as_millis() as u64)?;
        Ok(())
    }
}

/// A schema name is spliced into SQL text (identifiers cannot be bound as
/// parameters), so only a plain lowercase identifier is accepted: it then
/// needs no quoting and cannot change the meaning of a statement.
fn validate_schema_name(name: &str) -> Result<(), InvalidInput> {
    const WHAT: &str = "schema name";
    if name.is_empty() {
        return Err(InvalidInput::EmptyName { what: WHAT });
    }
    if name.len() > MAX_SCHEMA_NAME_LEN {
        return Err(InvalidInput::NameTooLong {
            what: WHAT,
            len: name.len(),
            max: MAX_SCHEMA_NAME_LEN,
        });
    }
    for (index, character) in name.chars().enumerate() {
        let allowed = character.is_ascii_lowercase()
            || character == '_'
            || (index > 0 && character.is_ascii_digit());
        if !allowed {
            return Err(InvalidInput::InvalidCharacter {
                what: WHAT,
                character,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        let config = |schema: &str| PostgresConfig::new("host=localhost").schema(schema);
        assert!(config("orders_2").validate().is_ok());
        assert!(config("_x").validate().is_ok());
        assert_eq!(
            config("").validate(),
            Err(InvalidInput::EmptyName {
                what: "schema name"
            })
        );
        for (name, bad) in [("Orders", 'O'), ("2x", '2'), ("a;drop", ';'), ("a\"b", '"')] {
            assert_eq!(
                config(name).validate(),
                Err(InvalidInput::InvalidCharacter {
                    what: "schema name",
                    character: bad
                }),
                "{name}"
            );
        }
        let long = "a".repeat(MAX_SCHEMA_NAME_LEN + 1);
        assert!(matches!(
            config(&long).validate(),
            Err(InvalidInput::NameTooLong { .. })
        ));
    }

    #[test]
    fn zero_settings_are_refused() {
        let base = PostgresConfig::new("host=localhost");
        assert_eq!(
            base.clone().pool_size(0).validate(),
            Err(InvalidInput::TooSmall {
                what: "pool_size",
                value: 0,
                min: 1
            })
        );
        assert!(base.clone().max_group_commit(0).validate().is_err());
        assert!(base
            .clone()
            .poll_interval(Duration::ZERO)
            .validate()
            .is_err());
        assert!(base.validate().is_ok());
    }
}
