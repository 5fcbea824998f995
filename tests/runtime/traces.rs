//! Tracing: one span per command, named `command`, with the stream id and
//! the resulting version.

use crate::common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use annals::{MemoryStore, Runtime, RuntimeConfig};
use common::{Ledger, LedgerCommand as C};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};

/// The fields of every `command` span, by span id.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<HashMap<u64, HashMap<String, String>>>>);

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.to_string());
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(&self, attributes: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attributes.metadata().name() == "command" {
            let mut fields = HashMap::new();
            attributes.record(&mut Fields(&mut fields));
            self.0.lock().unwrap().insert(id.into_u64(), fields);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(fields) = self.0.lock().unwrap().get_mut(&id.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn each_command_has_a_span_with_its_stream_and_resulting_version() {
    let spans = Spans::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let runtime = Runtime::new(Arc::new(MemoryStore::new()), RuntimeConfig::default());
    let handle = runtime.aggregates::<Ledger>();
    handle.execute("9", C::Open).await.unwrap();
    handle.execute("9", C::DepositTwice(1)).await.unwrap();
    handle.execute("9", C::Withdraw(100)).await.unwrap_err();
    runtime.shutdown().await.unwrap();

    let recorded = spans.0.lock().unwrap();
    let mut seen: Vec<(String, Option<String>)> = recorded
        .values()
        .map(|fields| (fields["stream"].clone(), fields.get("version").cloned()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("ledger-9".to_owned(), None), // refused: no version
            ("ledger-9".to_owned(), Some("1".to_owned())),
            ("ledger-9".to_owned(), Some("3".to_owned())),
        ]
    );
}
