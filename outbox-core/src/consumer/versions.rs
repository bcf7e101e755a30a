//! Several versions of one event type: the consumer applies the newest and
//! converts the older ones its author declares ([`Versions`]).

use std::fmt::Write as _;

use serde::de::DeserializeOwned;

use super::handler::decode_json;
use crate::inbox::Delivery;

/// The version of a delivery's payload: its `event-version` header, 1 when
/// the message has none (it was sent before its type had versions). A value
/// that is not a whole number from 1 up is an error naming it.
pub fn event_version(delivery: &Delivery) -> Result<u32, String> {
    match delivery.header(outbox_rules::EVENT_VERSION_HEADER) {
        None => Ok(1),
        Some(text) => match text.trim().parse::<u32>() {
            Ok(version) if version >= 1 => Ok(version),
            _ => Err(format!(
                "the `{}` header is {text:?}, not a version (a whole number from 1)",
                outbox_rules::EVENT_VERSION_HEADER
            )),
        },
    }
}

/// A decoder of the versions of one event type a consumer reads: version
/// `current` decodes as `T`, each older version the author declares decodes
/// as its own type and converts into `T` (`From<V> for T`). Any other
/// version is a decode error, so the delivery is parked with that reason
/// (and its bytes) instead of being applied wrongly; replay it once a
/// consumer that reads it runs.
///
/// ```
/// use outbox_core::consumer::{Delivery, Versions};
/// use serde::Deserialize;
///
/// /// Version 1 had one `name`.
/// #[derive(Deserialize)]
/// struct UserCreatedV1 { user_id: i64, name: String }
///
/// /// Version 2 split it and added `email`.
/// #[derive(Deserialize, Debug, PartialEq)]
/// struct UserCreated { user_id: i64, full_name: String, email: Option<String> }
///
/// impl From<UserCreatedV1> for UserCreated {
///     fn from(v1: UserCreatedV1) -> Self {
///         UserCreated { user_id: v1.user_id, full_name: v1.name, email: None }
///     }
/// }
///
/// let versions = Versions::<UserCreated>::new(2).upcast::<UserCreatedV1>(1);
/// assert_eq!(versions.known(), [1, 2]);
/// // In a hand-written `Handler`: `fn decode(&self, d: &Delivery) -> Result<UserCreated, String>`
/// // is `versions.decode(d)`; `#[transactional_event(…, version = 2,
/// // upcast(v1 = UserCreatedV1))]` generates that.
/// # let _ = |d: &Delivery| versions.decode(d);
/// ```
pub struct Versions<T> {
    current: u32,
    older: Vec<(u32, Decoder<T>)>,
}

/// Decodes one version's payload into the type the handler applies.
type Decoder<T> = fn(&Delivery) -> Result<T, String>;

impl<T> std::fmt::Debug for Versions<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Versions")
            .field("current", &self.current)
            .field(
                "older",
                &self.older.iter().map(|(v, _)| *v).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<T: DeserializeOwned> Versions<T> {
    /// Reads version `current` (from 1) as `T`, and no other yet.
    pub fn new(current: u32) -> Versions<T> {
        Versions {
            current,
            older: Vec::new(),
        }
    }

    /// Also reads version `version` as `V`, converted into `T`. A version
    /// declared twice keeps its last decoder.
    #[must_use]
    pub fn upcast<V: DeserializeOwned + Into<T>>(mut self, version: u32) -> Versions<T> {
        self.older.retain(|(v, _)| *v != version);
        self.older.push((version, upcast_from::<V, T>));
        self
    }

    /// The versions read, in ascending order.
    pub fn known(&self) -> Vec<u32> {
        let mut known: Vec<u32> = self.older.iter().map(|(v, _)| *v).collect();
        known.push(self.current);
        known.sort_unstable();
        known.dedup();
        known
    }

    /// Decodes `delivery` by its version; an unknown version is an error
    /// that names it, the event type and the versions this consumer reads.
    pub fn decode(&self, delivery: &Delivery) -> Result<T, String> {
        let version = event_version(delivery)?;
        if version == self.current {
            return decode_json::<T>(delivery);
        }
        if let Some((_, decode)) = self.older.iter().find(|(v, _)| *v == version) {
            return decode(delivery);
        }
        let mut known = String::new();
        for (i, v) in self.known().iter().enumerate() {
            let _ = write!(known, "{}{v}", if i == 0 { "" } else { ", " });
        }
        Err(format!(
            "version {version} of event type {} is not one this consumer reads \
             (versions {known}); deploy a consumer that reads it, then replay the event",
            delivery.event_type.as_deref().unwrap_or("(none)")
        ))
    }
}

/// Decodes version `V` and converts it.
fn upcast_from<V: DeserializeOwned + Into<T>, T>(delivery: &Delivery) -> Result<T, String> {
    decode_json::<V>(delivery).map(Into::into)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize)]
    struct V1 {
        id: i64,
        name: String,
    }

    #[derive(Deserialize, Debug, PartialEq)]
    struct V2 {
        id: i64,
        full_name: String,
    }

    impl From<V1> for V2 {
        fn from(v1: V1) -> V2 {
            V2 {
                id: v1.id,
                full_name: v1.name,
            }
        }
    }

    fn delivery(body: &str, version: Option<&str>) -> Delivery {
        let mut headers = vec![("event-type".to_owned(), "user.created".to_owned())];
        if let Some(v) = version {
            headers.push((outbox_rules::EVENT_VERSION_HEADER.to_owned(), v.to_owned()));
        }
        Delivery {
            event_id: "e-1".to_owned(),
            event_type: Some("user.created".to_owned()),
            key: None,
            headers,
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            attempt: 0,
        }
    }

    #[test]
    fn the_current_version_decodes_as_is_and_older_ones_through_their_conversion() {
        let versions = Versions::<V2>::new(2).upcast::<V1>(1);
        let v2 = delivery(r#"{"id":1,"full_name":"Ada"}"#, Some("2"));
        let v1 = delivery(r#"{"id":2,"name":"Bob"}"#, Some("1"));
        let unmarked = delivery(r#"{"id":3,"name":"Cy"}"#, None);
        assert_eq!(versions.decode(&v2).unwrap().full_name, "Ada");
        assert_eq!(
            versions.decode(&v1).unwrap(),
            V2 {
                id: 2,
                full_name: "Bob".into()
            }
        );
        assert_eq!(versions.decode(&unmarked).unwrap().full_name, "Cy");
    }

    #[test]
    fn an_unknown_version_is_an_error_naming_it_and_what_is_read() {
        let versions = Versions::<V2>::new(2).upcast::<V1>(1);
        let error = versions
            .decode(&delivery(r#"{"id":1}"#, Some("3")))
            .unwrap_err();
        assert!(
            error.contains("version 3 of event type user.created"),
            "{error}"
        );
        assert!(error.contains("versions 1, 2"), "{error}");
        // Without an upcast, version 1 is not read either.
        let only_two = Versions::<V2>::new(2);
        let error = only_two
            .decode(&delivery(r#"{"id":1,"name":"A"}"#, None))
            .unwrap_err();
        assert!(error.contains("version 1"), "{error}");
    }

    #[test]
    fn a_version_header_that_is_not_a_number_is_an_error() {
        for bad in ["two", "0", "-1", ""] {
            let error = event_version(&delivery("{}", Some(bad))).unwrap_err();
            assert!(error.contains("not a version"), "{bad}: {error}");
        }
        assert_eq!(event_version(&delivery("{}", Some(" 4 "))), Ok(4));
    }

    #[test]
    fn a_payload_that_does_not_fit_its_version_is_a_decode_error() {
        let versions = Versions::<V2>::new(2).upcast::<V1>(1);
        let error = versions
            .decode(&delivery(r#"{"id":1,"full_name":"A"}"#, Some("1")))
            .unwrap_err();
        assert!(error.contains("V1"), "{error}");
    }
}
