//! The library-loans domain of the teaching examples (`aggregate`,
//! `read_model`, `read_your_writes`): a `Book` that one member at a time can
//! borrow. All rules are in `handle`, none in `apply`.

use annals::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// What happened to a book (past tense). The variant names are the event
/// types stored in the log, where `BookLent` says more than `Lent`.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum BookEvent {
    BookAdded { title: String },
    BookLent { member: String },
    BookReturned { member: String },
}

impl DomainEvent for BookEvent {}

/// What a book is asked to do (imperative).
#[derive(Debug, Clone)]
pub(crate) enum BookCommand {
    Add { title: String },
    Lend { member: String },
    Return,
}

impl BookCommand {
    /// `Add` with this title.
    pub(crate) fn add(title: &str) -> Self {
        Self::Add {
            title: title.into(),
        }
    }

    /// `Lend` to this member.
    pub(crate) fn lend(member: &str) -> Self {
        Self::Lend {
            member: member.into(),
        }
    }
}

/// Why a book refuses a command. A hand-written `Display` and `Error`: no
/// extra crate needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoanError {
    NoSuchBook,
    AlreadyAdded,
    OnLoan { to: String },
    NotOnLoan,
}

impl std::fmt::Display for LoanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoanError::NoSuchBook => f.write_str("no such book"),
            LoanError::AlreadyAdded => f.write_str("the book is already in the catalogue"),
            LoanError::OnLoan { to } => write!(f, "the book is on loan to {to}"),
            LoanError::NotOnLoan => f.write_str("the book is not on loan"),
        }
    }
}

impl std::error::Error for LoanError {}

/// A book: its title once added, and who has it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Book {
    pub(crate) title: Option<String>,
    pub(crate) borrower: Option<String>,
}

impl Aggregate for Book {
    type Command = BookCommand;
    type Event = BookEvent;
    type Error = LoanError;
    const CATEGORY: &'static str = "book";

    fn handle(&self, command: &BookCommand) -> Result<Vec<BookEvent>, LoanError> {
        match (command, &self.title, &self.borrower) {
            (BookCommand::Add { title }, None, _) => Ok(vec![BookEvent::BookAdded {
                title: title.clone(),
            }]),
            (BookCommand::Add { .. }, Some(_), _) => Err(LoanError::AlreadyAdded),
            (_, None, _) => Err(LoanError::NoSuchBook),
            (BookCommand::Lend { member }, _, None) => Ok(vec![BookEvent::BookLent {
                member: member.clone(),
            }]),
            (BookCommand::Lend { .. }, _, Some(to)) => Err(LoanError::OnLoan { to: to.clone() }),
            (BookCommand::Return, _, Some(member)) => Ok(vec![BookEvent::BookReturned {
                member: member.clone(),
            }]),
            (BookCommand::Return, _, None) => Err(LoanError::NotOnLoan),
        }
    }

    fn apply(&mut self, event: &BookEvent) {
        match event {
            BookEvent::BookAdded { title } => self.title = Some(title.clone()),
            BookEvent::BookLent { member } => self.borrower = Some(member.clone()),
            BookEvent::BookReturned { .. } => self.borrower = None,
        }
    }
}
