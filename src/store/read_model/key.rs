//! Read-model keys: an encoding whose byte order is the value order, so that
//! a range of keys is a range of bytes in the store.
//!
//! - unsigned integers and [`Position`]: big-endian;
//! - signed integers: big-endian with the sign bit flipped;
//! - `bool`: one byte, `0` or `1`; [`Uuid`]: its 16 bytes;
//! - strings and byte strings: their bytes as they are when they are the
//!   whole key or its last element (so a raw reader sees plain text); inside
//!   a tuple, every `0x00` is written `0x00 0xFF` and the element ends with
//!   `0x00 0x01`, which keeps the order and finds the element's end;
//! - tuples of up to four keys: the elements one after the other, so they
//!   sort by their first element, then the next;
//! - [`Unordered`]: postcard, for keys that need no order (ranges over them
//!   are meaningless).

use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::codec::{decode_value, encode_value};
use crate::error::CodecError;
use crate::event::Position;

/// A value that can be a read-model key. See the module docs for the
/// encoding of each type; the byte order of encoded keys is the order of the
/// values (except for [`Unordered`]).
pub trait Key {
    /// Appends the encoding to `out`; `last` says whether this is the last
    /// element of the key (nothing follows it).
    fn write_key(&self, out: &mut Vec<u8>, last: bool);

    /// The whole key, encoded.
    fn to_key_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_key(&mut out, true);
        out
    }
}

/// A key that can be decoded again, for range and iteration results.
pub trait FromKey: Key + Sized {
    /// Decodes one element from the front of `input`, advancing it; `last`
    /// as in [`Key::write_key`].
    ///
    /// # Errors
    /// [`CodecError::Decode`] when the bytes are not such a key.
    fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError>;

    /// Decodes a whole key; every byte must be used.
    ///
    /// # Errors
    /// [`CodecError::Decode`] when the bytes are not such a key.
    fn from_key_bytes(mut bytes: &[u8]) -> Result<Self, CodecError> {
        let key = Self::read_key(&mut bytes, true)?;
        if !bytes.is_empty() {
            return Err(key_error::<Self>(format!("{} trailing bytes", bytes.len())));
        }
        Ok(key)
    }
}

fn key_error<T>(message: impl Into<String>) -> CodecError {
    CodecError::Decode {
        what: format!("key {}", std::any::type_name::<T>()),
        message: message.into(),
    }
}

fn take<'a, T>(input: &mut &'a [u8], count: usize) -> Result<&'a [u8], CodecError> {
    if input.len() < count {
        return Err(key_error::<T>(format!(
            "{count} bytes needed, {} left",
            input.len()
        )));
    }
    let (head, rest) = input.split_at(count);
    *input = rest;
    Ok(head)
}

macro_rules! unsigned_key {
    ($($t:ty),*) => {$(
        impl Key for $t {
            fn write_key(&self, out: &mut Vec<u8>, _last: bool) {
                out.extend_from_slice(&self.to_be_bytes());
            }
        }
        impl FromKey for $t {
            fn read_key(input: &mut &[u8], _last: bool) -> Result<Self, CodecError> {
                let bytes = take::<$t>(input, std::mem::size_of::<$t>())?;
                Ok(<$t>::from_be_bytes(bytes.try_into().expect("length checked")))
            }
        }
    )*};
}
unsigned_key!(u8, u16, u32, u64, u128);

macro_rules! signed_key {
    ($($t:ty => $u:ty),*) => {$(
        impl Key for $t {
            fn write_key(&self, out: &mut Vec<u8>, last: bool) {
                // Flipping the sign bit puts negative numbers first.
                ((*self as $u) ^ (1 << (<$u>::BITS - 1))).write_key(out, last);
            }
        }
        impl FromKey for $t {
            fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError> {
                Ok((<$u>::read_key(input, last)? ^ (1 << (<$u>::BITS - 1))) as $t)
            }
        }
    )*};
}
signed_key!(i8 => u8, i16 => u16, i32 => u32, i64 => u64, i128 => u128);

impl Key for bool {
    fn write_key(&self, out: &mut Vec<u8>, _last: bool) {
        out.push(u8::from(*self));
    }
}

impl FromKey for bool {
    fn read_key(input: &mut &[u8], _last: bool) -> Result<Self, CodecError> {
        match take::<bool>(input, 1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(key_error::<bool>(format!("byte {other}"))),
        }
    }
}

impl Key for Position {
    fn write_key(&self, out: &mut Vec<u8>, last: bool) {
        self.0.write_key(out, last);
    }
}

impl FromKey for Position {
    fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        Ok(Position(u64::read_key(input, last)?))
    }
}

impl Key for Uuid {
    fn write_key(&self, out: &mut Vec<u8>, _last: bool) {
        out.extend_from_slice(self.as_bytes());
    }
}

impl FromKey for Uuid {
    fn read_key(input: &mut &[u8], _last: bool) -> Result<Self, CodecError> {
        let bytes = take::<Uuid>(input, 16)?;
        Ok(Uuid::from_bytes(bytes.try_into().expect("length checked")))
    }
}

fn write_bytes(bytes: &[u8], out: &mut Vec<u8>, last: bool) {
    if last {
        out.extend_from_slice(bytes);
        return;
    }
    for &byte in bytes {
        out.push(byte);
        if byte == 0 {
            out.push(0xFF);
        }
    }
    out.extend_from_slice(&[0x00, 0x01]);
}

fn read_bytes<T>(input: &mut &[u8], last: bool) -> Result<Vec<u8>, CodecError> {
    if last {
        let bytes = input.to_vec();
        *input = &[];
        return Ok(bytes);
    }
    let mut bytes = Vec::new();
    let mut index = 0;
    loop {
        match (input.get(index), input.get(index + 1)) {
            (Some(0), Some(0xFF)) => {
                bytes.push(0);
                index += 2;
            }
            (Some(0), Some(0x01)) => {
                *input = &input[index + 2..];
                return Ok(bytes);
            }
            (Some(0), _) | (None, _) => return Err(key_error::<T>("unterminated element")),
            (Some(&byte), _) => {
                bytes.push(byte);
                index += 1;
            }
        }
    }
}

impl Key for [u8] {
    fn write_key(&self, out: &mut Vec<u8>, last: bool) {
        write_bytes(self, out, last);
    }
}

impl Key for Vec<u8> {
    fn write_key(&self, out: &mut Vec<u8>, last: bool) {
        write_bytes(self, out, last);
    }
}

impl FromKey for Vec<u8> {
    fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        read_bytes::<Vec<u8>>(input, last)
    }
}

impl Key for str {
    fn write_key(&self, out: &mut Vec<u8>, last: bool) {
        write_bytes(self.as_bytes(), out, last);
    }
}

impl Key for String {
    fn write_key(&self, out: &mut Vec<u8>, last: bool) {
        write_bytes(self.as_bytes(), out, last);
    }
}

impl FromKey for String {
    fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        String::from_utf8(read_bytes::<String>(input, last)?)
            .map_err(|e| key_error::<String>(e.to_string()))
    }
}

impl<K: Key + ?Sized> Key for &K {
    fn write_key(&self, out: &mut Vec<u8>, last: bool) {
        (**self).write_key(out, last);
    }
}

/// A key encoded with postcard: for keys of any serde type whose order does
/// not matter (point lookups only; a range over them is meaningless).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Unordered<T>(pub T);

impl<T: Serialize> Key for Unordered<T> {
    fn write_key(&self, out: &mut Vec<u8>, _last: bool) {
        // Serializing a value to a Vec fails only for types serde cannot
        // express (maps with non-string keys in some formats); postcard
        // accepts every serde type, so an error here is a bug.
        out.extend(encode_value(&self.0).expect("postcard encodes every serde value"));
    }
}

impl<T: Serialize + DeserializeOwned> FromKey for Unordered<T> {
    fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError> {
        if last {
            let value = decode_value(input)?;
            *input = &[];
            return Ok(Unordered(value));
        }
        let (value, rest) = postcard::take_from_bytes(input)
            .map_err(|e| key_error::<Unordered<T>>(e.to_string()))?;
        *input = rest;
        Ok(Unordered(value))
    }
}

macro_rules! tuple_key {
    ($($name:ident $index:tt),+ ; $last_name:ident $last_index:tt) => {
        impl<$($name: Key,)+ $last_name: Key> Key for ($($name,)+ $last_name) {
            fn write_key(&self, out: &mut Vec<u8>, last: bool) {
                $(self.$index.write_key(out, false);)+
                self.$last_index.write_key(out, last);
            }
        }
        impl<$($name: FromKey,)+ $last_name: FromKey> FromKey for ($($name,)+ $last_name) {
            fn read_key(input: &mut &[u8], last: bool) -> Result<Self, CodecError> {
                Ok(($($name::read_key(input, false)?,)+ $last_name::read_key(input, last)?))
            }
        }
    };
}
tuple_key!(A 0; B 1);
tuple_key!(A 0, B 1; C 2);
tuple_key!(A 0, B 1, C 2; D 3);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes<K: Key + ?Sized>(key: &K) -> Vec<u8> {
        key.to_key_bytes()
    }

    proptest! {
        #[test]
        fn integers_sort_and_round_trip(a: i64, b: i64, c: u32, d: u32) {
            prop_assert_eq!(a.cmp(&b), bytes(&a).cmp(&bytes(&b)));
            prop_assert_eq!(c.cmp(&d), bytes(&c).cmp(&bytes(&d)));
            prop_assert_eq!(i64::from_key_bytes(&bytes(&a)).unwrap(), a);
        }

        #[test]
        fn tuples_of_strings_sort_and_round_trip(
            a: (String, u64), b: (String, u64), c: (Vec<u8>, i32, String)
        ) {
            prop_assert_eq!(a.cmp(&b), bytes(&a).cmp(&bytes(&b)));
            prop_assert_eq!(<(String, u64)>::from_key_bytes(&bytes(&a)).unwrap(), a);
            prop_assert_eq!(
                <(Vec<u8>, i32, String)>::from_key_bytes(&bytes(&c)).unwrap(),
                c
            );
        }
    }

    #[test]
    fn a_string_alone_is_its_bytes() {
        assert_eq!(bytes("order-1"), b"order-1");
        assert_eq!(bytes(&7u16), [0, 7]);
        assert!(u64::from_key_bytes(&[1, 2]).is_err());
        assert!(<(String, u8)>::from_key_bytes(b"no end").is_err());
    }
}
