//! The pipeline's table: a scripted local model, a scripted remote chain, real routing from a
//! configuration file. No root, no weights.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use super::testing::{Script, ScriptedChain, ScriptedModel};
use super::*;
use crate::audit::{Interaction, Route};
use crate::config::{Config, Sources};
use corral_protocol::Input;

const FALLBACK: &str = r#"
[providers.remote]
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
model = "remote-large"
[routing.llm_fallback]
providers = ["remote"]
[routing.confidence_thresholds]
default = 0.5
"#;

fn config(toml_text: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("corral.toml");
    std::fs::write(&p, toml_text).unwrap();
    Config::load_with_env(
        &Sources {
            config: Some(p),
            profiles_dir: None,
        },
        &|_| None,
    )
    .unwrap()
}

struct Case {
    local: Arc<ScriptedModel>,
    remote: Arc<ScriptedChain>,
    pipeline: Pipeline,
}

fn case(toml_text: &str, scripts: Vec<Script>) -> Case {
    let local = Arc::new(ScriptedModel::new(scripts));
    let remote = Arc::new(ScriptedChain::new(vec![Ok("Remote says teal")]));
    let pipeline = Pipeline {
        router: config(toml_text).routing.clone(),
        local: local.clone(),
        remote: remote.clone(),
        audit: true,
        prefix_cache: Default::default(),
        calibrators: Default::default(),
    };
    Case {
        local,
        remote,
        pipeline,
    }
}

fn sure() -> Script {
    Script::Answer(vec![("Teal", -0.01), (" it", -0.02), (" is.", -0.01)])
}

fn unsure() -> Script {
    Script::Answer(vec![("Maybe", -2.5), (" mauve", -3.0)])
}

fn caller(agent: Option<&str>) -> Caller {
    Caller {
        agent: agent.map(String::from),
        team: Some("t-research".into()),
        key_alias: None,
    }
}

fn req(prompt: &str) -> Request {
    Request::chat("req-1", vec![("user".into(), prompt.into())])
}

fn answer(c: &Case, r: &Request) -> Outcome {
    rt().block_on(c.pipeline.answer(&caller(None), r, None))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn an_answer_above_the_threshold_is_the_slms() {
    let c = case(FALLBACK, vec![sure()]);
    let o = answer(&c, &req("Name a colour."));
    let a = o.result.as_ref().unwrap();
    assert_eq!(a.source, Source::Slm);
    assert_eq!(a.text, "Teal it is.");
    assert!(a.escalation.is_none() && !a.below_threshold);
    assert!(a.confidence.unwrap() > 0.9, "{:?}", a.confidence);
    assert_eq!(a.threshold, Some(0.5));
    assert_eq!((a.prompt_tokens, a.completion_tokens), (7, 3));
    assert_eq!(c.remote.called(), 0);
    let jobs = c.local.jobs.lock().unwrap();
    assert_eq!(jobs[0].0, "smollm2-135m-instruct");
    assert_eq!(jobs[0].2.max_tokens, 256);
    // The audit record says the same.
    assert_eq!(o.audit.as_ref().unwrap().interaction, Interaction::Chat);
    assert_eq!(o.audit.as_ref().unwrap().route, Some(Route::Slm));
    assert_eq!(o.audit.as_ref().unwrap().request_id, "req-1");
    assert_eq!(
        o.audit.as_ref().unwrap().caller.team.as_deref(),
        Some("t-research")
    );
    assert_eq!(o.audit.as_ref().unwrap().confidence, a.confidence);
    assert_eq!(o.audit.as_ref().unwrap().response["text"], "Teal it is.");
    assert_eq!(
        o.audit.as_ref().unwrap().request["messages"][0]["content"],
        "Name a colour."
    );
    assert!(
        o.audit.as_ref().unwrap().error.is_none()
            && o.audit.as_ref().unwrap().escalation_reason.is_none()
    );
}

#[test]
fn an_answer_below_the_threshold_is_escalated_and_the_record_keeps_the_slms_score() {
    let c = case(FALLBACK, vec![unsure()]);
    let o = answer(&c, &req("Name a colour."));
    let a = o.result.as_ref().unwrap();
    assert_eq!(a.source, Source::Llm);
    assert_eq!(a.text, "Remote says teal");
    assert_eq!(a.provider.as_deref(), Some("remote"));
    let Some(Escalation::LowConfidence {
        score, threshold, ..
    }) = &a.escalation
    else {
        panic!("{:?}", a.escalation)
    };
    assert!(score.unwrap() < 0.5 && *threshold == 0.5);
    let run = a.slm.as_ref().unwrap();
    assert_eq!(run.done.as_ref().unwrap().text, "Maybe mauve");
    assert_eq!(c.remote.calls.lock().unwrap()[0].0, vec!["remote"]);
    assert_eq!(
        o.audit.as_ref().unwrap().interaction,
        Interaction::Escalation
    );
    assert_eq!(o.audit.as_ref().unwrap().route, Some(Route::Slm));
    assert_eq!(
        o.audit.as_ref().unwrap().confidence,
        *score,
        "the SLM's score is why it escalated"
    );
    assert!(o
        .audit
        .as_ref()
        .unwrap()
        .escalation_reason
        .as_deref()
        .unwrap()
        .starts_with("confidence 0.0"));
    assert_eq!(
        o.audit.as_ref().unwrap().response["slm"]["text"],
        "Maybe mauve"
    );
    assert_eq!(
        o.audit.as_ref().unwrap().response["text"],
        "Remote says teal"
    );
    assert_eq!(o.audit.as_ref().unwrap().usage.unwrap().prompt_tokens, 20);
}

#[test]
fn a_crash_is_retried_on_a_fresh_runner_then_escalated_without_its_text_in_the_metadata() {
    let c = case(
        FALLBACK,
        vec![
            Script::Crash { retryable: true },
            Script::Crash { retryable: true },
        ],
    );
    let o = answer(&c, &req("Name a colour."));
    assert_eq!(c.local.submitted(), 2, "retried once");
    let a = o.result.as_ref().unwrap();
    assert_eq!(a.source, Source::Llm);
    assert_eq!(a.escalation.as_ref().unwrap().kind(), "slm_failure");
    assert!(a.escalation.as_ref().unwrap().reason().contains("signal 9"));
    assert_eq!(
        o.audit.as_ref().unwrap().escalation_reason.as_deref(),
        Some("the SLM failed")
    );
    assert!(o.audit.as_ref().unwrap().response["slm"]["error"]
        .as_str()
        .unwrap()
        .contains("signal 9"));

    // A failure a fresh runner would repeat is not retried.
    let c = case(FALLBACK, vec![Script::Crash { retryable: false }]);
    let o = answer(&c, &req("Name a colour."));
    assert_eq!(c.local.submitted(), 1);
    assert_eq!(o.result.unwrap().source, Source::Llm);

    // A crash then an answer: the retry's answer.
    let c = case(FALLBACK, vec![Script::Crash { retryable: true }, sure()]);
    let o = answer(&c, &req("Name a colour."));
    assert_eq!(o.result.unwrap().text, "Teal it is.");
    assert_eq!(c.remote.called(), 0);
}

#[test]
fn with_nothing_to_escalate_to_a_crash_is_retried_then_fails() {
    let c = case(
        "",
        vec![
            Script::Crash { retryable: true },
            Script::Crash { retryable: true },
        ],
    );
    let o = answer(&c, &req("Name a colour."));
    assert_eq!(c.local.submitted(), 2);
    let Err(Failure::Local { error, retryable }) = &o.result else {
        panic!("{:?}", o.result)
    };
    assert!(error.contains("signal 9") && *retryable);
    assert_eq!(o.audit.as_ref().unwrap().route, Some(Route::Slm));
    assert!(o
        .audit
        .as_ref()
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("local model failed"));
    assert!(o.audit.as_ref().unwrap().response["slm"]["error"].is_string());
}

#[test]
fn a_low_score_with_no_chain_is_kept_and_said_to_be_below_the_threshold() {
    let c = case(
        "[routing.confidence_thresholds]\ndefault = 0.5\n",
        vec![unsure()],
    );
    let a = answer(&c, &req("Name a colour.")).result.unwrap();
    assert_eq!(a.source, Source::Slm);
    assert!(a.below_threshold && a.escalation.is_none());
}

#[test]
fn a_policy_refusal_runs_nothing_and_is_recorded_as_denied() {
    let c = case(
        &format!(
            "{FALLBACK}[[routing.policies]]\nid = \"no-secrets\"\nconditions = {{ metadata = {{ kind = \"secret\" }} }}\n\
             action = {{ type = \"deny\", reason = \"secret projects stay off models\" }}\n"
        ),
        vec![sure()],
    );
    let mut r = req("Plan the launch.");
    r.metadata.insert("kind".into(), "secret".into());
    let o = answer(&c, &r);
    assert_eq!(
        o.result.as_ref().unwrap_err(),
        &Failure::Denied {
            reason: "secret projects stay off models".into()
        }
    );
    assert_eq!((c.local.submitted(), c.remote.called()), (0, 0));
    assert_eq!(
        o.audit.as_ref().unwrap().interaction,
        Interaction::RouteDenied
    );
    assert_eq!(o.audit.as_ref().unwrap().route, Some(Route::Deny));
    assert_eq!(
        o.audit.as_ref().unwrap().response["denied"],
        "secret projects stay off models"
    );
    assert!(o
        .audit
        .as_ref()
        .unwrap()
        .policies
        .contains(&"policy:no-secrets".to_string()));
}

#[test]
fn a_named_model_must_be_known_and_allowed() {
    let allow = format!("{FALLBACK}[slm.model_allow_lists.agent_model_maps]\nbot = []\n");
    let c = case(&allow, vec![sure()]);
    let mut r = req("Name a colour.");
    r.model = "smollm2-135m-instruct".into();
    let o = rt().block_on(c.pipeline.answer(&caller(Some("bot")), &r, None));
    let Err(Failure::NotAllowed(why)) = &o.result else {
        panic!("{:?}", o.result)
    };
    assert!(why.contains("allow list"), "{why}");
    assert!(o.decision.is_none(), "refused before routing");
    assert!(o.audit.as_ref().unwrap().error.is_some());
    r.model = "no-such-model".into();
    let o = answer(&c, &r);
    assert_eq!(
        o.result.unwrap_err(),
        Failure::UnknownModel("no-such-model".into())
    );
    assert_eq!((c.local.submitted(), c.remote.called()), (0, 0));
}

#[test]
fn the_named_model_and_profile_are_the_decisions_own() {
    let c = case("", vec![sure()]);
    let mut r = req("Name a colour.");
    r.model = "smollm2-135m-instruct".into();
    r.profile = Some("standard".into());
    let o = answer(&c, &r);
    let Some(Selection::Slm { model, profile }) = o.decision.as_ref().map(|d| &d.selection) else {
        panic!()
    };
    assert_eq!(
        (model.as_str(), profile.as_str()),
        ("smollm2-135m-instruct", "standard")
    );
    let jobs = c.local.jobs.lock().unwrap();
    assert_eq!(
        (jobs[0].0.as_str(), jobs[0].1.as_str()),
        (model.as_str(), "standard")
    );
}

#[test]
fn require_llm_goes_to_the_chain_with_pii_masked_in_every_message() {
    let c = case(
        &format!(
            "{FALLBACK}[routing]\ndefault_action = {{ type = \"require_llm\", reason = \"all remote\" }}\n\
             [routing.guardrails]\npii = \"mask\"\n"
        ),
        vec![],
    );
    let r = Request::chat(
        "req-2",
        vec![
            ("system".into(), "Reply to ann@example.com".into()),
            ("user".into(), "My mail is bob@example.com".into()),
        ],
    );
    let o = answer(&c, &r);
    let a = o.result.unwrap();
    assert_eq!((a.source, a.escalation.is_none()), (Source::Llm, true));
    assert_eq!(c.local.submitted(), 0);
    let calls = c.remote.calls.lock().unwrap();
    let texts: Vec<&str> = calls[0]
        .1
        .messages
        .iter()
        .map(|m| m.content.as_str())
        .collect();
    assert_eq!(texts, ["Reply to [EMAIL]", "My mail is [EMAIL]"]);
    assert_eq!(o.audit.as_ref().unwrap().route, Some(Route::Llm));
}

#[test]
fn the_chain_failing_is_the_callers_failure() {
    let c = case(
        &format!(
            "{FALLBACK}[routing]\ndefault_action = {{ type = \"require_llm\", reason = \"r\" }}\n"
        ),
        vec![],
    );
    let c = Case {
        remote: Arc::new(ScriptedChain::new(vec![Err("boom")])),
        ..c
    };
    let p = Pipeline {
        remote: c.remote.clone(),
        ..c.pipeline.clone()
    };
    let o = rt().block_on(p.answer(&caller(None), &req("hi"), None));
    let Err(Failure::Remote(m)) = &o.result else {
        panic!("{:?}", o.result)
    };
    assert!(m.contains("500") && m.contains("boom"), "{m}");
    assert!(o
        .audit
        .as_ref()
        .unwrap()
        .error
        .as_deref()
        .unwrap()
        .contains("boom"));

    // An escalation whose chain fails is still recorded as one, with its reason.
    let c = case(FALLBACK, vec![unsure()]);
    let p = Pipeline {
        remote: Arc::new(ScriptedChain::new(vec![Err("boom")])),
        ..c.pipeline.clone()
    };
    let o = rt().block_on(p.answer(&caller(None), &req("hi"), None));
    assert!(
        matches!(o.result, Err(Failure::Remote(_))),
        "{:?}",
        o.result
    );
    let audit = o.audit.unwrap();
    assert_eq!(audit.interaction, crate::audit::Interaction::Escalation);
    assert!(
        audit
            .escalation_reason
            .as_deref()
            .is_some_and(|r| r.contains("< 0.5")),
        "{:?}",
        audit.escalation_reason
    );
}

/// The text of the tokens streamed in `ups`.
fn streamed_text(ups: &[Update]) -> String {
    ups.iter()
        .filter_map(|u| match u {
            Update::Token(t) => Some(t.text.as_str()),
            _ => None,
        })
        .collect()
}

/// Runs `r` collecting the updates a streaming front end would see.
fn streamed(c: &Case, r: &Request, hang_up: bool) -> (Outcome, Vec<Update>) {
    rt().block_on(async {
        let (tx, mut rx) = mpsc::channel(64);
        if hang_up {
            drop(rx);
            let o = c.pipeline.answer(&caller(None), r, Some(&tx)).await;
            return (o, vec![]);
        }
        let o = c.pipeline.answer(&caller(None), r, Some(&tx)).await;
        drop(tx);
        let mut ups = vec![];
        while let Some(u) = rx.recv().await {
            ups.push(u);
        }
        (o, ups)
    })
}

#[test]
fn an_answer_that_may_be_replaced_is_held_one_that_may_not_streams() {
    let mut r = req("Name a colour.");
    r.stream = true;
    // Escalation possible: held until scored, nothing goes out early.
    let c = case(FALLBACK, vec![sure()]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(!o.streamed && ups.is_empty());
    assert_eq!(o.result.unwrap().text, "Teal it is.");
    // No chain: streams token by token, announced first.
    let c = case("", vec![sure()]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(o.streamed);
    assert!(matches!(&ups[0], Update::Streaming { model, .. } if model == "smollm2-135m-instruct"));
    let text = streamed_text(&ups);
    assert_eq!(text, "Teal it is.");
    assert_eq!(o.result.unwrap().text, text);
    // A policy may ask for streaming even with a chain to escalate to.
    let c = case(
        &format!(
            "{FALLBACK}[routing]\ndefault_action = {{ type = \"prefer_slm\", streaming = \"stream\" }}\n"
        ),
        vec![unsure()],
    );
    let (o, _) = streamed(&c, &r, false);
    let a = o.result.unwrap();
    assert!(o.streamed && a.below_threshold && a.escalation.is_none());
    assert_eq!(c.remote.called(), 0);
}

#[test]
fn an_escalated_stream_goes_out_as_the_remote_answer_arrives() {
    let mut r = req("Name a colour.");
    r.stream = true;
    let c = case(FALLBACK, vec![unsure()]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(o.streamed);
    let a = o.result.unwrap();
    assert!(matches!(
        a.escalation,
        Some(Escalation::LowConfidence { .. })
    ));
    // Announced with who answers and why, then the remote pieces; none of the SLM's tokens.
    assert!(
        matches!(&ups[0], Update::RemoteStreaming { model, escalation: Some(_), .. } if model == "remote-large"),
        "{ups:?}"
    );
    assert!(!ups.iter().any(|u| matches!(u, Update::Token(_))));
    let text: String = ups
        .iter()
        .filter_map(|u| match u {
            Update::Piece(crate::providers::Delta::Text { text, .. }) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(text, a.text);
    assert_eq!(text, "Remote says teal");

    // A client gone from the remote stream ends it as such.
    let c = case(FALLBACK, vec![unsure()]);
    let (o, _) = streamed(&c, &r, true);
    assert_eq!(o.result.unwrap_err(), Failure::ClientGone);
    assert!(o.slm.is_some(), "what the SLM did is kept");
}

/// A long answer that starts badly: "Maybe" at -2.5, then near-certain tokens.
fn bad_start() -> Script {
    let mut ts = vec![("Maybe", -2.5)];
    ts.extend(std::iter::repeat_n((" so", -0.05), 9));
    Script::Answer(ts)
}

#[test]
fn a_held_answer_is_escalated_as_soon_as_its_score_cannot_pass() {
    let early = |toml: &str, r: &Request| {
        let c = case(toml, vec![bad_start()]);
        let o = answer(&c, r);
        assert_eq!(c.remote.called(), 1);
        let a = o.result.unwrap();
        assert_eq!(a.text, "Remote says teal");
        let why = a.escalation.clone().unwrap();
        assert_eq!(why.kind(), "low_confidence_early", "{why:?}");
        let Escalation::EarlyLowConfidence {
            tokens,
            best,
            floor,
            ..
        } = why
        else {
            unreachable!()
        };
        (tokens, best, floor, a.slm.unwrap())
    };
    let with_fallback = |extra: &str| {
        FALLBACK.replace(
            "providers = [\"remote\"]",
            &format!("providers = [\"remote\"]\n{extra}"),
        )
    };
    // `minimum` cannot rise again: decided on the first token, not the tenth.
    let minimum = format!("{FALLBACK}method = \"minimum\"\n");
    let (tokens, best, floor, run) = early(&minimum, &req("Name a colour."));
    assert_eq!((tokens, floor), (1, None));
    assert!((best - (-2.5f64).exp()).abs() < 1e-6);
    assert!(run.done.is_none() && run.score.is_some());
    // A geometric mean with one token to go: at best exp(-2.5 / 2) = 0.29 < 0.5.
    let mut short = req("Name a colour.");
    short.max_tokens = 2;
    let (tokens, best, _, _) = early(FALLBACK, &short);
    assert_eq!(tokens, 1);
    assert!((best - (-1.25f64).exp()).abs() < 1e-6, "{best}");
    // The floor: 0.08 after one token is below 0.3, whatever the rest might have been.
    let floor = with_fallback("early_floor = 0.3\nearly_floor_min_tokens = 1");
    let (tokens, _, floor, _) = early(&floor, &req("Name a colour."));
    assert_eq!((tokens, floor), (1, Some(0.3)));
    // Without either, the same answer runs to its end and passes (0.75 > 0.5).
    let c = case(FALLBACK, vec![bad_start()]);
    let a = answer(&c, &req("Name a colour.")).result.unwrap();
    assert!(a.escalation.is_none() && a.text.starts_with("Maybe so"));
    // `decide_early = false`: the minimum's verdict waits for the whole answer.
    let late = format!(
        "{}method = \"minimum\"\n",
        with_fallback("decide_early = false")
    );
    let c = case(&late, vec![bad_start()]);
    let a = answer(&c, &req("Name a colour.")).result.unwrap();
    assert_eq!(a.escalation.unwrap().kind(), "low_confidence");
}

#[test]
fn a_window_stream_comes_from_whichever_model_answers() {
    let mut r = req("Name a colour.");
    r.stream = true;
    let window = |n: u32| {
        format!(
            "{}method = \"minimum\"\n[routing]\ndefault_action = {{ type = \"prefer_slm\", streaming = \"window\" }}\n",
            FALLBACK.replace(
                "providers = [\"remote\"]",
                &format!("providers = [\"remote\"]\nstream_window_tokens = {n}")
            )
        )
    };
    // Decided low on its first token, inside the window: the client sees only the remote
    // answer, streamed.
    let c = case(&window(4), vec![bad_start()]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(o.streamed);
    assert!(
        !ups.iter()
            .any(|u| matches!(u, Update::Token(_) | Update::Streaming { .. })),
        "{ups:?}"
    );
    assert!(matches!(&ups[0], Update::RemoteStreaming { .. }), "{ups:?}");
    assert_eq!(
        o.result.unwrap().escalation.unwrap().kind(),
        "low_confidence_early"
    );
    // A confident answer passes the window of 2 and streams from there: the held tokens first.
    let c = case(&window(2), vec![sure()]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(
        o.streamed && matches!(&ups[0], Update::Streaming { .. }),
        "{ups:?}"
    );
    let text = streamed_text(&ups);
    assert_eq!(text, "Teal it is.");
    assert_eq!(c.remote.called(), 0);
    // One shorter than the window is held whole and decided as a buffered one.
    let c = case(&window(16), vec![sure()]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(!o.streamed && ups.is_empty(), "{ups:?}");
    assert_eq!(o.result.unwrap().text, "Teal it is.");
}

#[test]
fn a_stream_ends_with_its_failure_and_a_gone_client_cancels_it() {
    let mut r = req("Name a colour.");
    r.stream = true;
    let c = case("", vec![Script::CrashAfter(vec![("Teal", -0.1)])]);
    let (o, ups) = streamed(&c, &r, false);
    assert!(o.streamed && ups.len() == 2);
    assert!(
        matches!(o.result, Err(Failure::Interrupted(_))),
        "{:?}",
        o.result
    );
    assert_eq!(c.local.submitted(), 1, "bytes went out: no retry");

    let c = case("", vec![sure()]);
    let (o, _) = streamed(&c, &r, true);
    assert_eq!(o.result.unwrap_err(), Failure::ClientGone);
    assert_eq!(
        o.audit.as_ref().unwrap().error.as_deref(),
        Some(Failure::ClientGone.to_string().as_str())
    );
}

#[test]
fn the_callers_faults_and_a_busy_queue_are_answered_in_kind_without_a_retry() {
    for (script, want) in [
        (Script::Refuse, "request_refused"),
        (Script::QueueTimeout, "queue_timeout"),
        (Script::Full, "queue_full"),
    ] {
        let c = case(FALLBACK, vec![script, sure()]);
        let o = answer(&c, &req("Name a colour."));
        assert_eq!(o.result.as_ref().unwrap_err().code(), want);
        assert_eq!(c.remote.called(), 0, "{want}: not escalated");
        assert!(c.local.submitted() <= 1, "{want}: not retried");
    }
}

#[test]
fn a_completion_is_recorded_as_one() {
    let c = case("", vec![sure()]);
    let mut r = req("Once upon a time");
    r.endpoint = Endpoint::Completion;
    r.input = Input::Prompt("Once upon a time".into());
    let o = answer(&c, &r);
    assert_eq!(
        o.audit.as_ref().unwrap().interaction,
        Interaction::Completion
    );
    assert_eq!(
        o.audit.as_ref().unwrap().request["endpoint"],
        Value::from("completions")
    );
    assert!(matches!(
        c.local.jobs.lock().unwrap()[0].2.input,
        Input::Prompt(_)
    ));
}

#[test]
fn a_model_that_cannot_run_here_is_escalated_when_allowed_else_named() {
    // (The scripted model has no job left: it answers `Unavailable`, as a missing model file.)
    let c = case(FALLBACK, vec![]);
    let a = answer(&c, &req("Name a colour.")).result.unwrap();
    assert_eq!(a.source, Source::Llm);
    assert_eq!(a.escalation.as_ref().unwrap().kind(), "slm_failure");
    let c = case("", vec![]);
    let o = answer(&c, &req("Name a colour."));
    assert!(
        matches!(&o.result, Err(Failure::Unavailable { error, .. }) if error.contains("no more jobs")),
        "{:?}",
        o.result
    );
    assert!(o.slm.is_some(), "what the SLM did is kept for the record");
}

fn json_request() -> Request {
    let mut r = req("Describe Tom as JSON.");
    r.response_format = Some(serde_json::json!({"type": "json_schema", "json_schema": {
        "name": "cat", "schema": {"type": "object", "properties": {
            "name": {"type": "string"}, "colour": {"type": "string"}}}}}));
    r
}

fn cat(colour_logprob: f32) -> Script {
    Script::Answer(vec![
        ("{\"name\":\"", -0.01),
        ("Tom", -0.05),
        ("\",\"colour\":\"", -0.01),
        ("grey", colour_logprob),
        ("\"}", -0.01),
    ])
}

#[test]
fn a_json_answer_has_field_confidence_and_a_policy_can_escalate_on_a_field() {
    let policy = format!(
        "{FALLBACK}[routing]\ndefault_action = {{ type = \"prefer_slm\", min_confidence = 0.01, field_thresholds = {{ colour = 0.5 }} }}\n"
    );
    // The constraint reached the runner, and each field got its own score.
    let c = case(&policy, vec![cat(-0.05)]);
    let a = answer(&c, &json_request()).result.unwrap();
    assert_eq!(a.source, Source::Slm);
    assert!(matches!(
        c.local.jobs.lock().unwrap()[0].2.constraint,
        Some(corral_protocol::OutputConstraint::JsonSchema { .. })
    ));
    let f = a.field_confidence.as_ref().unwrap();
    assert!(
        f["name"].unwrap() > 0.9 && f["colour"].unwrap() > 0.9,
        "{f:?}"
    );
    // A colour the model was unsure of escalates, whatever the answer's overall score.
    let c = case(&policy, vec![cat(-3.0)]);
    let a = answer(&c, &json_request()).result.unwrap();
    assert_eq!(a.source, Source::Llm);
    let Some(Escalation::LowFieldConfidence { field, score, .. }) = &a.escalation else {
        panic!("{:?}", a.escalation)
    };
    assert_eq!(field, "colour");
    assert!(score.unwrap() < 0.5);
    // With nothing to escalate to, the answer stays and says it is below its threshold.
    let c = case(
        "[routing]\ndefault_action = { type = \"prefer_slm\", field_thresholds = { colour = 0.5 } }\n",
        vec![cat(-3.0)],
    );
    let a = answer(&c, &json_request()).result.unwrap();
    assert!(a.below_threshold && a.escalation.is_none());
    // A plain-text request has no fields.
    let c = case("", vec![sure()]);
    assert!(answer(&c, &req("hi"))
        .result
        .unwrap()
        .field_confidence
        .is_none());
}

fn tool_request(choice: Option<Value>) -> Request {
    let mut r = req("Weather in Oslo?");
    r.messages.push(crate::providers::Message {
        tool_calls: Some(serde_json::json!([{"id": "call_a", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Bergen\"}"}}])),
        ..crate::providers::Message::new("assistant", "")
    });
    r.messages.push(crate::providers::Message {
        tool_call_id: Some("call_a".into()),
        ..crate::providers::Message::new("tool", "rain")
    });
    r.tools = Some(serde_json::json!([{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]));
    r.tool_choice = choice;
    r
}

#[test]
fn a_local_tool_call_is_offered_checked_and_answered_in_openais_shape() {
    // The runner gets the functions, the choice and the conversation's earlier call (its
    // arguments parsed, its result named after it); the answer is the call.
    let c = case(
        "",
        vec![Script::Calls(
            vec![("get_weather", serde_json::json!({"city": "Oslo"}))],
            -0.05,
        )],
    );
    let mut r = tool_request(Some(serde_json::json!("required")));
    r.stream = true;
    let (o, ups) = streamed(&c, &r, false);
    // A possible call is never streamed token by token: it goes out whole.
    assert!(!o.streamed && ups.is_empty());
    let a = o.result.unwrap();
    assert_eq!(a.source, Source::Slm);
    assert_eq!(a.finish_reason, "tool_calls");
    assert_eq!(a.text, "");
    let calls = a.tool_calls.as_ref().unwrap();
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"]["name"], "get_weather");
    assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Oslo\"}");
    assert!(calls[0]["id"].as_str().unwrap().starts_with("call_"));
    let jobs = c.local.jobs.lock().unwrap();
    let tools = jobs[0].2.tools.as_ref().unwrap();
    assert_eq!(tools.functions[0].name, "get_weather");
    assert_eq!(tools.choice, corral_protocol::ToolChoice::Required);
    let Input::Messages(m) = &jobs[0].2.input else {
        panic!("not messages")
    };
    assert_eq!(
        m[1].tool_calls[0].arguments,
        serde_json::json!({"city": "Bergen"})
    );
    assert_eq!(
        (m[2].tool_call_id.as_deref(), m[2].name.as_deref()),
        (Some("call_a"), Some("get_weather"))
    );
    drop(jobs);
    // `none`: text only (with calls in the conversation the runner is told so, to keep their
    // syntax out of the text); without any, nothing is offered at all.
    let c = case("", vec![sure(), sure()]);
    let a = answer(&c, &tool_request(Some(serde_json::json!("none"))))
        .result
        .unwrap();
    assert_eq!(
        (a.text.as_str(), a.tool_calls.is_none()),
        ("Teal it is.", true)
    );
    assert_eq!(
        c.local.jobs.lock().unwrap()[0]
            .2
            .tools
            .as_ref()
            .unwrap()
            .choice,
        corral_protocol::ToolChoice::None
    );
    let mut fresh = tool_request(Some(serde_json::json!("none")));
    fresh.messages.truncate(1);
    answer(&c, &fresh).result.unwrap();
    assert!(c.local.jobs.lock().unwrap()[1].2.tools.is_none());
    // A forced call answered with text is the runner breaking its grammar: a failure.
    let c = case("", vec![sure()]);
    assert!(matches!(
        answer(&c, &tool_request(Some(serde_json::json!("required")))).result,
        Err(Failure::Local { .. })
    ));
    // Parameters the runner cannot enforce: never run locally; escalated with the reason, or
    // the caller's 400 naming the function and the keyword.
    let mut bad = tool_request(None);
    bad.tools = Some(
        serde_json::json!([{"type": "function", "function": {"name": "tag",
        "parameters": {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": true}}}}}]),
    );
    let c = case(FALLBACK, vec![]);
    let a = answer(&c, &bad).result.unwrap();
    assert_eq!((a.source, c.local.submitted()), (Source::Llm, 0));
    assert_eq!(
        a.escalation.as_ref().unwrap().kind(),
        "unenforceable_schema"
    );
    let c = case("", vec![]);
    match answer(&c, &bad).result {
        Err(Failure::Unsupported(e)) => {
            assert!(e.contains("'tag'") && e.contains("uniqueItems"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // A runner calling what was not offered is a failed answer, escalated where it can be.
    let c = case(
        FALLBACK,
        vec![Script::Calls(vec![("rm_rf", serde_json::json!({}))], -0.05)],
    );
    let a = answer(&c, &tool_request(None)).result.unwrap();
    assert_eq!(a.source, Source::Llm);
    assert!(
        matches!(&a.escalation, Some(Escalation::SlmFailed { error }) if error.contains("rm_rf"))
    );
    let c = case(
        "",
        vec![Script::Calls(vec![("rm_rf", serde_json::json!({}))], -0.05)],
    );
    assert!(matches!(
        answer(&c, &tool_request(None)).result,
        Err(Failure::Local { .. })
    ));
}

#[test]
fn the_default_score_is_the_calibrated_probability_of_the_models_answer_being_right() {
    let cfg = config(FALLBACK);
    assert_eq!(cfg.routing.method, confidence::Method::Calibrated);
    let local = Arc::new(ScriptedModel::new(vec![
        // Short, sure, and done.
        Script::Answer(vec![
            ("The", -0.01),
            (" capital", -0.01),
            (" of", -0.01),
            (" Peru", -0.01),
            (" is", -0.01),
            (" Lima", -0.05),
            (".", -0.02),
        ]),
        // Rambling, unsure, cut off at the token limit before any number.
        Script::Answer(vec![
            ("To", -0.9),
            (" calculate", -1.1),
            (" 57", -0.3),
            (" times", -0.2),
            (" 8", -0.1),
            (",", -0.6),
            (" we", -0.8),
            (" need", -1.3),
            (" to", -0.4),
            (" multiply", -1.6),
            (" the", -1.2),
            (" two", -1.4),
        ]),
        Script::Answer(vec![("Lima", -0.05)]),
    ]));
    let remote = Arc::new(ScriptedChain::new(vec![Ok("456")]));
    let p = Pipeline {
        router: cfg.routing.clone(),
        local: local.clone(),
        remote: remote.clone(),
        audit: false,
        prefix_cache: Default::default(),
        calibrators: cfg.slm.calibrators.clone(),
    };
    let o = rt().block_on(p.answer(&caller(None), &req("What is the capital of Peru?"), None));
    let a = o.result.as_ref().unwrap();
    assert_eq!(
        (a.source, a.method),
        (Source::Slm, confidence::Method::Calibrated)
    );
    let sure = a.confidence.unwrap();
    assert!(sure > 0.5, "{sure}");
    // The features the score came from travel with the run (feedback refits from them).
    let run = a.slm.as_ref().unwrap();
    assert_eq!(
        run.features.as_ref().map(Vec::len),
        Some(confidence::features::NAMES.len())
    );
    let mut ask = req("What is 57 times 8?");
    ask.max_tokens = 12;
    let o = rt().block_on(p.answer(&caller(None), &ask, None));
    let a = o.result.as_ref().unwrap();
    assert_eq!(a.source, Source::Llm, "escalated");
    let Some(Escalation::LowConfidence { score, method, .. }) = &a.escalation else {
        panic!("{:?}", a.escalation)
    };
    assert_eq!(*method, confidence::Method::Calibrated);
    assert!(score.unwrap() < 0.5 && score.unwrap() < sure, "{score:?}");
    // A model without a calibrator is scored with geometric_mean, and says so.
    let plain = Pipeline {
        calibrators: Default::default(),
        ..p.clone()
    };
    let o = rt().block_on(plain.answer(&caller(None), &req("What is the capital of Peru?"), None));
    let a = o.result.as_ref().unwrap();
    assert_eq!(a.method, confidence::Method::GeometricMean);
    assert!((a.confidence.unwrap() - (-0.05f64).exp()).abs() < 1e-6);
}
