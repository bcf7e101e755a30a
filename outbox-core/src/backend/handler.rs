//! A handler's transaction, which keeps a handler's writes inside it even
//! where the database rolls a transaction back underneath (MySQL).

use sqlx::{Pool, Transaction};

use super::{Backend, HandlerSession, Query};

/// A handler's transaction. Where the database needs it
/// ([`Dialect::handler_session`]), the session runs without autocommit while
/// the transaction is open, so that whatever a handler writes after the
/// database rolled its transaction back underneath is part of a transaction
/// that the consumer's own rollback discards, never committed on its own.
/// The session is switched back before the connection returns to the pool:
/// by [`commit`](HandlerTx::commit) and [`rollback`](HandlerTx::rollback),
/// and, when the transaction is dropped unfinished (an error returned early,
/// a future abandoned), by a task that rolls back and switches back on the
/// same connection.
pub(crate) struct HandlerTx<DB: Backend> {
    /// Present until the transaction is finished.
    tx: Option<Transaction<'static, DB>>,
    /// The session was switched and must be switched back.
    session: Option<HandlerSession>,
}

impl<DB: Backend> HandlerTx<DB> {
    /// Begins a writing transaction ([`Backend::begin_write`]) and switches
    /// the session where the database needs it.
    pub(crate) async fn begin(pool: &Pool<DB>) -> Result<HandlerTx<DB>, sqlx::Error> {
        let mut tx = DB::begin_write(pool).await?;
        let Some(session) = DB::DIALECT.handler_session else {
            return Ok(HandlerTx {
                tx: Some(tx),
                session: None,
            });
        };
        // Dropped on failure: sqlx rolls back, and the switch did not happen
        // or failed with the connection.
        DB::exec(&mut tx, &Query::fixed(DB::DIALECT, session.enter)).await?;
        Ok(HandlerTx {
            tx: Some(tx),
            session: Some(session),
        })
    }

    /// Commits the transaction.
    pub(crate) async fn commit(mut self) -> Result<(), sqlx::Error> {
        self.finish(true).await
    }

    /// Rolls the transaction back.
    pub(crate) async fn rollback(mut self) -> Result<(), sqlx::Error> {
        self.finish(false).await
    }

    async fn finish(&mut self, commit: bool) -> Result<(), sqlx::Error> {
        let Some(mut tx) = self.tx.take() else {
            return Ok(());
        };
        if let Some(session) = self.session {
            let end = if commit {
                session.commit
            } else {
                session.rollback
            };
            if let Err(error) = DB::exec(&mut tx, &Query::fixed(DB::DIALECT, end)).await {
                // Rolled back and switched back by `Drop`.
                self.tx = Some(tx);
                return Err(error);
            }
            if let Err(error) = DB::exec(&mut tx, &Query::fixed(DB::DIALECT, session.leave)).await {
                self.tx = Some(tx);
                return Err(error);
            }
            self.session = None;
        }
        // Where the session was switched, the transaction has ended already
        // and this statement finds nothing to do; sqlx needs it to know.
        if commit {
            tx.commit().await
        } else {
            tx.rollback().await
        }
    }
}

impl<DB: Backend> std::ops::Deref for HandlerTx<DB> {
    type Target = Transaction<'static, DB>;

    fn deref(&self) -> &Self::Target {
        self.tx
            .as_ref()
            .expect("a handler transaction is used only until it is finished")
    }
}

impl<DB: Backend> std::ops::DerefMut for HandlerTx<DB> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.tx
            .as_mut()
            .expect("a handler transaction is used only until it is finished")
    }
}

impl<DB: Backend> Drop for HandlerTx<DB> {
    fn drop(&mut self) {
        let (Some(mut tx), Some(session)) = (self.tx.take(), self.session.take()) else {
            // Not switched: sqlx rolls back on its own.
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "a handler transaction was dropped outside a runtime; its connection may stay without autocommit"
            );
            return;
        };
        runtime.spawn(async move {
            let restored = async {
                DB::exec(&mut tx, &Query::fixed(DB::DIALECT, session.rollback)).await?;
                DB::exec(&mut tx, &Query::fixed(DB::DIALECT, session.leave)).await?;
                tx.rollback().await
            }
            .await;
            if let Err(error) = restored {
                // A connection that cannot run a statement fails the pool's
                // check on its return and is closed.
                tracing::warn!(%error, "could not switch a dropped handler transaction's session back");
            }
        });
    }
}
