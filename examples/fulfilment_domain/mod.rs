//! The fulfilment domain shared by `examples/fulfilment.rs` and
//! `tests/workflow_crash.rs`: orders, stock and payments as three
//! aggregates, and one process manager that reserves stock, takes the
//! payment and ships; releases the stock and cancels the order when the
//! payment is refused; and voids the payment, releases and cancels when an
//! order is still unpaid after a timeout.
//!
//! The stock and payment aggregates do not refuse repeats on purpose: a
//! duplicated Reserve or Take would show in the log, which is what the
//! checks count.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::time::Duration;

use annals::workflow::{Input, ProcessManager, Reaction, Sent};
use annals::{Aggregate, Aggregates, CommandContext, DomainEvent, RecordedEvent, Runtime};
use serde::{Deserialize, Serialize};

/// Why a command was refused, for all three aggregates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub &'static str);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}
impl std::error::Error for Refusal {}

// ---------------------------------------------------------------- orders

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    Placed {
        sku: String,
        quantity: u32,
        amount: u64,
        card: bool,
    },
    Paid,
    Shipped,
    Cancelled {
        reason: String,
    },
}
impl DomainEvent for OrderEvent {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderCommand {
    Place {
        sku: String,
        quantity: u32,
        amount: u64,
        card: bool,
    },
    MarkPaid,
    Ship,
    Cancel {
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Order {
    pub placed: bool,
    pub paid: bool,
    pub shipped: bool,
    pub cancelled: bool,
}

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = Refusal;
    const CATEGORY: &'static str = "order";

    fn handle(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, Refusal> {
        match command {
            OrderCommand::Place { .. } if self.placed => Err(Refusal("already placed")),
            OrderCommand::Place {
                sku,
                quantity,
                amount,
                card,
            } => Ok(vec![OrderEvent::Placed {
                sku: sku.clone(),
                quantity: *quantity,
                amount: *amount,
                card: *card,
            }]),
            _ if !self.placed => Err(Refusal("no such order")),
            OrderCommand::MarkPaid if self.cancelled => Err(Refusal("cancelled")),
            OrderCommand::MarkPaid if self.paid => Ok(vec![]),
            OrderCommand::MarkPaid => Ok(vec![OrderEvent::Paid]),
            OrderCommand::Ship if !self.paid => Err(Refusal("not paid")),
            OrderCommand::Ship if self.shipped => Ok(vec![]),
            OrderCommand::Ship => Ok(vec![OrderEvent::Shipped]),
            OrderCommand::Cancel { .. } if self.paid => Err(Refusal("paid")),
            OrderCommand::Cancel { .. } if self.cancelled => Ok(vec![]),
            OrderCommand::Cancel { reason } => Ok(vec![OrderEvent::Cancelled {
                reason: reason.clone(),
            }]),
        }
    }

    fn apply(&mut self, event: &OrderEvent) {
        match event {
            OrderEvent::Placed { .. } => self.placed = true,
            OrderEvent::Paid => self.paid = true,
            OrderEvent::Shipped => self.shipped = true,
            OrderEvent::Cancelled { .. } => self.cancelled = true,
        }
    }
}

// ----------------------------------------------------------------- stock

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StockEvent {
    Restocked { quantity: u32 },
    Reserved { order: String, quantity: u32 },
    Released { order: String, quantity: u32 },
}
impl DomainEvent for StockEvent {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StockCommand {
    Restock { quantity: u32 },
    Reserve { order: String, quantity: u32 },
    Release { order: String },
}

/// One sku's stock. Reservations are not de-duplicated by order: a
/// repeated Reserve takes the stock twice (and shows in the checks).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stock {
    pub available: i64,
    pub reserved: BTreeMap<String, u32>,
}

impl Aggregate for Stock {
    type Command = StockCommand;
    type Event = StockEvent;
    type Error = Refusal;
    const CATEGORY: &'static str = "stock";

    fn handle(&self, command: &StockCommand) -> Result<Vec<StockEvent>, Refusal> {
        match command {
            StockCommand::Restock { quantity } => Ok(vec![StockEvent::Restocked {
                quantity: *quantity,
            }]),
            StockCommand::Reserve { quantity, .. } if i64::from(*quantity) > self.available => {
                Err(Refusal("out of stock"))
            }
            StockCommand::Reserve { order, quantity } => Ok(vec![StockEvent::Reserved {
                order: order.clone(),
                quantity: *quantity,
            }]),
            StockCommand::Release { order } => Ok(self
                .reserved
                .get(order)
                .map(|quantity| StockEvent::Released {
                    order: order.clone(),
                    quantity: *quantity,
                })
                .into_iter()
                .collect()),
        }
    }

    fn apply(&mut self, event: &StockEvent) {
        match event {
            StockEvent::Restocked { quantity } => self.available += i64::from(*quantity),
            StockEvent::Reserved { order, quantity } => {
                self.available -= i64::from(*quantity);
                *self.reserved.entry(order.clone()).or_default() += quantity;
            }
            StockEvent::Released { order, quantity } => {
                self.available += i64::from(*quantity);
                self.reserved.remove(order);
            }
        }
    }
}

// -------------------------------------------------------------- payments

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentEvent {
    Taken { amount: u64 },
    Voided,
}
impl DomainEvent for PaymentEvent {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PaymentCommand {
    Take { amount: u64 },
    Void,
}

/// One order's payment. A Take is not refused for having been taken
/// before (a card is charged each time): a repeat shows in the checks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Payment {
    pub taken: u32,
    pub voided: bool,
}

impl Aggregate for Payment {
    type Command = PaymentCommand;
    type Event = PaymentEvent;
    type Error = Refusal;
    const CATEGORY: &'static str = "payment";

    fn handle(&self, command: &PaymentCommand) -> Result<Vec<PaymentEvent>, Refusal> {
        match command {
            PaymentCommand::Take { .. } if self.voided => Err(Refusal("voided")),
            PaymentCommand::Take { amount } if amount % 10 == 0 => Err(Refusal("card declined")),
            PaymentCommand::Take { amount } => Ok(vec![PaymentEvent::Taken { amount: *amount }]),
            PaymentCommand::Void if self.taken > 0 => Err(Refusal("already taken")),
            PaymentCommand::Void if self.voided => Ok(vec![]),
            PaymentCommand::Void => Ok(vec![PaymentEvent::Voided]),
        }
    }

    fn apply(&mut self, event: &PaymentEvent) {
        match event {
            PaymentEvent::Taken { .. } => self.taken += 1,
            PaymentEvent::Voided => self.voided = true,
        }
    }
}

// ------------------------------------------------------ the process manager

/// A command of the workflow, to one of the three aggregates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Step {
    Reserve {
        sku: String,
        order: String,
        quantity: u32,
    },
    Release {
        sku: String,
        order: String,
    },
    TakePayment {
        order: String,
        amount: u64,
    },
    VoidPayment {
        order: String,
    },
    MarkPaid {
        order: String,
    },
    Ship {
        order: String,
    },
    Cancel {
        order: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    #[default]
    New,
    Reserving,
    /// Stock reserved; a card payment was sent, or a transfer is awaited.
    Paying,
}

/// One order's fulfilment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fulfilment {
    pub stage: Stage,
    pub order: String,
    pub sku: String,
    pub quantity: u32,
    pub amount: u64,
    pub card: bool,
}

/// The process manager: holds the aggregates' handles for `send`.
pub struct Fulfil {
    pub orders: Aggregates<Order>,
    pub stock: Aggregates<Stock>,
    pub payments: Aggregates<Payment>,
    /// How long an order may stay unpaid.
    pub timeout: Duration,
}

impl Fulfil {
    pub fn new<S: ?Sized + annals::runtime::RuntimeStore>(
        runtime: &Runtime<S>,
        timeout: Duration,
    ) -> Self {
        Self {
            orders: runtime.aggregates(),
            stock: runtime.aggregates(),
            payments: runtime.aggregates(),
            timeout,
        }
    }
}

/// The order id of a stream `category-id`.
fn id_of(event: &RecordedEvent) -> String {
    event
        .stream_id
        .as_str()
        .split_once('-')
        .map_or("", |(_, id)| id)
        .to_owned()
}

impl ProcessManager for Fulfil {
    type State = Fulfilment;
    type Command = Step;
    const NAME: &'static str = "fulfilment";

    fn instance_of(&self, event: &RecordedEvent) -> Option<String> {
        match event.stream_id.category() {
            "order" | "payment" => Some(id_of(event)),
            // Stock events name their order.
            "stock" => match annals::codec::decode_event::<StockEvent>(event).ok()? {
                StockEvent::Reserved { order, .. } => Some(order),
                _ => None,
            },
            _ => None,
        }
    }

    fn react(&self, state: &Fulfilment, input: &Input<'_, Step>) -> Reaction<Fulfilment, Step> {
        let mut next = state.clone();
        let order = state.order.clone();
        match input {
            Input::Event(recorded) => match recorded.stream_id.category() {
                "order" => match input.event::<OrderEvent>() {
                    Some(OrderEvent::Placed {
                        sku,
                        quantity,
                        amount,
                        card,
                    }) if state.stage == Stage::New => {
                        next = Fulfilment {
                            stage: Stage::Reserving,
                            order: id_of(recorded),
                            sku: sku.clone(),
                            quantity,
                            amount,
                            card,
                        };
                        Reaction::new(next)
                            .send(Step::Reserve {
                                sku,
                                order: id_of(recorded),
                                quantity,
                            })
                            .wake_after("unpaid", self.timeout)
                    }
                    _ => Reaction::new(next),
                },
                "stock" if state.stage == Stage::Reserving => {
                    next.stage = Stage::Paying;
                    let reaction = Reaction::new(next);
                    if state.card {
                        reaction.send(Step::TakePayment {
                            order,
                            amount: state.amount,
                        })
                    } else {
                        reaction // a bank transfer is awaited
                    }
                }
                "payment" => match input.event::<PaymentEvent>() {
                    Some(PaymentEvent::Taken { .. }) if state.stage != Stage::New => {
                        Reaction::new(next)
                            .send(Step::MarkPaid {
                                order: order.clone(),
                            })
                            .send(Step::Ship { order })
                            .cancel_timer("unpaid")
                            .complete()
                    }
                    Some(PaymentEvent::Voided) if state.stage != Stage::New => {
                        give_up(next, "unpaid after the timeout", true)
                    }
                    _ => Reaction::new(next),
                },
                _ => Reaction::new(next),
            },
            Input::Refused {
                command: Step::Reserve { .. },
                ..
            } => give_up(next, "out of stock", false),
            Input::Refused {
                command: Step::TakePayment { .. },
                reason,
            } => give_up(next, reason, true),
            Input::Timer { name: "unpaid" } => {
                Reaction::new(next).send(Step::VoidPayment { order })
            }
            // A refused void (the payment was taken: its event follows),
            // cancel or ship changes nothing.
            _ => Reaction::new(next),
        }
    }

    async fn send(&self, step: Step, context: CommandContext) -> Sent {
        match step {
            Step::Reserve {
                sku,
                order,
                quantity,
            } => self
                .stock
                .execute_with(&sku, StockCommand::Reserve { order, quantity }, context)
                .await
                .into(),
            Step::Release { sku, order } => self
                .stock
                .execute_with(&sku, StockCommand::Release { order }, context)
                .await
                .into(),
            Step::TakePayment { order, amount } => self
                .payments
                .execute_with(&order, PaymentCommand::Take { amount }, context)
                .await
                .into(),
            Step::VoidPayment { order } => self
                .payments
                .execute_with(&order, PaymentCommand::Void, context)
                .await
                .into(),
            Step::MarkPaid { order } => self
                .orders
                .execute_with(&order, OrderCommand::MarkPaid, context)
                .await
                .into(),
            Step::Ship { order } => self
                .orders
                .execute_with(&order, OrderCommand::Ship, context)
                .await
                .into(),
            Step::Cancel { order, reason } => self
                .orders
                .execute_with(&order, OrderCommand::Cancel { reason }, context)
                .await
                .into(),
        }
    }
}

/// Releases the stock (if reserved) and cancels the order: the instance
/// is done.
fn give_up(state: Fulfilment, reason: &str, release: bool) -> Reaction<Fulfilment, Step> {
    let order = state.order.clone();
    let sku = state.sku.clone();
    let mut reaction = Reaction::new(state);
    if release {
        reaction = reaction.send(Step::Release {
            sku,
            order: order.clone(),
        });
    }
    reaction
        .send(Step::Cancel {
            order,
            reason: reason.to_owned(),
        })
        .cancel_timer("unpaid")
        .complete()
}

// ------------------------------------------------------------ the checks

/// What the consistency checks found, from the log and the aggregates.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Checked {
    pub orders: u64,
    pub shipped: u64,
    pub cancelled: u64,
    /// Commands that took effect twice: a second reservation or payment
    /// for one order, a second release.
    pub duplicate_commands: u64,
    /// Orders neither shipped nor cancelled.
    pub lost_steps: u64,
    /// Orders both paid and cancelled, shipped unpaid, negative stock,
    /// stock reserved for a cancelled order, a payment taken for a
    /// cancelled order.
    pub inconsistent: u64,
    /// Distinct command ids in the log: the workflow's commands that
    /// stored events.
    pub commands: u64,
}

/// Reads the whole log and checks every order.
pub async fn check(store: &dyn annals::EventStore) -> Checked {
    use annals::codec::decode_event;
    use annals::store::{EventFilter, ReadDirection};
    let mut out = Checked::default();
    let mut orders: BTreeMap<String, Order> = BTreeMap::new();
    let mut reserved: BTreeMap<String, (u32, u32)> = BTreeMap::new(); // order: (reserves, releases)
    let mut taken: BTreeMap<String, u32> = BTreeMap::new();
    let mut stock: BTreeMap<String, i64> = BTreeMap::new();
    let mut command_ids = std::collections::HashSet::new();
    let mut from = annals::Position(1);
    loop {
        let page = store
            .read_all(from, ReadDirection::Forward, 4096, &EventFilter::All)
            .await
            .expect("read the log");
        let Some(last) = page.last().map(|e| e.position) else {
            break;
        };
        for event in &page {
            if let Some(id) = event.metadata.extra.get(annals::runtime::COMMAND_ID_KEY) {
                command_ids.insert(id.clone());
            }
            let id = id_of(event);
            match event.stream_id.category() {
                "order" => {
                    let decoded: OrderEvent = decode_event(event).expect("order event");
                    orders.entry(id).or_default().apply(&decoded);
                }
                "stock" => {
                    let level = stock.entry(id).or_default();
                    match decode_event::<StockEvent>(event).expect("stock event") {
                        StockEvent::Restocked { quantity } => *level += i64::from(quantity),
                        StockEvent::Reserved { order, quantity } => {
                            *level -= i64::from(quantity);
                            reserved.entry(order).or_default().0 += 1;
                        }
                        StockEvent::Released { order, quantity } => {
                            *level += i64::from(quantity);
                            reserved.entry(order).or_default().1 += 1;
                        }
                    }
                    if *level < 0 {
                        out.inconsistent += 1;
                    }
                }
                "payment" => {
                    if let PaymentEvent::Taken { .. } = decode_event(event).expect("payment event")
                    {
                        *taken.entry(id).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        from = last.next();
    }
    out.commands = command_ids.len() as u64;
    for (id, order) in &orders {
        out.orders += 1;
        let (reserves, releases) = reserved.get(id).copied().unwrap_or_default();
        let takes = taken.get(id).copied().unwrap_or_default();
        out.duplicate_commands += u64::from(reserves.saturating_sub(1))
            + u64::from(releases.saturating_sub(1))
            + u64::from(takes.saturating_sub(1));
        if order.shipped {
            out.shipped += 1;
        }
        if order.cancelled {
            out.cancelled += 1;
        }
        if !order.shipped && !order.cancelled {
            out.lost_steps += 1;
        }
        let held = reserves > releases;
        if (order.paid && order.cancelled)
            || (order.shipped && !order.paid)
            || (order.cancelled && (held || takes > 0))
            || (order.shipped && (!held || takes == 0))
        {
            out.inconsistent += 1;
        }
    }
    out
}

/// Places order `n` (deterministic from `n`): one in five pays by bank
/// transfer (which never arrives: the timeout cancels it), one amount in ten is declined, quantities 1 to 3 of one of
/// `skus` skus.
pub fn order_of(n: u64, skus: u64) -> (String, OrderCommand) {
    (
        format!("o{n}"),
        OrderCommand::Place {
            sku: format!("s{}", n % skus),
            quantity: (n % 3 + 1) as u32,
            amount: 100 + n * 7 % 95,
            card: n % 5 != 0,
        },
    )
}
