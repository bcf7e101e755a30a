//! How a `#[transactional_event]` producer hands the framework's own errors
//! (an event that does not serialise, a refused append, a failed begin or
//! commit in the pool form) to the function's error type `E`, chosen at
//! compile time by the first rule that applies:
//!
//! 1. `E: From<Error>`: converted directly (`outbox::core::Error`, an
//!    application enum with a variant for it, `anyhow::Error`,
//!    `Box<dyn std::error::Error>`);
//! 2. `E: From<sqlx::Error>`: converted through `sqlx::Error` (see
//!    `impl From<Error> for sqlx::Error`), so a producer returning
//!    `sqlx::Error`, or an application error that wraps only `sqlx::Error`,
//!    needs nothing more;
//! 3. otherwise a compile error that names both ways out.
//!
//! The choice is made by method resolution on a reference ladder (`&&W`,
//! `&W`, `W`): the first step whose trait applies wins, so no rule needs
//! specialisation. The generated code calls
//! `(&&ErrorInto::<<R as ProducerResult>::Err>::new()).into_user_error(e)`,
//! where `R` is the function's return type as written.

use std::marker::PhantomData;

use crate::Error;

/// The error type of a producer's `Result` (also through an alias such as
/// `anyhow::Result<T>`).
pub trait ProducerResult {
    /// The error type.
    type Err;
}

impl<T, E> ProducerResult for Result<T, E> {
    type Err = E;
}

/// Selects how an [`Error`] becomes `E`; see the module documentation.
pub struct ErrorInto<E>(PhantomData<fn() -> E>);

impl<E> ErrorInto<E> {
    /// The selector for `E`.
    #[allow(clippy::new_without_default)]
    pub fn new() -> ErrorInto<E> {
        ErrorInto(PhantomData)
    }
}

impl<E> Clone for ErrorInto<E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<E> Copy for ErrorInto<E> {}

/// Rule 1: `E: From<Error>`.
pub trait ViaOutboxError<E> {
    /// Converts `error`.
    fn into_user_error(self, error: Error) -> E;
}

impl<E: From<Error>> ViaOutboxError<E> for &&ErrorInto<E> {
    fn into_user_error(self, error: Error) -> E {
        E::from(error)
    }
}

/// Rule 2: `E: From<sqlx::Error>`.
pub trait ViaSqlxError<E> {
    /// Converts `error` through `sqlx::Error`.
    fn into_user_error(self, error: Error) -> E;
}

impl<E: From<sqlx::Error>> ViaSqlxError<E> for &ErrorInto<E> {
    fn into_user_error(self, error: Error) -> E {
        E::from(sqlx::Error::from(error))
    }
}

/// Rule 3: neither; the bound below carries the message.
pub trait NoConversion<E> {
    /// Never compiles: `E` cannot hold the error.
    fn into_user_error(self, error: Error) -> E
    where
        E: HoldsOutboxErrors;
}

impl<E> NoConversion<E> for ErrorInto<E> {
    fn into_user_error(self, error: Error) -> E
    where
        E: HoldsOutboxErrors,
    {
        E::hold(error)
    }
}

/// Implemented by no type: the error a producer whose error type converts
/// from neither [`Error`] nor `sqlx::Error` gets.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot hold the errors of appending events: implement `From<outbox::core::Error>` or `From<sqlx::Error>` for it",
    label = "the error type of this `#[transactional_event]` producer",
    note = "appending can fail (an event that does not serialise, a database error), and the generated code returns that error as `{Self}`"
)]
pub trait HoldsOutboxErrors: Sized {
    /// Unreachable: no type implements the trait.
    fn hold(error: Error) -> Self;
}

#[cfg(test)]
// The ladder's extra references are what selects the rule.
#[allow(clippy::needless_borrow)]
mod tests {
    use super::*;

    #[derive(Debug)]
    enum OnlySqlx {
        Db(sqlx::Error),
    }

    impl From<sqlx::Error> for OnlySqlx {
        fn from(e: sqlx::Error) -> Self {
            OnlySqlx::Db(e)
        }
    }

    #[derive(Debug)]
    enum Both {
        Outbox(Error),
        #[allow(dead_code)]
        Db(sqlx::Error),
    }

    impl From<sqlx::Error> for Both {
        fn from(e: sqlx::Error) -> Self {
            Both::Db(e)
        }
    }

    impl From<Error> for Both {
        fn from(e: Error) -> Self {
            Both::Outbox(e)
        }
    }

    fn invalid() -> Error {
        Error::InvalidEvent("no".to_owned())
    }

    #[test]
    fn an_error_type_that_takes_the_outbox_error_gets_it_as_it_is() {
        let e: Both = (&&ErrorInto::<<Result<(), Both> as ProducerResult>::Err>::new())
            .into_user_error(invalid());
        assert!(matches!(e, Both::Outbox(Error::InvalidEvent(_))), "{e:?}");
        let e: Error = (&&ErrorInto::<<Result<(), Error> as ProducerResult>::Err>::new())
            .into_user_error(invalid());
        assert!(matches!(e, Error::InvalidEvent(_)));
    }

    #[test]
    fn an_error_type_that_takes_only_sqlx_errors_gets_them_through_sqlx() {
        let e: OnlySqlx = (&&ErrorInto::<<Result<(), OnlySqlx> as ProducerResult>::Err>::new())
            .into_user_error(Error::Database {
                action: "committing",
                source: sqlx::Error::PoolTimedOut,
            });
        assert!(
            matches!(e, OnlySqlx::Db(sqlx::Error::PoolTimedOut)),
            "a database error is the sqlx error itself: {e:?}"
        );
        let e: sqlx::Error =
            (&&ErrorInto::<<Result<(), sqlx::Error> as ProducerResult>::Err>::new())
                .into_user_error(invalid());
        let sqlx::Error::Encode(source) = e else {
            panic!("an invalid event is an encode error: {e:?}");
        };
        assert!(matches!(
            source.downcast_ref::<Error>(),
            Some(Error::InvalidEvent(_))
        ));
    }
}
