//! Hand-made deliveries, for handlers in tests.

use std::fmt::Display;

use bytes::Bytes;
use serde::Serialize;

use crate::event::JSON;
use crate::{Delivery, Error};

/// Hand-made deliveries, for handlers in tests.
impl Delivery {
    /// A delivery of event `event_id` whose payload is `payload` as JSON,
    /// with the `event-id` and `content-type` headers a relay sends. Add the
    /// type, key and other headers with [`with_type`](Delivery::with_type),
    /// [`with_key`](Delivery::with_key) and
    /// [`with_header`](Delivery::with_header).
    pub fn json<T: Serialize + ?Sized>(
        event_id: impl Display,
        payload: &T,
    ) -> Result<Delivery, Error> {
        let body = serde_json::to_vec(payload).map_err(|source| Error::Serialize {
            event_type: String::new(),
            source,
        })?;
        Ok(Delivery::raw(event_id, body).with_header("content-type", JSON))
    }

    /// A delivery of event `event_id` with the payload `body` as it is.
    pub fn raw(event_id: impl Display, body: impl Into<Bytes>) -> Delivery {
        let event_id = event_id.to_string();
        Delivery {
            headers: vec![("event-id".to_owned(), event_id.clone())],
            event_id,
            event_type: None,
            key: None,
            body: body.into(),
            attempt: 0,
        }
    }

    /// Sets the event type (the `event-type` header).
    pub fn with_type(mut self, event_type: impl Into<String>) -> Delivery {
        let event_type = event_type.into();
        self.set_header("event-type", &event_type);
        self.event_type = Some(event_type);
        self
    }

    /// Sets the aggregate key (the `event-key` and `JMSXGroupID` headers).
    pub fn with_key(mut self, key: impl Display) -> Delivery {
        let key = key.to_string();
        self.set_header("event-key", &key);
        self.set_header("JMSXGroupID", &key);
        self.key = Some(key);
        self
    }

    /// Sets header `name` (replacing a header of that name).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Delivery {
        let (name, value) = (name.into(), value.into());
        self.set_header(&name, &value);
        self
    }

    fn set_header(&mut self, name: &str, value: &str) {
        self.headers.retain(|(k, _)| k != name);
        self.headers.push((name.to_owned(), value.to_owned()));
    }
}
