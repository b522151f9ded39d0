//! Task classification, policy rules and the route decision.
