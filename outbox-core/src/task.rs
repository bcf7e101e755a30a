//! The handle of a running relay or consumer.

use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::Error;

/// A relay or consumer running on a task, with its counters `M`: stop it
/// gracefully with [`shutdown`](TaskHandle::shutdown). See [`RelayHandle`]
/// and [`ConsumerHandle`] for what stopping finishes.
///
/// [`RelayHandle`]: crate::relay::RelayHandle
/// [`ConsumerHandle`]: crate::consumer::ConsumerHandle
#[derive(Debug)]
pub struct TaskHandle<M> {
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), Error>>,
    pub(crate) metrics: Arc<M>,
    what: &'static str,
}

impl<M> TaskHandle<M> {
    /// Runs `run` on a task; it should end once `stopped` turns `true`.
    pub(crate) fn spawn<F>(
        what: &'static str,
        metrics: Arc<M>,
        run: impl FnOnce(watch::Receiver<bool>) -> F,
    ) -> TaskHandle<M>
    where
        F: std::future::Future<Output = Result<(), Error>> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        TaskHandle {
            task: tokio::spawn(run(stopped)),
            stop,
            metrics,
            what,
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<M> {
        &self.metrics
    }

    /// Asks the task to stop, lets it finish what is in flight, and waits
    /// for it. Returns why it stopped if it stopped on its own before
    /// ([`Error::BrokerGone`]), and [`Error::TaskFailed`] if it panicked.
    pub async fn shutdown(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        match self.task.await {
            Ok(result) => result,
            Err(join) => Err(Error::TaskFailed(format!("{}: {join}", self.what))),
        }
    }

    /// `true` once the task has ended, which before
    /// [`shutdown`](TaskHandle::shutdown) only happens when it stopped for
    /// good ([`Error::BrokerGone`]) or panicked; `shutdown` then says why.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}
