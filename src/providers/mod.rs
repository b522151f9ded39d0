//! Remote LLM providers: OpenAI-compatible chat completions and Anthropic Messages.
