//! postcard encoding of users' events and states. An event enum is stored
//! under its serde variant *name* (the event type) and a schema version,
//! never under a variant index, so reordering or adding variants never breaks
//! stored data; upcasters turn old schema versions into the current one, and
//! renames map old event type names to current ones.
//!
//! The mapping needs no code from the user: any plain (externally tagged)
//! serde enum works. `#[derive(Serialize, Deserialize)] enum OrderEvent {
//! OrderPlaced(..), ItemAdded { .. }, OrderShipped }` stores `OrderPlaced`,
//! `ItemAdded` and `OrderShipped`.
//!
//! Renaming a variant never rewrites the log. Either keep the stored name
//! (`#[serde(rename = "OldName")]` on the renamed variant), or store new
//! events under the new name and register the old one with
//! [`Upcasters::rename`], which reads old records as the new variant and
//! keys schema versions and upcasters by the new name only (see
//! [`DomainEvent`]). serde's `#[serde(alias = "OldName")]` also reads old
//! records, but [`DomainEvent::schema_version`] and the upcasters then still
//! see the old name; use it or a rename, not both for one name.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use dashmap::DashMap;
use serde::de::{self, DeserializeOwned, DeserializeSeed, Visitor};
use serde::ser::{self, Serialize};

use crate::event::{NewEvent, RecordedEvent};

pub use crate::error::CodecError;

/// A user's event type: a plain serde enum whose variant names are the
/// stored event types (past tense: `OrderShipped`).
///
/// Implement it with an empty `impl DomainEvent for OrderEvent {}`; override
/// [`DomainEvent::schema_version`] and [`DomainEvent::upcasters`] when a
/// variant's payload changes shape or a variant is renamed.
///
/// A rename and a new payload shape, read from records a previous release
/// stored, without rewriting them:
///
/// ```
/// use annals::DomainEvent;
/// use annals::codec::{Upcasters, decode_event_parts, encode_event, encode_value};
/// use serde::{Deserialize, Serialize};
///
/// // Release 1 stored `OrderCreated { customer }`. Release 2 calls the
/// // variant `OrderPlaced` and adds a currency: schema version 2.
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// enum OrderEvent {
///     OrderPlaced { customer: String, currency: String },
///     OrderShipped,
/// }
///
/// impl DomainEvent for OrderEvent {
///     fn schema_version(event_type: &str) -> u16 {
///         if event_type == "OrderPlaced" { 2 } else { 1 }
///     }
///
///     fn upcasters(upcasters: &mut Upcasters) {
///         upcasters
///             .rename("OrderCreated", "OrderPlaced")
///             // A variant's contents are its fields in order, as a tuple.
///             .add("OrderPlaced", 1, |(customer,): (String,)| (customer, "EUR".to_owned()));
///     }
/// }
///
/// # fn main() -> Result<(), annals::codec::CodecError> {
/// // A record of release 1: event type `OrderCreated`, schema version 1.
/// let stored = encode_value(&("ada".to_owned(),))?;
/// let event: OrderEvent = decode_event_parts("OrderCreated", 1, &stored)?;
/// assert_eq!(
///     event,
///     OrderEvent::OrderPlaced { customer: "ada".into(), currency: "EUR".into() }
/// );
/// // New events are stored under the current name and version.
/// let new = encode_event(&event)?;
/// assert_eq!((new.event_type.as_str(), new.schema_version), ("OrderPlaced", 2));
/// # Ok(())
/// # }
/// ```
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The current schema version of `event_type` (a current variant name);
    /// new events are stored with it. Default 1.
    fn schema_version(event_type: &str) -> u16 {
        let _ = event_type;
        1
    }

    /// Registers the upcasters from older schema versions and the renames
    /// of event types. Called once per event type per process. Default:
    /// none.
    fn upcasters(upcasters: &mut Upcasters) {
        let _ = upcasters;
    }
}

type Step = Box<dyn Fn(&[u8]) -> Result<Vec<u8>, CodecError> + Send + Sync>;

/// How stored events of older releases become current ones: conversions
/// of payloads from one schema version to the next, and renames of event
/// types. Filled in by [`DomainEvent::upcasters`].
#[derive(Default)]
pub struct Upcasters {
    steps: HashMap<(String, u16), Step>,
    /// Old name → the name it was renamed to.
    renames: HashMap<String, String>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<_> = self.steps.keys().collect();
        keys.sort();
        let mut renames: Vec<_> = self.renames.iter().collect();
        renames.sort();
        f.debug_struct("Upcasters")
            .field("steps", &keys)
            .field("renames", &renames)
            .finish()
    }
}

impl Upcasters {
    /// Registers how a payload of `event_type` at schema version
    /// `from_version` (decoded as `Old`) becomes one at `from_version + 1`
    /// (encoded from `New`, the shape of the variant's contents then).
    /// `event_type` is the current name: a renamed type's old records are
    /// upcast by the steps of the name they were renamed to.
    pub fn add<Old, New>(
        &mut self,
        event_type: &str,
        from_version: u16,
        convert: impl Fn(Old) -> New + Send + Sync + 'static,
    ) -> &mut Self
    where
        Old: DeserializeOwned + 'static,
        New: Serialize + 'static,
    {
        let what = format!("{event_type} schema version {from_version}");
        let step: Step = Box::new(move |bytes| {
            let old: Old = decode_exact(bytes, &what)?;
            encode_value(&convert(old))
        });
        self.steps
            .insert((event_type.to_owned(), from_version), step);
        self
    }

    /// Registers that events stored under `old_name` are now the variant
    /// named `new_name`: they decode as that variant, and their schema
    /// version is `new_name`'s version line (a record of `old_name` at
    /// version 1 is upcast by `new_name`'s step from version 1, up to
    /// [`DomainEvent::schema_version`]`(new_name)`). New events are stored
    /// under `new_name` only; the log is never rewritten.
    ///
    /// Renames chain: after `A → B` and `B → C`, records of `A` read as
    /// `C`. A stored name that is still a variant of the enum is read as
    /// that variant, so an old name must not be reused for a new variant.
    /// Filters on event types ([`crate::store::EventFilter`]) match the stored
    /// names: a projection filtering on `new_name` should list `old_name`
    /// too.
    ///
    /// # Panics
    /// When the rename closes a cycle (`new_name` is, or was renamed to,
    /// `old_name`): no name would be current.
    pub fn rename(&mut self, old_name: &str, new_name: &str) -> &mut Self {
        assert!(
            self.current_name(new_name) != old_name,
            "Upcasters::rename({old_name:?}, {new_name:?}) closes a cycle of renames"
        );
        self.renames
            .insert(old_name.to_owned(), new_name.to_owned());
        self
    }

    /// The name that records stored under `stored` are read as: the end of
    /// its chain of renames, or `stored` itself. `rename` refuses cycles,
    /// so the walk ends.
    fn current_name<'a>(&'a self, stored: &'a str) -> &'a str {
        let mut name = stored;
        while let Some(next) = self.renames.get(name) {
            name = next;
        }
        name
    }

    /// Brings `payload` from `found` up to `current`.
    fn upcast(
        &self,
        event_type: &str,
        found: u16,
        current: u16,
        payload: &[u8],
    ) -> Result<Vec<u8>, CodecError> {
        let no_path = || CodecError::NoUpcaster {
            event_type: event_type.to_owned(),
            found,
            current,
        };
        if found > current {
            return Err(no_path());
        }
        let mut bytes = payload.to_vec();
        for version in found..current {
            let step = self
                .steps
                .get(&(event_type.to_owned(), version))
                .ok_or_else(no_path)?;
            bytes = step(&bytes)?;
        }
        Ok(bytes)
    }
}

/// The upcasters of each event type, built once per process.
fn upcasters_of<E: DomainEvent>() -> Arc<Upcasters> {
    static REGISTRY: OnceLock<DashMap<TypeId, Arc<dyn Any + Send + Sync>>> = OnceLock::new();
    let registry = REGISTRY.get_or_init(DashMap::new);
    let entry = registry.entry(TypeId::of::<E>()).or_insert_with(|| {
        let mut upcasters = Upcasters::default();
        E::upcasters(&mut upcasters);
        Arc::new(Arc::new(upcasters))
    });
    entry
        .value()
        .downcast_ref::<Arc<Upcasters>>()
        .map(Arc::clone)
        .unwrap_or_default()
}

/// Encodes a user's event as a [`NewEvent`]: its variant name as the event
/// type, its current schema version, the variant's contents as postcard, a
/// fresh UUID v7 and empty metadata.
///
/// # Errors
/// [`CodecError::Encode`] when `E` is not a plain serde enum or a field does
/// not encode.
pub fn encode_event<E: DomainEvent>(event: &E) -> Result<NewEvent, CodecError> {
    let (event_type, payload) =
        event
            .serialize(VariantSerializer)
            .map_err(|e| CodecError::Encode {
                what: std::any::type_name::<E>().to_owned(),
                message: e.0,
            })?;
    Ok(NewEvent::new(event_type, payload).with_schema_version(E::schema_version(event_type)))
}

/// The stored event type (variant name) of `event`.
///
/// # Errors
/// As [`encode_event`].
pub fn event_type_of<E: DomainEvent>(event: &E) -> Result<&'static str, CodecError> {
    let (event_type, _) = event
        .serialize(VariantSerializer)
        .map_err(|e| CodecError::Encode {
            what: std::any::type_name::<E>().to_owned(),
            message: e.0,
        })?;
    Ok(event_type)
}

/// Decodes a stored event into the user's enum, following renames and
/// upcasting old schema versions first.
///
/// # Errors
/// [`CodecError::UnknownEventType`], naming the event's stream and version,
/// when no variant has the stored name or a name it was renamed to;
/// [`CodecError::NoUpcaster`] when the schema version cannot be brought to
/// the current one; [`CodecError::Decode`] when the payload does not decode
/// (including trailing bytes: a payload must decode exactly).
pub fn decode_event<E: DomainEvent>(event: &RecordedEvent) -> Result<E, CodecError> {
    decode_event_parts(&event.event_type, event.schema_version, &event.payload).map_err(|error| {
        match error {
            CodecError::UnknownEventTypeName { event_type } => CodecError::UnknownEventType {
                stream_id: event.stream_id.clone(),
                version: event.version,
                event_type,
            },
            CodecError::Decode { what, message } => CodecError::Decode {
                what: format!(
                    "{what} (stream {} version {})",
                    event.stream_id, event.version
                ),
                message,
            },
            other => other,
        }
    })
}

/// As [`decode_event`], from the parts of a stored event.
///
/// # Errors
/// As [`decode_event`], except that an unknown name is
/// [`CodecError::UnknownEventTypeName`]: the parts name no stream.
pub fn decode_event_parts<E: DomainEvent>(
    event_type: &str,
    schema_version: u16,
    payload: &[u8],
) -> Result<E, CodecError> {
    // Nearly every record is a current variant at its current version:
    // decode it without the registry (a shared map) on the way.
    if schema_version == E::schema_version(event_type) {
        match decode_variant(event_type, schema_version, payload) {
            Err(CodecError::UnknownEventTypeName { .. }) => {}
            decoded => return decoded,
        }
    }
    let upcasters = upcasters_of::<E>();
    let current_name = upcasters.current_name(event_type);
    let current = E::schema_version(current_name);
    let upcast;
    let payload = if schema_version == current {
        payload
    } else {
        upcast = upcasters.upcast(current_name, schema_version, current, payload)?;
        &upcast
    };
    decode_variant(current_name, schema_version, payload).map_err(|error| match error {
        // Name the stored type, the one a reader finds in the log.
        CodecError::UnknownEventTypeName { .. } => CodecError::UnknownEventTypeName {
            event_type: event_type.to_owned(),
        },
        other => other,
    })
}

/// Decodes `payload` as the variant named `event_type`, at the current
/// schema version (`schema_version` is the stored one, for messages).
fn decode_variant<E: DomainEvent>(
    event_type: &str,
    schema_version: u16,
    payload: &[u8],
) -> Result<E, CodecError> {
    E::deserialize(VariantDeserializer {
        name: event_type,
        payload,
    })
    .map_err(|e| match e {
        DecodeFailure::UnknownVariant => CodecError::UnknownEventTypeName {
            event_type: event_type.to_owned(),
        },
        DecodeFailure::Message(message) => CodecError::Decode {
            what: format!("event {event_type} v{schema_version}"),
            message,
        },
    })
}

/// Encodes any value (an aggregate's state for a snapshot) as postcard.
///
/// # Errors
/// [`CodecError::Encode`] when the value does not encode.
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_stdvec(value).map_err(|e| CodecError::Encode {
        what: std::any::type_name::<T>().to_owned(),
        message: e.to_string(),
    })
}

/// Decodes a value encoded by [`encode_value`]; every byte must be used.
///
/// # Errors
/// [`CodecError::Decode`] when the bytes do not decode as `T` exactly.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_exact(bytes, std::any::type_name::<T>())
}

fn decode_exact<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, CodecError> {
    let decode_error = |message: String| CodecError::Decode {
        what: what.to_owned(),
        message,
    };
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(decode_error(format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(decode_error(e.to_string())),
    }
}

// ---------------------------------------------------------------------------
// Encoding: a serde Serializer that accepts only an enum variant and returns
// its name with its contents encoded by postcard. postcard writes the fields
// of a tuple or struct one after the other with no framing, so appending each
// field's encoding gives exactly postcard's encoding of the contents.

#[derive(Debug)]
struct EncodeFailure(String);

impl fmt::Display for EncodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EncodeFailure {}

impl ser::Error for EncodeFailure {
    fn custom<T: fmt::Display>(message: T) -> Self {
        EncodeFailure(message.to_string())
    }
}

fn not_an_enum<T>() -> Result<T, EncodeFailure> {
    Err(EncodeFailure(
        "an event type must be a plain serde enum (one variant per event type, \
         not #[serde(tag)] or #[serde(untagged)])"
            .to_owned(),
    ))
}

fn append_field<T: Serialize + ?Sized>(
    buffer: &mut Vec<u8>,
    value: &T,
) -> Result<(), EncodeFailure> {
    let taken = std::mem::take(buffer);
    *buffer = postcard::to_extend(value, taken).map_err(|e| EncodeFailure(e.to_string()))?;
    Ok(())
}

struct VariantSerializer;

struct Fields {
    name: &'static str,
    buffer: Vec<u8>,
}

impl ser::SerializeTupleVariant for Fields {
    type Ok = (&'static str, Vec<u8>);
    type Error = EncodeFailure;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), EncodeFailure> {
        append_field(&mut self.buffer, value)
    }
    fn end(self) -> Result<Self::Ok, EncodeFailure> {
        Ok((self.name, self.buffer))
    }
}

impl ser::SerializeStructVariant for Fields {
    type Ok = (&'static str, Vec<u8>);
    type Error = EncodeFailure;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        _key: &'static str,
        value: &T,
    ) -> Result<(), EncodeFailure> {
        append_field(&mut self.buffer, value)
    }
    fn end(self) -> Result<Self::Ok, EncodeFailure> {
        Ok((self.name, self.buffer))
    }
}

/// Implements every non-enum method of `Serializer` as a refusal.
macro_rules! refuse_non_enums {
    () => {
        type SerializeSeq = ser::Impossible<Self::Ok, EncodeFailure>;
        type SerializeTuple = ser::Impossible<Self::Ok, EncodeFailure>;
        type SerializeTupleStruct = ser::Impossible<Self::Ok, EncodeFailure>;
        type SerializeMap = ser::Impossible<Self::Ok, EncodeFailure>;
        type SerializeStruct = ser::Impossible<Self::Ok, EncodeFailure>;
        fn serialize_bool(self, _: bool) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_i8(self, _: i8) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_i16(self, _: i16) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_i32(self, _: i32) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_i64(self, _: i64) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_u8(self, _: u8) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_u16(self, _: u16) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_u32(self, _: u32) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_u64(self, _: u64) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_f32(self, _: f32) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_f64(self, _: f64) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_char(self, _: char) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_str(self, _: &str) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_none(self) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_unit(self) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: &T,
        ) -> Result<Self::Ok, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleStruct, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, EncodeFailure> {
            not_an_enum()
        }
        fn serialize_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStruct, EncodeFailure> {
            not_an_enum()
        }
    };
}

impl ser::Serializer for VariantSerializer {
    type Ok = (&'static str, Vec<u8>);
    type Error = EncodeFailure;
    type SerializeTupleVariant = Fields;
    type SerializeStructVariant = Fields;
    refuse_non_enums!();

    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<Self::Ok, EncodeFailure> {
        Ok((variant, Vec::new()))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Self::Ok, EncodeFailure> {
        let mut buffer = Vec::new();
        append_field(&mut buffer, value)?;
        Ok((variant, buffer))
    }

    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Fields, EncodeFailure> {
        Ok(Fields {
            name: variant,
            buffer: Vec::new(),
        })
    }

    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Fields, EncodeFailure> {
        Ok(Fields {
            name: variant,
            buffer: Vec::new(),
        })
    }
}

// ---------------------------------------------------------------------------
// Decoding: a serde Deserializer that presents (name, postcard contents) as
// an externally tagged enum whose variant is chosen by name, as serde_json
// does with `{"Name": ...}`.

#[derive(Debug)]
enum DecodeFailure {
    UnknownVariant,
    Message(String),
}

impl fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeFailure::UnknownVariant => f.write_str("unknown variant"),
            DecodeFailure::Message(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for DecodeFailure {}

impl de::Error for DecodeFailure {
    fn custom<T: fmt::Display>(message: T) -> Self {
        DecodeFailure::Message(message.to_string())
    }
}

impl From<postcard::Error> for DecodeFailure {
    fn from(error: postcard::Error) -> Self {
        DecodeFailure::Message(error.to_string())
    }
}

struct VariantDeserializer<'a> {
    name: &'a str,
    payload: &'a [u8],
}

impl<'de> de::Deserializer<'de> for VariantDeserializer<'de> {
    type Error = DecodeFailure;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, DecodeFailure> {
        Err(DecodeFailure::Message(
            "an event type must be a plain serde enum".to_owned(),
        ))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeFailure> {
        // serde's aliases are not in `variants`, so only refuse here when the
        // derive itself would: let it decide, and map its verdict below.
        let _ = variants;
        visitor.visit_enum(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

impl<'de> de::EnumAccess<'de> for VariantDeserializer<'de> {
    type Error = DecodeFailure;
    type Variant = Contents<'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Contents<'de>), DecodeFailure> {
        let name = de::value::BorrowedStrDeserializer::<'de, de::value::Error>::new(self.name);
        let variant = seed
            .deserialize(name)
            .map_err(|_| DecodeFailure::UnknownVariant)?;
        Ok((
            variant,
            Contents {
                payload: self.payload,
            },
        ))
    }
}

struct Contents<'de> {
    payload: &'de [u8],
}

impl<'de> Contents<'de> {
    fn decode<T>(
        self,
        f: impl FnOnce(
            &mut postcard::Deserializer<'de, postcard::de_flavors::Slice<'de>>,
        ) -> postcard::Result<T>,
    ) -> Result<T, DecodeFailure> {
        let mut deserializer = postcard::Deserializer::from_bytes(self.payload);
        let value = f(&mut deserializer)?;
        let rest = deserializer.finalize()?;
        if rest.is_empty() {
            Ok(value)
        } else {
            Err(DecodeFailure::Message(format!(
                "{} trailing bytes",
                rest.len()
            )))
        }
    }
}

impl<'de> de::VariantAccess<'de> for Contents<'de> {
    type Error = DecodeFailure;

    fn unit_variant(self) -> Result<(), DecodeFailure> {
        self.decode(|_| Ok(()))
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(
        self,
        seed: T,
    ) -> Result<T::Value, DecodeFailure> {
        self.decode(|d| seed.deserialize(d))
    }

    fn tuple_variant<V: Visitor<'de>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, DecodeFailure> {
        self.decode(|d| de::Deserializer::deserialize_tuple(d, len, visitor))
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, DecodeFailure> {
        self.decode(|d| de::Deserializer::deserialize_struct(d, "", fields, visitor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::{Deserialize, Serialize};

    /// The event enum as first shipped.
    mod before {
        use super::*;
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(crate) enum OrderEvent {
            OrderPlaced(Placed),
            ItemAdded { sku: String, quantity: u32 },
            OrderShipped,
            Noted(u8, String),
        }
        impl DomainEvent for OrderEvent {}
    }

    /// The same enum after a release reordered the variants and added two.
    mod after {
        use super::*;
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(crate) enum OrderEvent {
            OrderCancelled { reason: String },
            Noted(u8, String),
            OrderShipped,
            ItemRemoved { sku: String },
            ItemAdded { sku: String, quantity: u32 },
            OrderPlaced(Placed),
        }
        impl DomainEvent for OrderEvent {}
    }

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub(crate) struct Placed {
        customer: String,
        total_cents: u64,
    }

    fn recorded(new: NewEvent) -> RecordedEvent {
        RecordedEvent {
            event_id: new.event_id,
            stream_id: crate::StreamId::new("order-1").unwrap(),
            version: crate::Version(1),
            position: crate::Position(1),
            event_type: new.event_type,
            schema_version: new.schema_version,
            recorded_at_micros: 0,
            metadata: new.metadata,
            payload: new.payload,
        }
    }

    #[test]
    fn events_are_stored_by_name_and_survive_reordering_and_new_variants() {
        let placed = Placed {
            customer: "ada".into(),
            total_cents: 1250,
        };
        let old = [
            before::OrderEvent::OrderPlaced(placed.clone()),
            before::OrderEvent::ItemAdded {
                sku: "tea".into(),
                quantity: 3,
            },
            before::OrderEvent::OrderShipped,
            before::OrderEvent::Noted(7, "gift".into()),
        ];
        let stored: Vec<RecordedEvent> = old
            .iter()
            .map(|e| recorded(encode_event(e).unwrap()))
            .collect();
        let names: Vec<&str> = stored.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(names, ["OrderPlaced", "ItemAdded", "OrderShipped", "Noted"]);

        let decoded: Vec<after::OrderEvent> =
            stored.iter().map(|e| decode_event(e).unwrap()).collect();
        assert_eq!(
            decoded,
            vec![
                after::OrderEvent::OrderPlaced(placed),
                after::OrderEvent::ItemAdded {
                    sku: "tea".into(),
                    quantity: 3
                },
                after::OrderEvent::OrderShipped,
                after::OrderEvent::Noted(7, "gift".into()),
            ]
        );
    }

    #[test]
    fn an_unknown_event_type_is_a_typed_error() {
        let new = encode_event(&after::OrderEvent::ItemRemoved { sku: "x".into() }).unwrap();
        let error = decode_event::<before::OrderEvent>(&recorded(new.clone())).unwrap_err();
        assert!(
            matches!(
                &error,
                CodecError::UnknownEventType { stream_id, version, event_type }
                    if stream_id.as_str() == "order-1"
                        && *version == crate::Version(1)
                        && event_type == "ItemRemoved"
            ),
            "{error:?}"
        );
        let message = error.to_string();
        for part in ["order-1", "version 1", "ItemRemoved", "Upcasters::rename"] {
            assert!(message.contains(part), "{message:?} lacks {part:?}");
        }
        let error = decode_event_parts::<before::OrderEvent>(
            &new.event_type,
            new.schema_version,
            &new.payload,
        )
        .unwrap_err();
        assert!(
            matches!(&error, CodecError::UnknownEventTypeName { event_type } if event_type == "ItemRemoved"),
            "{error:?}"
        );
    }

    /// The enum after `ItemAdded` became `ItemPut`, then `LineAdded`.
    mod renamed {
        use super::*;
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(crate) enum OrderEvent {
            LineAdded { sku: String, quantity: u32 },
            OrderShipped,
        }
        impl DomainEvent for OrderEvent {
            fn upcasters(upcasters: &mut Upcasters) {
                upcasters
                    .rename("ItemAdded", "ItemPut")
                    .rename("ItemPut", "LineAdded")
                    .rename("Dropped", "NoSuchVariant");
            }
        }
    }

    #[test]
    fn renames_chain_and_name_the_stored_type_when_they_lead_nowhere() {
        let old = recorded(
            encode_event(&before::OrderEvent::ItemAdded {
                sku: "tea".into(),
                quantity: 3,
            })
            .unwrap(),
        );
        let line = renamed::OrderEvent::LineAdded {
            sku: "tea".into(),
            quantity: 3,
        };
        assert_eq!(decode_event::<renamed::OrderEvent>(&old).unwrap(), line);
        let middle = decode_event_parts("ItemPut", 1, &old.payload).unwrap();
        assert_eq!(line, middle);
        assert_eq!(encode_event(&line).unwrap().event_type, "LineAdded");
        let error = decode_event_parts::<renamed::OrderEvent>("Dropped", 1, &[]).unwrap_err();
        assert!(
            matches!(&error, CodecError::UnknownEventTypeName { event_type } if event_type == "Dropped"),
            "{error:?}"
        );
    }

    #[test]
    #[should_panic(expected = "closes a cycle")]
    fn a_cycle_of_renames_is_refused() {
        Upcasters::default().rename("A", "B").rename("B", "A");
    }

    #[test]
    fn a_decode_error_of_a_recorded_event_names_its_stream_and_version() {
        let mut new = encode_event(&before::OrderEvent::ItemAdded {
            sku: "tea".into(),
            quantity: 3,
        })
        .unwrap();
        new.payload.push(0);
        let message = decode_event::<before::OrderEvent>(&recorded(new))
            .unwrap_err()
            .to_string();
        assert!(message.contains("stream order-1 version 1"), "{message}");
    }

    #[test]
    fn corrupt_payloads_are_typed_errors() {
        let mut new = encode_event(&before::OrderEvent::ItemAdded {
            sku: "tea".into(),
            quantity: 3,
        })
        .unwrap();
        let mut longer = new.clone();
        longer.payload.push(0);
        assert!(matches!(
            decode_event::<before::OrderEvent>(&recorded(longer)),
            Err(CodecError::Decode { .. })
        ));
        new.payload.truncate(2);
        assert!(matches!(
            decode_event::<before::OrderEvent>(&recorded(new)),
            Err(CodecError::Decode { .. })
        ));
    }

    #[test]
    fn a_struct_is_refused_as_an_event_type() {
        #[derive(Clone, Debug, Serialize, Deserialize)]
        struct NotAnEnum {
            a: u8,
        }
        impl DomainEvent for NotAnEnum {}
        assert!(matches!(
            encode_event(&NotAnEnum { a: 1 }),
            Err(CodecError::Encode { .. })
        ));
    }

    mod versioned {
        use super::*;
        #[derive(Deserialize)]
        pub(crate) struct PlacedV1 {
            pub(crate) customer: String,
        }
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(crate) struct PlacedV2 {
            pub(crate) customer: String,
            pub(crate) currency: String,
        }
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub(crate) enum OrderEvent {
            #[serde(alias = "OrderCreated")]
            OrderPlaced(PlacedV2),
        }
        impl DomainEvent for OrderEvent {
            fn schema_version(event_type: &str) -> u16 {
                match event_type {
                    "OrderPlaced" | "OrderCreated" => 2,
                    _ => 1,
                }
            }
            fn upcasters(upcasters: &mut Upcasters) {
                for name in ["OrderPlaced", "OrderCreated"] {
                    upcasters.add(name, 1, |old: PlacedV1| PlacedV2 {
                        customer: old.customer,
                        currency: "EUR".into(),
                    });
                }
            }
        }
    }

    #[test]
    fn old_schema_versions_are_upcast_and_renamed_types_still_read() {
        let v1 = encode_value(&"bob".to_owned()).unwrap();
        for name in ["OrderPlaced", "OrderCreated"] {
            let event: versioned::OrderEvent = decode_event_parts(name, 1, &v1).unwrap();
            assert_eq!(
                event,
                versioned::OrderEvent::OrderPlaced(versioned::PlacedV2 {
                    customer: "bob".into(),
                    currency: "EUR".into()
                })
            );
        }
        let current = encode_event(&versioned::OrderEvent::OrderPlaced(versioned::PlacedV2 {
            customer: "c".into(),
            currency: "USD".into(),
        }))
        .unwrap();
        assert_eq!(current.schema_version, 2);
        let error = decode_event_parts::<versioned::OrderEvent>("OrderPlaced", 3, &v1).unwrap_err();
        assert!(matches!(
            error,
            CodecError::NoUpcaster {
                found: 3,
                current: 2,
                ..
            }
        ));
    }

    #[test]
    fn values_must_decode_exactly() {
        let bytes = encode_value(&(1u32, "x".to_owned())).unwrap();
        assert_eq!(
            decode_value::<(u32, String)>(&bytes).unwrap(),
            (1, "x".into())
        );
        let mut longer = bytes.clone();
        longer.push(1);
        assert!(decode_value::<(u32, String)>(&longer).is_err());
        assert!(decode_value::<(u32, String)>(&bytes[..1]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(name in "[A-Za-z]{0,12}", version in 0u16..4, payload in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = decode_event_parts::<before::OrderEvent>(&name, version, &payload);
            let _ = decode_event_parts::<versioned::OrderEvent>(&name, version, &payload);
            let _ = decode_value::<before::OrderEvent>(&payload);
        }
    }
}
