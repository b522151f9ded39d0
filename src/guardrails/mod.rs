//! PII detection and masking, and prompt-injection detection (shared by routing guardrails and the audit log).
