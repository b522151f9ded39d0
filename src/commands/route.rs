//! `corral route --explain`: the route a prompt would take, with the trace of every policy
//! looked at, without running anything.

use crate::config::Config;
use crate::routing::{RequestContext, RouteDecision, Selection, TaskType};

/// Who is asking and about what: the request context flags shared by `run` and `route`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CallerArgs {
    /// Calling agent id (policies and allow lists match on it)
    #[arg(long, value_name = "ID")]
    pub agent: Option<String>,
    /// Caller's team
    #[arg(long, value_name = "TEAM")]
    pub team: Option<String>,
    /// Caller's API key alias
    #[arg(long = "key", value_name = "ALIAS")]
    pub key_alias: Option<String>,
    /// Task type, overriding classification (Intent, Extract, Template, BoilerplateCode,
    /// CodeGeneration, Reasoning, Analysis, Summarization, Translation, QA, or a custom one)
    #[arg(long, value_name = "TASK")]
    pub task: Option<TaskType>,
    /// Request metadata for policies, KEY=VALUE (repeatable)
    #[arg(long = "metadata", value_name = "KEY=VALUE")]
    pub metadata: Vec<String>,
}

impl CallerArgs {
    /// The request context for `prompt`; `model` is the model the caller asked for, if any.
    pub fn context(&self, prompt: &str, model: Option<&str>) -> crate::Result<RequestContext> {
        let mut metadata = std::collections::BTreeMap::new();
        for kv in &self.metadata {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                crate::Error::Usage(format!("--metadata {kv}: expected KEY=VALUE"))
            })?;
            metadata.insert(k.to_string(), v.to_string());
        }
        Ok(RequestContext {
            prompt: prompt.to_string(),
            task_hint: self.task.clone(),
            agent: self.agent.clone(),
            team: self.team.clone(),
            key_alias: self.key_alias.clone(),
            requested_model: model.map(String::from),
            requested_profile: None,
            metadata,
            required_capabilities: vec![],
            minute_of_day: None,
        })
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RouteArgs {
    /// Print the full trace (every policy looked at and why it did or did not apply)
    #[arg(long)]
    pub explain: bool,
    /// Print the decision as JSON
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub caller: CallerArgs,
    /// The model the request asks for (scoped policies may match on it)
    #[arg(long, value_name = "ID")]
    pub model: Option<String>,
    /// The prompt to route
    pub prompt: String,
}

/// One line describing the selection.
pub fn describe(d: &RouteDecision) -> String {
    match &d.selection {
        Selection::Slm { model, profile } => format!(
            "slm {model} (profile {profile}), accepted at confidence >= {}",
            d.confidence_required.unwrap_or(0.0)
        ),
        Selection::Llm {
            providers,
            model: None,
        } => format!("llm via {}", providers.join(" -> ")),
        Selection::Llm {
            providers,
            model: Some(m),
        } => format!("llm via {} (model {m})", providers.join(" -> ")),
        Selection::Deny { reason } => format!("deny: {reason}"),
    }
}

pub fn route(config: &Config, args: &RouteArgs) -> crate::Result<i32> {
    // As the server and `corral run`: a name nothing configured is an error, not a route.
    if let Some(m) = args.model.as_deref() {
        if config.routing.resolve(m) == crate::routing::Named::Unknown {
            return Err(crate::answer::Failure::UnknownModel(m.to_string()).into());
        }
    }
    let ctx = args.caller.context(&args.prompt, args.model.as_deref())?;
    let d = config.routing.explain(&ctx);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        return Ok(0);
    }
    println!("route: {}", describe(&d));
    println!(
        "task: {} ({}), complexity {:?} ({:.2})",
        d.task.task, d.task.source, d.task.complexity, d.task.complexity_score
    );
    println!("policies applied: {}", d.policies_applied.join(", "));
    println!(
        "fallback: {}",
        if d.fallback_available {
            config.routing.fallback.join(" -> ")
        } else {
            "none configured".into()
        }
    );
    if args.explain {
        println!("trace:");
        for l in d
            .task
            .evidence
            .iter()
            .map(|e| format!("classify: {e}"))
            .chain(d.reasoning.iter().cloned())
        {
            println!("  - {l}");
        }
    }
    Ok(0)
}
