//! The request plane: submitting generate requests to one instance and streaming its
//! token events back. The embedded [`LocalClient`] calls an in-process engine through its
//! handle; a network client (framed TCP with deadlines and cancellation) implements the
//! same trait.
//!
//! Contract for every implementation:
//! - a stream yields the request's events and ends after the one with a finish reason;
//!   a stream that ends without one means the instance went away;
//! - dropping a stream before its end cancels the request on the instance;
//! - an event with `FinishReason::Abort` that the caller did not ask for means the
//!   instance stopped the request (it is shutting down or failing).

use engine::core::{EngineHandle, EngineStats, GenerateRequest, SubmitError, TokenEvent};
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use futures_util::FutureExt;
use protocol::KvSnapshot;

pub type TokenStream = BoxStream<'static, TokenEvent>;

pub trait InstanceClient: Send + Sync + 'static {
    /// Queues several requests, all or none (the `n` choices of one API call).
    fn submit_many(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> BoxFuture<'static, Result<Vec<TokenStream>, SubmitError>>;
    /// The instance's prefix cache and the last KV event id it reflects.
    fn kv_snapshot(&self) -> BoxFuture<'static, Option<KvSnapshot>>;
    fn stats(&self) -> BoxFuture<'static, Option<EngineStats>>;
    fn reset_prefix_cache(&self) -> BoxFuture<'static, Option<bool>>;
    /// Requests admitted and not finished, as the instance counts them.
    fn pending(&self) -> usize;
    /// False once the instance has stopped taking requests.
    fn is_alive(&self) -> bool;
    /// Stops the instance: in-flight requests end with an abort. (For instances this
    /// process owns; a remote client asks the instance's node agent.)
    fn shutdown(&self);
}

/// An engine in this process.
#[derive(Clone)]
pub struct LocalClient {
    handle: EngineHandle,
}

impl LocalClient {
    pub fn new(handle: EngineHandle) -> Self {
        LocalClient { handle }
    }

    pub fn handle(&self) -> &EngineHandle {
        &self.handle
    }
}

impl InstanceClient for LocalClient {
    fn submit_many(
        &self,
        reqs: Vec<GenerateRequest>,
    ) -> BoxFuture<'static, Result<Vec<TokenStream>, SubmitError>> {
        // Admission is synchronous in process; the future is already resolved.
        let r = self.handle.submit_many(reqs).map(|streams| {
            streams
                .into_iter()
                .map(|rs| {
                    stream::unfold(rs, |mut rs| async move {
                        let ev = rs.next().await?;
                        Some((ev, rs))
                    })
                    .boxed()
                })
                .collect()
        });
        futures_util::future::ready(r).boxed()
    }

    fn kv_snapshot(&self) -> BoxFuture<'static, Option<KvSnapshot>> {
        let h = self.handle.clone();
        async move { h.kv_snapshot().await }.boxed()
    }

    fn stats(&self) -> BoxFuture<'static, Option<EngineStats>> {
        let h = self.handle.clone();
        async move { h.stats().await }.boxed()
    }

    fn reset_prefix_cache(&self) -> BoxFuture<'static, Option<bool>> {
        let h = self.handle.clone();
        async move { h.reset_prefix_cache().await }.boxed()
    }

    fn pending(&self) -> usize {
        self.handle.pending()
    }

    fn is_alive(&self) -> bool {
        self.handle.is_alive()
    }

    fn shutdown(&self) {
        self.handle.shutdown();
    }
}
