//! Identifiers and fencing tokens.
//!
//! Validation rules (enforced by every constructor, so a held value is always valid):
//!
//! * [`ObjectId`]: 1 to [`ObjectId::MAX_LEN`] bytes of ASCII letters, digits and `- _ . : @ /`,
//!   not starting with `/` or `.`.
//! * [`NodeId`]: 1 to [`NodeId::MAX_LEN`] bytes of ASCII letters, digits and `- _ . :`.
//! * keys ([`validate_key`]): 1 to [`MAX_KEY_BYTES`] bytes of UTF-8 without NUL or control
//!   characters (Unicode's `Cc`; format characters such as U+200B or U+202E are allowed).
//!   Keys are compared and ordered byte by byte, unnormalized: `"é"` as one code point and as
//!   `e` + a combining accent are two keys, and every backend agrees.
//! * values: at most [`MAX_VALUE_BYTES`] (2 MiB, the platform limit of the predecessor).

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Largest accepted value, in bytes (2 MiB).
pub const MAX_VALUE_BYTES: usize = 2 * 1024 * 1024;
/// Largest accepted key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest accepted type name, in bytes.
pub const MAX_TYPE_NAME_BYTES: usize = 256;

fn check_id(what: &str, s: &str, max: usize, extra: &[u8]) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if s.len() > max {
        return Err(Error::invalid(format!("{what} is {} bytes, the limit is {max}", s.len())));
    }
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || "-_.:".contains(c) || (c.is_ascii() && extra.contains(&(c as u8)));
    if let Some(bad) = s.chars().find(|&c| !allowed(c)) {
        return Err(Error::invalid(format!(
            "{what} {s:?} contains {bad:?}; allowed are ASCII letters, digits and -_.:{}",
            String::from_utf8_lossy(extra)
        )));
    }
    Ok(())
}

/// The name of a durable object. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(Arc<str>);

impl ObjectId {
    /// Longest accepted object id, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validate and wrap an object id.
    pub fn new(id: impl AsRef<str>) -> Result<Self> {
        let s = id.as_ref();
        check_id("object id", s, Self::MAX_LEN, b"@/")?;
        if s.starts_with('/') || s.starts_with('.') {
            return Err(Error::invalid(format!("object id {s:?} must not start with '/' or '.'")));
        }
        Ok(ObjectId(Arc::from(s)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({:?})", &*self.0)
    }
}

impl std::str::FromStr for ObjectId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ObjectId::new(s)
    }
}

/// The identity of a lease holder (a node, process or runtime instance). Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(Arc<str>);

impl NodeId {
    /// Longest accepted node id, in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validate and wrap a node id.
    pub fn new(id: impl AsRef<str>) -> Result<Self> {
        let s = id.as_ref();
        check_id("node id", s, Self::MAX_LEN, b"")?;
        Ok(NodeId(Arc::from(s)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({:?})", &*self.0)
    }
}

/// A fencing token: strictly increasing per object across all holders. `0` means "none" and is
/// never issued.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
pub struct FencingToken(u64);

impl FencingToken {
    /// The "no token" value; never issued by a guard and never accepted for a write.
    pub const NONE: FencingToken = FencingToken(0);

    /// Wrap a raw token value.
    pub const fn new(value: u64) -> Self {
        FencingToken(value)
    }

    /// The raw value.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The largest token a guard issues or a store accepts: 2^44 - 1 (about 1.8 * 10^13
    /// acquisitions of one object). One bound for every backend keeps them interchangeable on
    /// the same data; libSQL's remote transport carries call results in 45 bits.
    pub const MAX: FencingToken = FencingToken((1 << 44) - 1);

    /// The next token (saturating at `u64::MAX`; guards use [`checked_next`](Self::checked_next)).
    pub fn next(self) -> Self {
        FencingToken(self.0.saturating_add(1))
    }

    /// The token a guard issues after `self`: `LimitExceeded` past [`MAX`](Self::MAX), so no two
    /// leases ever share a token.
    pub fn checked_next(self) -> Result<Self> {
        match self.0.checked_add(1) {
            Some(n) if n <= Self::MAX.0 => Ok(FencingToken(n)),
            _ => Err(Error::limit("fencing token", Self::MAX.0, self.0.saturating_add(1))),
        }
    }

    /// `InvalidInput` unless the token may be presented with a write: [`NONE`](Self::NONE) is
    /// never valid and nothing above [`MAX`](Self::MAX) is ever issued.
    pub fn validate(self) -> Result<()> {
        if self == Self::NONE {
            return Err(Error::invalid("fencing token NONE is never valid for a write"));
        }
        if self > Self::MAX {
            return Err(Error::invalid(format!(
                "fencing token {} is above the largest token ever issued ({})",
                self.0,
                Self::MAX.0
            )));
        }
        Ok(())
    }
}

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Check a state key against the documented rules.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("key must not be empty"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(Error::limit("key", MAX_KEY_BYTES as u64, key.len() as u64));
    }
    if key.chars().any(char::is_control) {
        return Err(Error::invalid(format!("key {key:?} contains a control character")));
    }
    Ok(())
}

/// Check a value's size against [`MAX_VALUE_BYTES`].
pub fn validate_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(Error::limit("value", MAX_VALUE_BYTES as u64, value.len() as u64));
    }
    Ok(())
}

/// Check a type name (1 to [`MAX_TYPE_NAME_BYTES`] bytes, no control characters).
pub fn validate_type_name(name: &str) -> Result<()> {
    if name.len() > MAX_TYPE_NAME_BYTES {
        // Not echoed: a huge name would make a huge message.
        return Err(Error::invalid(format!(
            "a type name of {} bytes is over the {MAX_TYPE_NAME_BYTES}-byte limit",
            name.len()
        )));
    }
    if name.is_empty() || name.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "type name {name:?} must be 1..={MAX_TYPE_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn object_ids_follow_documented_rules() {
        for ok in ["a", "user:42", "tenant/a/b", "x@y.z", &"a".repeat(256)] {
            assert!(ObjectId::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", " a", "a b", "/abs", ".hidden", "é", "a\n", &"a".repeat(257)] {
            let e = ObjectId::new(bad).expect_err(bad);
            assert_eq!(e.kind(), &ErrorKind::InvalidInput, "{bad}");
        }
    }

    /// The refusal names the character the id holds, also outside ASCII (it named the first
    /// byte of its UTF-8 encoding read as Latin-1: 'Ã' for 'é').
    #[test]
    fn a_refused_id_names_its_character() {
        let e = ObjectId::new("café").expect_err("non-ASCII");
        assert!(e.to_string().contains("'é'"), "{e}");
        let e = NodeId::new("nœud").expect_err("non-ASCII");
        assert!(e.to_string().contains("'œ'"), "{e}");
        let e = NodeId::new("a/b").expect_err("slash");
        assert!(e.to_string().contains("'/'"), "{e}");
    }

    #[test]
    fn node_ids_reject_slashes() {
        assert!(NodeId::new("node-1.eu:3").is_ok());
        assert!(NodeId::new("a/b").is_err());
        assert!(NodeId::new("").is_err());
    }

    #[test]
    fn keys_and_values_have_limits() {
        assert!(validate_key("profile/name").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("a\0b").is_err());
        assert!(matches!(
            validate_key(&"k".repeat(MAX_KEY_BYTES + 1)).expect_err("long").kind(),
            ErrorKind::LimitExceeded { .. }
        ));
        assert!(validate_value(&vec![0; MAX_VALUE_BYTES]).is_ok());
        assert!(validate_value(&vec![0; MAX_VALUE_BYTES + 1]).is_err());
    }

    #[test]
    fn an_oversized_type_name_is_not_echoed() {
        let huge = "T".repeat(1 << 20);
        let e = validate_type_name(&huge).expect_err("too long");
        assert_eq!(e.kind(), &ErrorKind::InvalidInput);
        assert!(e.to_string().len() < 200, "{} bytes of message", e.to_string().len());
    }
}
