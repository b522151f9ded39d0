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
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || chain.complete(&req)).await {
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
