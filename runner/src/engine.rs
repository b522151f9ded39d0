//! One model, one request at a time: prompt -> tokens -> prefill -> sample/decode loop, with
//! per-token log-probabilities, stop sequences held back until they cannot match, cancellation
//! between tokens, and timings.

use std::time::Instant;

use corral_protocol::{
    ChatMessage, Done, FinishReason, GenerateRequest, Input, TokenInfo, ToolChoice, Tools,
    TopLogprob, MAX_TOP_LOGPROBS,
};

use crate::constrain::{schema_of, Grammars};
use crate::model::Model;
use crate::sampler::{self, Rng};
use crate::template::ChatTemplate;
use crate::tokenizer::{Tokenizer, Utf8Stream};
use crate::tools::Parsed;

pub struct Engine {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The vocabulary as the grammar library sees it, built on the first constrained request.
    pub grammars: Option<Grammars>,
    /// The tokens whose state the model holds from the last request, and that request's
    /// `cache_key`: the next request of the same key starts after their common prefix.
    pub cached: Option<(String, Vec<u32>)>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.model)
            .finish()
    }
}

/// What the generation loop asks of its caller between tokens.
pub trait Sink {
    /// A token is ready (only called for streamed requests).
    fn token(&mut self, id: u64, token: &TokenInfo) -> std::io::Result<()>;
    /// Should the request stop now?
    fn cancelled(&mut self, id: u64) -> bool;
}

/// Length of the longest suffix of `text` that is a proper prefix of some stop string: text
/// that must be held back because a stop sequence may be starting there.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// The largest char boundary of `s` at or before `i`.
fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The model produced values that are not finite numbers: its weights (or the computation) are
/// broken, and no token can be chosen honestly. Reported as a model error, not the request's.
/// A request that does not fit the model's context (reported as such: a model with a larger
/// context may take it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TooLong(pub String);

#[derive(Debug, thiserror::Error)]
#[error("the model produced non-finite values in its {what} ({nan} NaN, {inf} infinite of {total}): its weights or their computation are broken")]
pub struct NonFinite {
    pub what: &'static str,
    pub nan: usize,
    pub inf: usize,
    pub total: usize,
}

/// One pass over `v` (the final hidden state, or ~50k logits: a few µs, far below a decode
/// step). The hidden state is checked too because 8-bit activation quantization before the
/// output matrix can turn NaN inputs into all-zero, finite logits.
pub fn check_finite(what: &'static str, v: &[f32]) -> Result<(), NonFinite> {
    if v.iter().all(|x| x.is_finite()) {
        return Ok(());
    }
    Err(NonFinite {
        what,
        nan: v.iter().filter(|x| x.is_nan()).count(),
        inf: v.iter().filter(|x| x.is_infinite()).count(),
        total: v.len(),
    })
}

impl Engine {
    pub fn prompt_tokens(&self, input: &Input, tools: Option<&Tools>) -> anyhow::Result<Vec<u32>> {
        Ok(match input {
            Input::Messages(m) => {
                // Message contents are text: control tokens written in them are not honoured.
                let m: Vec<ChatMessage> = m
                    .iter()
                    .map(|x| ChatMessage {
                        content: self.tokenizer.defuse(&x.content),
                        ..x.clone()
                    })
                    .collect();
                let text = self
                    .template
                    .render(
                        &m,
                        tools.map(|t| match t.choice {
                            // `none`: nothing is offered (the conversation still renders).
                            ToolChoice::None => &[][..],
                            _ => &t.functions[..],
                        }),
                    )
                    .map_err(|e| anyhow::anyhow!("chat template: {e}"))?;
                self.tokenizer.encode(&text, true, true)
            }
            Input::Prompt(_) if tools.is_some() => {
                anyhow::bail!("tools need chat messages, not a raw prompt")
            }
            Input::Prompt(p) => self.tokenizer.encode(p, true, true),
        })
    }

    /// The vocabulary as the grammar library sees it (built on first use).
    fn grammars(&mut self) -> anyhow::Result<&Grammars> {
        if self.grammars.is_none() {
            self.grammars = Some(Grammars::new(&self.tokenizer).map_err(|e| anyhow::anyhow!(e))?);
        }
        self.grammars
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no grammar"))
    }

    pub fn generate(&mut self, req: &GenerateRequest, sink: &mut dyn Sink) -> anyhow::Result<Done> {
        let received = Instant::now();
        // An empty stop string would end every answer at once: ignore it.
        let stops: Vec<String> = req.stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        let tools = req.tools.as_ref().filter(|t| !t.functions.is_empty());
        // Tools that may be called (not `none`): the answer may be a call.
        let offered = tools.filter(|t| t.choice != ToolChoice::None);
        let mut held = 0usize;
        let prompt = self.prompt_tokens(&req.input, tools)?;
        let ctx = self.model.context_length;
        if prompt.is_empty() {
            anyhow::bail!("the prompt is empty");
        }
        if prompt.len() >= ctx {
            return Err(TooLong(format!(
                "the prompt has {} tokens; the model's context holds {ctx}",
                prompt.len()
            ))
            .into());
        }
        if req.max_tokens_explicit && prompt.len() + req.max_tokens as usize > ctx {
            return Err(TooLong(format!(
                "the prompt has {} tokens and max_tokens asks for {}: {} in all, past the model's context of {ctx} tokens",
                prompt.len(),
                req.max_tokens,
                prompt.len() + req.max_tokens as usize
            ))
            .into());
        }
        // A constrained answer: the matcher is built (and a schema checked) before any compute.
        // With tools, the grammar admits calls of the offered functions (and, under `auto`, a
        // text answer: free, or under the JSON constraint).
        let format = self.template.call_format();
        let mut matcher = match (tools, &req.constraint) {
            (None, None) => None,
            (None, Some(c)) => Some(
                self.grammars()?
                    .matcher(c)
                    .map_err(|e| anyhow::anyhow!(e))?,
            ),
            (Some(t), c) => {
                let text = c
                    .as_ref()
                    .map(schema_of)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!(e))?;
                let grammar = format
                    .grammar(t, text.as_ref())
                    .map_err(|e| anyhow::anyhow!(e))?;
                Some(
                    self.grammars()?
                        .lark_matcher(&grammar)
                        .map_err(|e| anyhow::anyhow!(e))?,
                )
            }
        };
        let vocab = self.tokenizer.vocab_size();
        let top_n = req.top_logprobs.min(MAX_TOP_LOGPROBS) as usize;
        let max_new = (req.max_tokens as usize).min(ctx - prompt.len());
        let mut rng = req.sampling.seed.map_or_else(Rng::from_entropy, Rng::new);
        let mut history = prompt.clone();
        let mut utf8 = Utf8Stream::default();
        let mut text = String::new();
        let mut emitted = 0usize;
        let mut tokens = Vec::new();
        let mut finish = FinishReason::Length;
        let mut cut_by_stop = false;

        // The longest prefix the previous request of the same key left in the model's state
        // (one token at least is fed again: its logits start the answer). Taken now: until
        // this request ends well, the state is nobody's to reuse.
        let reuse = match (self.cached.take(), &req.cache_key) {
            (Some((key, done)), Some(k)) if key == *k => done
                .iter()
                .zip(&prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1),
            _ => 0,
        };
        let t0 = Instant::now();
        let mut logits = self.model.forward(&prompt[reuse..], reuse)?;
        check_finite("logits", &logits)?;
        // Tokens of `history` whose state the model holds.
        let mut fed = prompt.len();
        let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
        let mut ttft_ms = 0.0;
        let decode_start = Instant::now();
        let mut generated = 0usize;
        let mut constraint_s = 0.0;
        while generated < max_new {
            if sink.cancelled(req.id) {
                finish = FinishReason::Cancelled;
                break;
            }
            let stats = sampler::raw_stats(&logits, top_n);
            let raw = logits.clone();
            // Under a constraint only the tokens that keep the answer valid may be sampled; the
            // reported log-probabilities stay the model's own (`raw`).
            let mut forced = false;
            if let Some(m) = matcher.as_mut() {
                let t = Instant::now();
                let mask = m
                    .compute_mask_or_eos()
                    .map_err(|e| anyhow::anyhow!("constrained decoding: {e}"))?;
                forced = mask.num_set() == 1;
                mask.iter_unset_entries(|i| {
                    if let Some(l) = logits.get_mut(i) {
                        *l = f32::NEG_INFINITY;
                    }
                });
                for l in logits.iter_mut().skip(vocab) {
                    *l = f32::NEG_INFINITY;
                }
                constraint_s += t.elapsed().as_secs_f64();
            }
            let next = sampler::sample(&mut logits, &req.sampling, &history, &mut rng);
            if generated == 0 {
                ttft_ms = received.elapsed().as_secs_f64() * 1e3;
            }
            generated += 1;
            if (!req.ignore_eos || matcher.is_some()) && self.tokenizer.eos.contains(&next) {
                finish = FinishReason::Stop;
                break;
            }
            if let Some(m) = matcher.as_mut() {
                let t = Instant::now();
                m.consume_token(next)
                    .map_err(|e| anyhow::anyhow!("constrained decoding: {e}"))?;
                constraint_s += t.elapsed().as_secs_f64();
            }
            history.push(next);
            text.push_str(&utf8.push(self.tokenizer.token_bytes(next)));
            // What may still be a call is held back (its tokens too: they get their text once
            // it is known to be text), and stop sequences do not cut it.
            if offered.is_some() && format.may_be_call(&text) {
                tokens.push(self.token_info(next, &raw, &stats, top_n, String::new(), forced));
                held += 1;
                if matcher.as_ref().is_some_and(|m| m.is_stopped()) {
                    finish = FinishReason::Stop;
                    break;
                }
                // A call just closed that repeats an earlier one: the model is looping.
                if let Some(t) = offered.filter(|_| text.ends_with(format.call_end())) {
                    if format.parse(&text, t).repeats() {
                        finish = FinishReason::Stop;
                        break;
                    }
                }
                if generated < max_new {
                    logits = self.model.forward(&[next], history.len() - 1)?;
                    check_finite("logits", &logits)?;
                    fed = history.len();
                }
                continue;
            }
            let mut stop_at = None;
            for s in &stops {
                let from = floor_boundary(&text, emitted.saturating_sub(s.len()));
                if let Some(i) = text[from..].find(s.as_str()) {
                    let at = from + i;
                    stop_at = Some(stop_at.map_or(at, |x: usize| x.min(at)));
                }
            }
            if let Some(at) = stop_at {
                text.truncate(at);
            }
            let safe = if stop_at.is_some() {
                text.len()
            } else {
                floor_boundary(&text, text.len() - held_back(&text, &stops))
            };
            let delta = text
                .get(emitted..safe.max(emitted))
                .unwrap_or_default()
                .to_string();
            emitted = safe.max(emitted);
            let mut info = self.token_info(next, &raw, &stats, top_n, delta, forced);
            if held > 0 {
                // Held tokens turned out to be text: each gets its own part of it.
                let start = tokens.len() - held;
                let used = split_text(&mut tokens[start..], &info.text);
                info.text = info.text[used..].to_string();
                if req.stream {
                    for t in &tokens[start..] {
                        sink.token(req.id, t)?;
                    }
                }
                held = 0;
            }
            if req.stream {
                sink.token(req.id, &info)?;
            }
            tokens.push(info);
            // The grammar is complete: nothing more may follow.
            if matcher.as_ref().is_some_and(|m| m.is_stopped()) {
                finish = FinishReason::Stop;
                break;
            }
            if stop_at.is_some() {
                cut_by_stop = true;
                finish = FinishReason::Stop;
                break;
            }
            if generated < max_new {
                logits = self.model.forward(&[next], history.len() - 1)?;
                check_finite("logits", &logits)?;
                fed = history.len();
            }
        }
        // An incomplete character left at the end is part of the answer, unless a stop sequence
        // cut the text before it.
        if !cut_by_stop {
            text.push_str(&utf8.finish());
        }
        // An answer of calls is its calls, without text; of one cut short, the calls before it.
        let mut tool_calls = Vec::new();
        if let Some(t) = tools {
            let parsed = format.parse(&text, t);
            let repeated = parsed.repeats();
            match parsed {
                Parsed::Text => {
                    // Held to the end (text that looked like a call's start, or a JSON text
                    // answer in a syntax whose calls are JSON too): stop sequences apply now,
                    // and the held tokens get their text.
                    if held > 0 {
                        if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                            text.truncate(at);
                            finish = FinishReason::Stop;
                        }
                        let start = tokens.len() - held;
                        split_text(&mut tokens[start..], &text);
                    }
                }
                Parsed::Calls(mut calls) | Parsed::Incomplete(mut calls) => {
                    // A repeated call ended the answer: the copy goes.
                    if repeated {
                        calls.pop();
                    }
                    tool_calls = calls;
                    text.clear();
                }
            }
            if req.stream && held > 0 {
                for t in &tokens[tokens.len() - held..] {
                    sink.token(req.id, t)?;
                }
            }
        }
        let decode_s = decode_start.elapsed().as_secs_f64();
        let completion = tokens.len();
        if let Some(k) = &req.cache_key {
            history.truncate(fed);
            self.cached = Some((k.clone(), history));
        }
        Ok(Done {
            id: req.id,
            finish_reason: finish,
            text,
            prompt_tokens: prompt.len() as u32,
            completion_tokens: completion as u32,
            prefill_ms,
            ttft_ms,
            decode_tokens_per_s: if completion > 1 && decode_s > 0.0 {
                (completion - 1) as f64 / decode_s
            } else {
                0.0
            },
            constraint_ms: constraint_s * 1e3,
            tokens: if req.stream { Vec::new() } else { tokens },
            tool_calls,
            cached_tokens: reuse as u32,
        })
    }

    /// A generated token's report: its raw log-probability and alternatives.
    fn token_info(
        &self,
        id: u32,
        raw: &[f32],
        stats: &sampler::RawStats,
        top_n: usize,
        text: String,
        forced: bool,
    ) -> TokenInfo {
        TokenInfo {
            token_id: id,
            bytes: self.tokenizer.token_bytes(id).to_vec(),
            text,
            logprob: raw[id as usize] - stats.log_z,
            entropy: stats.entropy,
            margin: stats.margin,
            top_entropy: stats.top_entropy,
            top: stats
                .top
                .iter()
                .take(top_n)
                .map(|(id, lp)| TopLogprob {
                    token_id: *id,
                    bytes: self.tokenizer.token_bytes(*id).to_vec(),
                    logprob: *lp,
                })
                .collect(),
            forced,
        }
    }
}

/// Gives each of `tokens` (held back, text empty) the text its bytes decode to, as far as
/// `text` (what the answer's text is up to here) goes; returns the bytes of `text` used.
fn split_text(tokens: &mut [TokenInfo], text: &str) -> usize {
    let mut utf8 = Utf8Stream::default();
    let mut used = 0;
    for t in tokens {
        let piece = utf8.push(&t.bytes);
        let end = floor_boundary(text, (used + piece.len()).min(text.len()));
        t.text = text[used..end].to_string();
        used = end;
    }
    used
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["\n\n".to_string(), "END".to_string()];
        assert_eq!(held_back("abc\n", &stops), 1);
        assert_eq!(held_back("abcEN", &stops), 2);
        assert_eq!(held_back("abc", &stops), 0);
    }
}
