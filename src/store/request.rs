//! The request–reply path to a backend's writer task, shared by the sled
//! and PostgreSQL stores: a request carries a `oneshot` reply port, and a
//! writer that is gone (shut down) is [`StoreError::Closed`].

use tokio::sync::{mpsc, oneshot};

use crate::error::StoreError;

/// Sends the request `build` makes around a reply port to the writer
/// behind `sender` and waits for its answer. A writer that no longer takes
/// requests, or drops the port without answering, is
/// [`StoreError::Closed`].
pub(crate) async fn ask<R, T, E: From<StoreError>>(
    sender: &mpsc::Sender<R>,
    build: impl FnOnce(oneshot::Sender<Result<T, E>>) -> R,
) -> Result<T, E> {
    let (reply, answer) = oneshot::channel();
    sender
        .send(build(reply))
        .await
        .map_err(|_| StoreError::Closed)?;
    answer.await.map_err(|_| StoreError::Closed)?
}
