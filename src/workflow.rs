//! Workflows across aggregates and out of the process. For now this holds
//! the outbox relay, which publishes the committed log, in position order and
//! from a durable checkpoint, to a broker (NATS JetStream) for other services.

mod relay;

pub use self::relay::{
    subject_token, EventSink, JetStreamError, JetStreamSink, JetStreamStream, Relay, RelayConfig,
    RelayError, RelayState, RelayStatus, HEADER_CAUSATION_ID, HEADER_CORRELATION_ID,
    HEADER_EVENT_TYPE, HEADER_MESSAGE_ID, HEADER_POSITION, HEADER_RECORDED_AT_MICROS,
    HEADER_SCHEMA_VERSION, HEADER_STREAM_ID, HEADER_VERSION, RELAY_CHECKPOINT_PREFIX,
};
