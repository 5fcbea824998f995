//! A failing store under the runtime (the crate's `FaultyStore`): rejected
//! appends, lost acknowledgements (committed but reported failed), failed
//! reads and snapshot writes. An acknowledged command is stored exactly
//! once, a refused one never, and once the store heals every actor agrees
//! with a full replay.

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use annals::codec::decode_event;
use annals::store::ReadDirection;
use annals::testing::{FaultPlan, FaultyStore};
use annals::{CommandError, EventStore, MemoryStore, Runtime, RuntimeConfig, StreamId, Version};
use common::{Ledger, LedgerCommand as C, LedgerError, LedgerEvent};

#[derive(Default, Debug)]
struct Outcomes {
    acknowledged: Vec<u64>,
    refused: usize,
    unknown: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commands_are_stored_once_and_refusals_never() {
    let memory: Arc<dyn EventStore> = Arc::new(MemoryStore::new());
    let mut plan = FaultPlan::default();
    plan.append_rejected = 0.1;
    plan.append_ack_lost = 0.1;
    plan.read_failed = 0.05;
    plan.write_failed = 0.3;
    plan.max_delay = Duration::from_micros(200);
    plan.seed = 42;
    let faulty = Arc::new(FaultyStore::new(memory.clone(), plan));
    let runtime = Runtime::new(
        faulty.clone(),
        RuntimeConfig::builder().snapshot_every(5).build().unwrap(),
    );
    let handle = runtime.aggregates::<Ledger>();

    let mut joins = Vec::new();
    for ledger in 0..16u64 {
        let handle = handle.clone();
        joins.push(tokio::spawn(async move {
            let id = ledger.to_string();
            let mut outcomes = Outcomes::default();
            loop {
                match handle.execute(&id, C::Open).await {
                    Ok(_) | Err(CommandError::Domain(LedgerError::AlreadyOpen)) => break,
                    Err(_) => {} // unknown outcome: try again, the rules decide
                }
            }
            for i in 0..30 {
                let amount = ledger * 1000 + i + 1;
                match handle.execute(&id, C::Deposit(amount)).await {
                    Ok(executed) => {
                        assert_eq!(executed.events, vec![LedgerEvent::Deposited { amount }]);
                        outcomes.acknowledged.push(amount);
                    }
                    Err(CommandError::Domain(error)) => panic!("{error}"),
                    Err(_) => outcomes.unknown += 1,
                }
                match handle.execute(&id, C::Withdraw(u64::MAX / 2)).await {
                    Ok(_) => panic!("an impossible withdrawal was accepted"),
                    Err(CommandError::Domain(LedgerError::InsufficientFunds { .. })) => {
                        outcomes.refused += 1
                    }
                    Err(_) => outcomes.unknown += 1,
                }
            }
            (ledger, outcomes)
        }));
    }
    let mut outcomes = HashMap::new();
    for join in joins {
        let (ledger, ledger_outcomes) = join.await.unwrap();
        outcomes.insert(ledger, ledger_outcomes);
    }
    let counts = faulty.counts();
    assert!(
        counts.acks_lost > 0 && counts.appends_rejected > 0 && counts.reads_failed > 0,
        "{counts:?}"
    );
    faulty.heal();

    let fresh = Runtime::new(
        memory.clone(),
        RuntimeConfig::builder().snapshot_every(0).build().unwrap(),
    );
    for (ledger, outcome) in &outcomes {
        let stream = StreamId::new(format!("ledger-{ledger}")).unwrap();
        let stored = memory
            .read_stream(&stream, Version::FIRST, ReadDirection::Forward, 10_000)
            .await
            .unwrap();
        let mut deposited: Vec<u64> = Vec::new();
        for recorded in &stored {
            match decode_event::<LedgerEvent>(recorded).unwrap() {
                LedgerEvent::Deposited { amount } => deposited.push(amount),
                LedgerEvent::Opened => assert_eq!(recorded.version, Version(1)),
                other => panic!("ledger {ledger}: {other:?} stored"),
            }
        }
        for amount in &outcome.acknowledged {
            assert_eq!(
                deposited.iter().filter(|a| *a == amount).count(),
                1,
                "{amount}"
            );
        }
        let mut unique = deposited.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique, deposited, "no deposit stored twice, all in order");
        assert!(deposited.len() <= outcome.acknowledged.len() + outcome.unknown);
        assert!(outcome.refused > 0);

        // The live actor (which lost acknowledgements) and a full replay agree.
        let id = ledger.to_string();
        let live = handle.state(&id).await.unwrap();
        let replayed = fresh.aggregates::<Ledger>().state(&id).await.unwrap();
        assert_eq!(live, replayed, "ledger {ledger}");
        assert_eq!(live.balance, deposited.iter().sum::<u64>());
        // And it keeps working.
        handle.execute(&id, C::Deposit(1)).await.unwrap();
    }
    runtime.shutdown().await.unwrap();
}
