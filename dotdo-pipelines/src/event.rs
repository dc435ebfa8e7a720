//! Events: the predecessor's stream shape (`do_id`, `type`, `key`, `value` as JSON, `timestamp`).

use bytes::Bytes;
use dotdo_core::ids::{validate_key, validate_type_name, validate_value};
use dotdo_core::{ObjectId, Result, Timestamp};

/// One event sent into a pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The object the event belongs to (`do_id`).
    pub object: ObjectId,
    /// The object's type name (`type`).
    pub type_name: String,
    /// The state key (`key`).
    pub key: String,
    /// The value, typically JSON text (`value`); at most 2 MiB.
    pub value: Bytes,
    /// When the event happened (`timestamp`).
    pub timestamp: Timestamp,
}

impl Event {
    /// `object …, key "…"` for error messages (the key cut to 64 characters).
    pub(crate) fn label(&self) -> String {
        let key: String = self.key.chars().take(64).collect();
        format!("object {}, key {key:?}", self.object)
    }

    /// A new event.
    pub fn new(
        object: ObjectId,
        type_name: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<Bytes>,
        timestamp: Timestamp,
    ) -> Self {
        Event { object, type_name: type_name.into(), key: key.into(), value: value.into(), timestamp }
    }

    /// Check the documented limits (key, type name, value size).
    pub fn validate(&self) -> Result<()> {
        validate_type_name(&self.type_name)?;
        validate_key(&self.key)?;
        validate_value(&self.value)
    }

    /// Approximate in-memory size, for the byte-based roll threshold.
    pub fn size(&self) -> usize {
        self.object.as_str().len() + self.type_name.len() + self.key.len() + self.value.len() + 32
    }
}

/// What a transform does with an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transformed {
    /// Drop it.
    Drop,
    /// Keep it (possibly changed) on the default route.
    Keep(Event),
    /// Send it to the named route (a sink registered with
    /// [`PipelineBuilder::with_route`](crate::PipelineBuilder::with_route)).
    Route(String, Event),
}
