//! The ack identity of a delivered message, and its ACK and NACK frames.

use crate::codec::{Command, Frame, Version};

/// The ack identity of a delivered message, per version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckId {
    pub(crate) version: Version,
    pub(crate) ack: Option<String>,
    pub(crate) message_id: Option<String>,
    pub(crate) subscription: String,
}

impl AckId {
    pub(crate) fn of(version: Version, subscription: &str, frame: &Frame) -> AckId {
        AckId {
            version,
            ack: frame.header("ack").map(str::to_owned),
            message_id: frame.header("message-id").map(str::to_owned),
            subscription: subscription.to_owned(),
        }
    }

    /// ACK or NACK: 1.2 uses the MESSAGE's `ack` value as `id`; 1.1 wants
    /// `message-id` and `subscription`; 1.0 only `message-id`.
    pub(crate) fn frame(&self, command: Command, transaction: Option<&str>) -> Frame {
        let mut frame = Frame::new(command);
        match self.version {
            Version::V1_2 => {
                let id = self
                    .ack
                    .clone()
                    .or_else(|| self.message_id.clone())
                    .unwrap_or_default();
                frame = frame.with_header("id", id);
            }
            Version::V1_1 => {
                frame = frame
                    .with_header("message-id", self.message_id.clone().unwrap_or_default())
                    .with_header("subscription", self.subscription.clone());
            }
            Version::V1_0 => {
                frame =
                    frame.with_header("message-id", self.message_id.clone().unwrap_or_default());
            }
        }
        if let Some(tx) = transaction {
            frame = frame.with_header("transaction", tx.to_owned());
        }
        frame
    }
}
