//! The OpenAI API's request bodies, checked field by field: what is wrong becomes a 400 with
//! an OpenAI-shaped error naming the field (`param`) and what was expected.

use std::collections::HashMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use skipgpt_model::ChatMessage;

use super::sampler::SamplingParams;

/// An error as the OpenAI API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
        }
    }

    fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            503 => "server_overloaded",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind(), "param": self.param, "code": null,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

/// The fields both endpoints share (`model` is accepted and not read: the server serves one).
#[derive(Debug, Default, Deserialize)]
pub struct Common {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, f64>>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// Extension: the fraction of routed parameters to skip (0 for dense).
    pub skip: Option<f64>,
    /// Extension (as llama.cpp's server): keep generating past end-of-sequence.
    #[serde(default)]
    pub ignore_eos: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What a request asks of the engine, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_tokens: Option<usize>,
    pub sampling: SamplingParams,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub skip: Option<f64>,
    pub ignore_eos: bool,
    pub logprobs: Option<usize>,
}

/// `body` as `T`, a wrong type or a missing field naming its path.
pub fn parse<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        ApiError::bad(&path, format!("`{path}`: {}", e.inner()))
    })
}

/// The body as JSON, or a 400 saying where it stops being JSON.
pub fn json_body(bytes: &[u8]) -> Result<Value, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ));
    }
    Ok(value)
}

fn range(
    param: &str,
    v: Option<f64>,
    ok: impl Fn(f64) -> bool,
    expected: &str,
) -> Result<(), ApiError> {
    match v {
        Some(x) if !x.is_finite() || !ok(x) => Err(ApiError::bad(
            param,
            format!("`{param}` is {x}; expected {expected}"),
        )),
        _ => Ok(()),
    }
}

impl Common {
    /// Checks every field against its range; `vocab` bounds `logit_bias`, `routed` says
    /// whether `skip` can mean anything.
    pub fn settings(
        &self,
        vocab: usize,
        routed: bool,
        logprobs: Option<usize>,
    ) -> Result<Settings, ApiError> {
        self.check_ranges()?;
        if self.skip.is_some_and(|s| s > 0.0) && !routed {
            return Err(ApiError::bad("skip", "`skip` needs a model served with routers (--routers, or a model directory with skipgpt.json); this one runs dense"));
        }
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad("n", format!("`n` is {n}; this server returns one choice per request (send the request n times)")));
        }
        let top_k = self.top_k()?;
        let max_tokens = self.max_tokens()?;
        let stops = self.stops()?;
        let logit_bias = self.logit_bias(vocab)?;
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Settings {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature.unwrap_or(1.0) as f32,
                top_p: self.top_p.unwrap_or(1.0) as f32,
                top_k,
                min_p: self.min_p.unwrap_or(0.0) as f32,
                seed,
                presence_penalty: self.presence_penalty.unwrap_or(0.0) as f32,
                frequency_penalty: self.frequency_penalty.unwrap_or(0.0) as f32,
                repetition_penalty: self.repetition_penalty.unwrap_or(1.0) as f32,
                logit_bias,
            },
            stops,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            skip: self.skip,
            ignore_eos: self.ignore_eos,
            logprobs,
        })
    }

    /// Every numeric parameter within the range it is accepted in.
    fn check_ranges(&self) -> Result<(), ApiError> {
        range(
            "temperature",
            self.temperature,
            |t| (0.0..=2.0).contains(&t),
            "a number in [0, 2]",
        )?;
        range(
            "top_p",
            self.top_p,
            |p| p > 0.0 && p <= 1.0,
            "a number in (0, 1]",
        )?;
        range(
            "min_p",
            self.min_p,
            |p| (0.0..=1.0).contains(&p),
            "a number in [0, 1]",
        )?;
        range(
            "presence_penalty",
            self.presence_penalty,
            |p| (-2.0..=2.0).contains(&p),
            "a number in [-2, 2]",
        )?;
        range(
            "frequency_penalty",
            self.frequency_penalty,
            |p| (-2.0..=2.0).contains(&p),
            "a number in [-2, 2]",
        )?;
        range(
            "repetition_penalty",
            self.repetition_penalty,
            |p| p > 0.0 && p <= 10.0,
            "a number in (0, 10]",
        )?;
        range(
            "skip",
            self.skip,
            |s| (0.0..1.0).contains(&s),
            "a fraction in [0, 1)",
        )?;
        Ok(())
    }

    /// `top_k`: 0 (or -1, as llama.cpp's server takes it) for no limit.
    fn top_k(&self) -> Result<usize, ApiError> {
        match self.top_k {
            None | Some(-1) => Ok(0),
            Some(k) if k >= 0 => Ok(k as usize),
            Some(k) => Err(ApiError::bad(
                "top_k",
                format!("`top_k` is {k}; expected 0 or more (or -1 for no limit)"),
            )),
        }
    }

    /// `max_completion_tokens`, or the older `max_tokens`; at least 1 where given.
    fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        let given = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => Some(("max_completion_tokens", n)),
            (None, Some(n)) => Some(("max_tokens", n)),
            (None, None) => None,
        };
        match given {
            Some((param, n)) if n < 1 => Err(ApiError::bad(
                param,
                format!("`{param}` is {n}; expected at least 1"),
            )),
            Some((_, n)) => Ok(Some(n as usize)),
            None => Ok(None),
        }
    }

    /// `stop` as a list, at most 16 strings.
    fn stops(&self) -> Result<Vec<String>, ApiError> {
        let stops = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stops.len() > 16 {
            return Err(ApiError::bad(
                "stop",
                format!("`stop` has {} strings; at most 16", stops.len()),
            ));
        }
        Ok(stops)
    }

    /// `logit_bias` as (token id, bias) pairs in id order, every id in the vocabulary.
    fn logit_bias(&self, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
        let mut logit_bias = Vec::new();
        for (key, &bias) in self.logit_bias.iter().flatten() {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::bad(
                        "logit_bias",
                        format!("`logit_bias` key {key:?} is not a token id in [0, {vocab})"),
                    )
                })?;
            range(
                "logit_bias",
                Some(bias),
                |b| (-100.0..=100.0).contains(&b),
                "biases in [-100, 100]",
            )?;
            logit_bias.push((id, bias as f32));
        }
        logit_bias.sort_by_key(|p| p.0);
        Ok(logit_bias)
    }
}

/// A chat message as the API sends it: text content, or a list of text parts.
#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// `messages` as the chat template takes them.
pub fn chat_messages(messages: &[Message]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad(
            "messages",
            "`messages` is empty; expected at least one message",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
                return Err(ApiError::bad(&format!("{param}.role"), format!("`{param}.role` is {:?}; expected system, developer, user, assistant or tool", m.role)));
            }
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            _ => return Err(ApiError::bad(&format!("{param}.content[{j}]"), format!("`{param}.content[{j}]` is a {:?} part; this model reads text parts only", p.kind))),
                        }
                    }
                    text
                }
            };
            let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
}

impl ChatRequest {
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if !(0..=20).contains(&k) => Err(ApiError::bad(
                "top_logprobs",
                format!("`top_logprobs` is {k}; expected 0 to 20"),
            )),
            (false, Some(_)) => Err(ApiError::bad(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            )),
            (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
            (false, None) => Ok(None),
        }
    }
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

/// A prompt as text or token ids (one prompt per request).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

impl CompletionRequest {
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            Some(k) if !(0..=20).contains(&k) => Err(ApiError::bad(
                "logprobs",
                format!("`logprobs` is {k}; expected 0 to 20"),
            )),
            Some(k) => Ok(Some(k as usize)),
            None => Ok(None),
        }
    }
}

/// `POST /tokenize`: text, or chat messages rendered with the template first.
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub content: Option<String>,
    pub messages: Option<Vec<Message>>,
    #[serde(default)]
    pub add_special: bool,
}

/// `POST /detokenize`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub tokens: Vec<u32>,
}
