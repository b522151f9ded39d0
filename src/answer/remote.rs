//! The remote chain as the pipeline uses it: configured providers by name, called off the async
//! threads (providers are blocking HTTP clients with their own retries and circuit breakers).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{RemoteChain, RemoteFuture};
use crate::providers::{Chain, ChainError, ChatRequest, Provider, ProviderConfig, ProviderError};

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

impl RemoteChain for Providers {
    fn complete(&self, providers: &[String], req: ChatRequest) -> RemoteFuture {
        let chain = Chain::new(
            providers
                .iter()
                .filter_map(|n| self.0.get(n).cloned())
                .collect(),
        );
        // Dropped with the request's task (the client went away, or the request timed out):
        // the flag stops the chain's further attempts, backoffs and providers.
        struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for CancelOnDrop {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Release);
            }
        }
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut req = req;
        req.cancel = Some(flag.clone());
        Box::pin(async move {
            let guard = CancelOnDrop(flag);
            let r = tokio::task::spawn_blocking(move || chain.complete(&req)).await;
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
}
