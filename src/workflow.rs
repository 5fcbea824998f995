//! Workflows across aggregates and out of the process.
//!
//! - Process managers ([`ProcessManager`]): react to events of the log,
//!   keep per-instance state, decide commands purely, and have the runtime
//!   send each of them exactly once ([`crate::Runtime::start_workflow`]),
//!   with durable timers and a failure policy. Decisions are recorded in
//!   the log itself, in the instance's stream `NAME-<instance>`, before any
//!   command goes out; see docs/design.md, "Process managers".
//! - The outbox relay ([`Relay`]), which publishes the committed log, in
//!   position order and from a durable checkpoint, to a broker (NATS
//!   JetStream) for other services.

mod process;
mod relay;
mod runner;

pub use self::process::{FailurePolicy, Input, OnFailure, ProcessManager, Reaction, Sent, WakeAt};
pub use self::relay::{
    subject_token, EventSink, JetStreamError, JetStreamSink, JetStreamStream, Relay, RelayConfig,
    RelayError, RelayState, RelayStatus, HEADER_CAUSATION_ID, HEADER_CORRELATION_ID,
    HEADER_EVENT_TYPE, HEADER_MESSAGE_ID, HEADER_POSITION, HEADER_RECORDED_AT_MICROS,
    HEADER_SCHEMA_VERSION, HEADER_STREAM_ID, HEADER_VERSION, RELAY_CHECKPOINT_PREFIX,
};
pub(crate) use self::runner::{same_name, start};
pub use self::runner::{
    WorkflowConfig, WorkflowError, WorkflowHandle, WorkflowState, WorkflowStatus, STEP_EVENT_TYPE,
    WORKFLOW_CHECKPOINT_PREFIX,
};
