//! The remote chain as the pipeline uses it: configured providers by name, called off the async
//! threads (providers are blocking HTTP clients with their own retries and circuit breakers).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc::Sender;

use super::{RemoteChain, RemoteFuture};
use crate::providers::{
    Chain, ChainError, ChatRequest, ChatResponse, Delta, Provider, ProviderConfig, ProviderError,
};

/// Providers by their configured name, built once so circuit breakers see every request.
#[derive(Debug, Clone, Default)]
pub struct Providers(pub BTreeMap<String, Arc<Provider>>);

impl Providers {
    pub fn from_config(providers: &BTreeMap<String, ProviderConfig>) -> Providers {
        Providers(
            providers
                .iter()
                .map(|(n, c)| (n.clone(), Arc::new(Provider::new(n, c.clone()))))
                .collect(),
        )
    }
}

impl Providers {
    fn chain(&self, providers: &[String]) -> Chain {
        Chain::new(
            providers
                .iter()
                .filter_map(|n| self.0.get(n).cloned())
                .collect(),
        )
    }
}

/// Dropped with the request's task (the client went away, or the request timed out): the flag
/// stops the chain's further attempts, backoffs and providers, and a stream being read.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Runs `call` (the chain, on a blocking thread) with `req`'s cancel flag raised when the
/// returned future is dropped.
fn off_thread(
    mut req: ChatRequest,
    call: impl FnOnce(&ChatRequest) -> Result<ChatResponse, ChainError> + Send + 'static,
) -> RemoteFuture {
    let flag = Arc::new(AtomicBool::new(false));
    req.cancel = Some(flag.clone());
    Box::pin(async move {
        let guard = CancelOnDrop(flag);
        let r = tokio::task::spawn_blocking(move || call(&req)).await;
        // Finished: setting the flag now is harmless.
        drop(guard);
        match r {
            Ok(r) => r,
            // The blocking task panicked or the runtime is going away: no provider answered.
            Err(e) => Err(ChainError {
                errors: vec![ProviderError::Transport {
                    provider: "(corral)".into(),
                    message: format!("the provider call did not finish: {e}"),
                }],
            }),
        }
    })
}

impl RemoteChain for Providers {
    fn complete(&self, providers: &[String], req: ChatRequest) -> RemoteFuture {
        let chain = self.chain(providers);
        off_thread(req, move |req| chain.complete(req))
    }

    fn stream(
        &self,
        providers: &[String],
        req: ChatRequest,
        pieces: Sender<Delta>,
    ) -> RemoteFuture {
        let chain = self.chain(providers);
        off_thread(req, move |req| {
            // A closed receiver (the caller went away) refuses the next piece, which closes
            // the provider's connection.
            let mut sink = |d: Delta| !req.cancelled() && pieces.blocking_send(d).is_ok();
            chain.stream(req, &mut sink)
        })
    }
}
