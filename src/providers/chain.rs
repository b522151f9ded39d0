//! [`Chain`]: an ordered fallback over providers.

use std::sync::Arc;

use super::{ChatRequest, ChatResponse, Provider, ProviderError, Sink};

/// Providers tried in order until one answers.
#[derive(Debug, Clone)]
pub struct Chain {
    providers: Vec<Arc<Provider>>,
}

/// Every provider of a chain failed; one error per provider, in chain order.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(.errors))]
pub struct ChainError {
    pub errors: Vec<ProviderError>,
}

fn describe(errors: &[ProviderError]) -> String {
    if errors.is_empty() {
        return "no provider to try: the fallback chain is empty".into();
    }
    // Each error already begins with "provider NAME: ".
    let each: Vec<String> = errors.iter().map(ToString::to_string).collect();
    format!("every provider failed: {}", each.join("; "))
}

impl Chain {
    pub fn new(providers: Vec<Arc<Provider>>) -> Chain {
        Chain { providers }
    }

    pub fn providers(&self) -> &[Arc<Provider>] {
        &self.providers
    }

    /// The first answer of the providers in order. A provider whose circuit is open is skipped
    /// without a request (its `CircuitOpen` error is recorded); any other failure, the
    /// caller's included (a 400 from one provider may be another's success), moves on to the
    /// next provider.
    pub fn complete(&self, req: &ChatRequest) -> Result<ChatResponse, ChainError> {
        self.run(req, None)
    }

    /// As [`Chain::complete`], streaming the answer into `sink` ([`Provider::stream`]). Once a
    /// provider's answer has begun, its failure ends the chain: no later provider is asked.
    pub fn stream(&self, req: &ChatRequest, sink: Sink<'_>) -> Result<ChatResponse, ChainError> {
        self.run(req, Some(sink))
    }

    fn run(
        &self,
        req: &ChatRequest,
        mut sink: Option<Sink<'_>>,
    ) -> Result<ChatResponse, ChainError> {
        let mut errors = Vec::new();
        for provider in &self.providers {
            if req.cancelled() {
                // The caller went away: no later provider is asked.
                errors.push(ProviderError::Cancelled {
                    provider: provider.name().to_string(),
                });
                break;
            }
            let answer = match sink.as_mut() {
                None => provider.complete(req),
                Some(sink) => provider.stream(req, &mut **sink),
            };
            match answer {
                Ok(response) => {
                    if !errors.is_empty() {
                        tracing::info!(
                            provider = provider.name(),
                            skipped = errors.len(),
                            "fell back to a later provider"
                        );
                    }
                    return Ok(response);
                }
                Err(e) => {
                    let begun = matches!(
                        e,
                        ProviderError::Interrupted { .. } | ProviderError::Cancelled { .. }
                    );
                    errors.push(e);
                    if begun {
                        break;
                    }
                }
            }
        }
        Err(ChainError { errors })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_chain_says_so() {
        let err = Chain::new(Vec::new()).complete(&ChatRequest::default());
        let message = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(message, "no provider to try: the fallback chain is empty");
    }

    #[test]
    fn the_message_lists_each_provider_once() {
        let e = ChainError {
            errors: vec![
                ProviderError::Timeout {
                    provider: "a".into(),
                    ms: 5,
                },
                ProviderError::MissingKey {
                    provider: "b".into(),
                    env: "B_KEY".into(),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "every provider failed: provider a: timed out after 5 ms; provider b: environment variable B_KEY (providers.b.api_key_env) is not set"
        );
    }
}
