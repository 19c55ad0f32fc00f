//! The HTTP side: each handler checks its request, hands a [`Job`] to the engine thread and
//! turns the engine's events into an OpenAI response, whole or as server-sent events. A
//! handler that ends early (its client gone, a stop string reached) drops its end of the
//! events channel, which frees the request's slot at the engine's next step.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use skipgpt_model::{ChatTemplate, LlamaConfig, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, ApiError, Settings};
use super::engine::{Event, Job, TokenLogprobs};
use super::metrics::Metrics;
use super::sampler::Sampler;
use super::text::AnswerText;

/// What the handlers need once the model is loaded.
pub struct Ready {
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub config: LlamaConfig,
    pub routed: bool,
    /// `kv_policy = keep`: skipped attention still projects keys and values.
    pub keeps_kv: bool,
}

/// Shared by every handler.
pub struct AppState {
    pub jobs: Sender<Job>,
    pub waiting: Arc<AtomicUsize>,
    /// Requests in the running batch (the engine keeps it).
    pub running: Arc<AtomicUsize>,
    pub max_seqs: usize,
    pub max_queue: usize,
    pub ready: Arc<OnceLock<Ready>>,
    /// Set when loading failed: `/health` says why.
    pub load_error: Arc<OnceLock<String>>,
    pub api_key: Option<String>,
    pub metrics: Arc<Metrics>,
    pub model_name: String,
    pub next_id: AtomicU64,
}

type Shared = Arc<AppState>;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `Authorization: Bearer KEY` on everything but `/health`, when the server has a key.
pub async fn require_key(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if req.uri().path() == "/health" || given == Some(key.as_str()) {
        return next.run(req).await;
    }
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "a missing or wrong API key: send `Authorization: Bearer <key>`",
    )
    .into_response()
}

/// Counts every response by status.
pub async fn count_status(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    app.metrics.request(response.status().as_u16());
    response
}

pub async fn health(State(app): State<Shared>) -> Response {
    match (app.ready.get(), app.load_error.get()) {
        (Some(_), _) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        (None, Some(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "error": e})),
        )
            .into_response(),
        (None, None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "loading model"})),
        )
            .into_response(),
    }
}

pub async fn metrics(State(app): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        app.metrics.render(),
    )
        .into_response()
}

pub async fn models(State(app): State<Shared>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": app.model_name, "object": "model", "created": now(), "owned_by": "skipgpt",
    }]}))
    .into_response()
}

fn ready(app: &AppState) -> Result<&Ready, ApiError> {
    app.ready.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model is still loading; try again when GET /health answers 200",
        )
    })
}

pub async fn tokenize(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&app)?;
    let req: api::TokenizeRequest = api::parse(&api::json_body(&body)?)?;
    let ids = match (&req.content, &req.messages) {
        (Some(text), None) => encode(r, text, req.add_special)?,
        (None, Some(messages)) => encode(r, &render(r, messages)?, false)?,
        _ => {
            return Err(ApiError::bad(
                "content",
                "give `content` (text) or `messages`, one of them",
            ))
        }
    };
    Ok(Json(json!({"tokens": ids})).into_response())
}

pub async fn detokenize(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&app)?;
    let req: api::DetokenizeRequest = api::parse(&api::json_body(&body)?)?;
    check_ids(r, &req.tokens, "tokens")?;
    let text = r
        .tokenizer
        .decode(&req.tokens)
        .map_err(|e| ApiError::bad("tokens", e.to_string()))?;
    Ok(Json(json!({"content": text})).into_response())
}

fn encode(r: &Ready, text: &str, special: bool) -> Result<Vec<u32>, ApiError> {
    let ids = if special {
        r.tokenizer.encode(text)
    } else {
        r.tokenizer.encode_plain(text).map(|e| e.0)
    };
    ids.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.to_string()))
}

fn render(r: &Ready, messages: &[api::Message]) -> Result<String, ApiError> {
    let messages = api::chat_messages(messages)?;
    let template = r.template.as_ref().ok_or_else(|| ApiError::bad("messages", "this model has no chat template; start the server with --chat-template FILE, or use /v1/completions"))?;
    template
        .render(&messages, true)
        .map_err(|e| ApiError::bad("messages", e.to_string()))
}

fn check_ids(r: &Ready, ids: &[u32], param: &str) -> Result<(), ApiError> {
    let vocab = r.config.vocab_size;
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(ApiError::bad(
            param,
            format!("`{param}` holds token id {bad}, outside the vocabulary [0, {vocab})"),
        )),
        None => Ok(()),
    }
}

/// Which endpoint a response is shaped for.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

pub async fn chat_completions(
    State(app): State<Shared>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let r = ready(&app)?;
    let body = api::json_body(&body)?;
    let req: api::ChatRequest = api::parse(&body)?;
    let common: api::Common = api::parse(&body)?;
    let settings = common.settings(r.config.vocab_size, r.routed, req.logprobs()?)?;
    let messages = req.messages;
    let prompt = {
        let app = app.clone();
        tokio::task::spawn_blocking(move || {
            let r = ready(&app)?;
            encode(r, &render(r, &messages)?, false)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
    };
    respond(app, Kind::Chat, prompt, settings, "messages").await
}

pub async fn completions(State(app): State<Shared>, body: Bytes) -> Result<Response, ApiError> {
    let r = ready(&app)?;
    let body = api::json_body(&body)?;
    let req: api::CompletionRequest = api::parse(&body)?;
    let common: api::Common = api::parse(&body)?;
    if req.echo {
        return Err(ApiError::bad(
            "echo",
            "`echo` is not supported: the answer holds the new text only",
        ));
    }
    let settings = common.settings(r.config.vocab_size, r.routed, req.logprobs()?)?;
    let prompt = match req.prompt {
        api::Prompt::Ids(ids) => {
            check_ids(r, &ids, "prompt")?;
            ids
        }
        api::Prompt::Text(text) => {
            let app = app.clone();
            tokio::task::spawn_blocking(move || encode(ready(&app)?, &text, true))
                .await
                .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??
        }
        api::Prompt::Texts(texts) if texts.len() == 1 => encode(r, &texts[0], true)?,
        api::Prompt::Texts(texts) => {
            return Err(ApiError::bad(
                "prompt",
                format!(
                    "`prompt` holds {} prompts; this server takes one per request",
                    texts.len()
                ),
            ))
        }
    };
    respond(app, Kind::Completion, prompt, settings, "prompt").await
}

/// Queues the job and answers from its events.
async fn respond(
    app: Shared,
    kind: Kind,
    prompt: Vec<u32>,
    settings: Settings,
    prompt_param: &str,
) -> Result<Response, ApiError> {
    let r = ready(&app)?;
    let context = r.config.max_position_embeddings;
    if prompt.is_empty() {
        return Err(ApiError::bad(
            prompt_param,
            format!("`{prompt_param}` gives no tokens"),
        ));
    }
    if prompt.len() >= context {
        return Err(ApiError::bad(
            prompt_param,
            format!(
                "`{prompt_param}` is {} tokens; the model's context is {context}",
                prompt.len()
            ),
        ));
    }
    let max_tokens = settings.max_tokens.unwrap_or(context - prompt.len());
    if prompt.len() + max_tokens > context {
        let param = "max_tokens";
        return Err(ApiError::bad(param, format!("the prompt's {} tokens plus `max_tokens` {max_tokens} exceed the model's context of {context}", prompt.len())));
    }
    let queued = app.waiting.load(Ordering::SeqCst) + app.running.load(Ordering::SeqCst);
    if queued >= app.max_seqs + app.max_queue {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the server is busy: {} requests are waiting (--max-queue); try again later",
                app.max_queue
            ),
        ));
    }
    let prompt_tokens = prompt.len();
    let (events, rx) = unbounded_channel();
    let job = Job {
        sampler: Sampler::new(settings.sampling.clone(), &prompt),
        prompt,
        max_tokens,
        eos: if settings.ignore_eos {
            Vec::new()
        } else {
            r.config.eos_token_ids.clone()
        },
        logprobs: settings.logprobs,
        skip: settings.skip,
        events,
        arrived: Instant::now(),
    };
    app.waiting.fetch_add(1, Ordering::SeqCst);
    if app.jobs.send(job).is_err() {
        app.waiting.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the engine has stopped",
        ));
    }
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        app.next_id.fetch_add(1, Ordering::SeqCst)
    );
    let answer = Answer {
        app: app.clone(),
        kind,
        id,
        created: now(),
        rx,
        text: AnswerText::new(settings.stops.clone()),
        settings,
        prompt_tokens,
        skips: (0, 0, 0),
        ended: None,
    };
    if answer.settings.stream {
        Ok(answer.stream())
    } else {
        answer.whole().await
    }
}

/// One request's answer as it comes from the engine.
struct Answer {
    app: Shared,
    kind: Kind,
    id: String,
    created: u64,
    rx: UnboundedReceiver<Event>,
    text: AnswerText,
    settings: Settings,
    prompt_tokens: usize,
    /// Skipped attention and MLP decisions, and decisions per module kind, so far.
    skips: (usize, usize, usize),
    /// The finish reason, once the answer is over.
    ended: Option<&'static str>,
}

/// What the next engine event gives the client.
enum Step {
    /// New text (possibly empty, while a stop string may be starting), with the token's
    /// log-probabilities when asked for.
    Text(String, Option<Value>),
    /// The answer is over; `ended` holds why.
    End,
    Failed(String),
}

impl Answer {
    fn ready(&self) -> &Ready {
        self.app
            .ready
            .get()
            .expect("answers start once the model is loaded")
    }

    /// Reads the next event. A stop string ends the answer: the receiver is closed, which
    /// frees the slot at the engine's next step.
    async fn next(&mut self) -> Step {
        if self.ended.is_some() {
            return Step::End;
        }
        let event = self.rx.recv().await;
        let app = self.app.clone();
        let tokenizer = &app.ready.get().expect("loaded").tokenizer;
        match event {
            Some(Event::Token {
                id,
                logprobs,
                skips,
            }) => {
                self.skips = skips;
                let piece = self.text.push(tokenizer, Some(id), false);
                if piece.stopped {
                    self.rx.close();
                    self.ended = Some("stop");
                }
                let lp = logprobs.map(|lp| self.logprobs_json(id, &lp));
                Step::Text(piece.text, lp)
            }
            Some(Event::Done { finish_reason }) => {
                self.ended = Some(finish_reason);
                Step::Text(self.text.push(tokenizer, None, true).text, None)
            }
            Some(Event::Failed(e)) => Step::Failed(e),
            None => {
                self.ended = Some("stop");
                Step::End
            }
        }
    }

    fn logprobs_json(&self, id: u32, lp: &TokenLogprobs) -> Value {
        let tok = &self.ready().tokenizer;
        let piece = |id: u32| tok.decode(&[id]).unwrap_or_default();
        let entry = |t: u32, l: f32| json!({"token": piece(t), "logprob": l, "bytes": piece(t).into_bytes()});
        let mut v = entry(id, lp.logprob);
        v["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(t, l)).collect();
        v
    }

    /// `usage`, with the extension fields: the realised skip and the share of the decoder's
    /// matrix products not computed.
    fn usage(&self) -> Value {
        let c = &self.ready().config;
        let completion = self.text.tokens();
        let (attn, mlp, decisions) = self.skips;
        let rate = |n: usize| n as f64 / decisions.max(1) as f64;
        let (a, m) = (c.attention_params() as f64, c.mlp_params() as f64);
        // with kv_policy = keep a skipped attention still projects its keys and values
        let kv = (2 * c.hidden_size * c.num_key_value_heads * c.head_dim) as f64;
        let a_saved = if self.ready().keeps_kv { a - kv } else { a };
        let routed = self.ready().routed && decisions > 0;
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "skip": routed.then(|| json!({
                "attention": rate(attn),
                "mlp": rate(mlp),
                "params": (rate(attn) * a + rate(mlp) * m) / (a + m),
            })),
            "flops_saved": if routed { (rate(attn) * a_saved + rate(mlp) * m) / (a + m) } else { 0.0 },
        })
    }

    fn choice(
        &self,
        text: &str,
        logprobs: &[Value],
        finish: Option<&str>,
        streaming: bool,
    ) -> Value {
        let lp = (self.settings.logprobs.is_some() && !logprobs.is_empty()).then(|| match self.kind {
            Kind::Chat => json!({"content": logprobs}),
            Kind::Completion => json!({
                "tokens": logprobs.iter().map(|l| l["token"].clone()).collect::<Vec<_>>(),
                "token_logprobs": logprobs.iter().map(|l| l["logprob"].clone()).collect::<Vec<_>>(),
                "top_logprobs": logprobs.iter().map(|l| l["top_logprobs"].as_array().map(|a| a.iter().map(|t| (t["token"].as_str().unwrap_or("").to_string(), t["logprob"].clone())).collect::<serde_json::Map<_, _>>())).collect::<Vec<_>>(),
            }),
        });
        match (self.kind, streaming) {
            (Kind::Chat, false) => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish})
            }
            (Kind::Chat, true) => {
                json!({"index": 0, "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) }, "logprobs": lp, "finish_reason": finish})
            }
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text, "logprobs": lp, "finish_reason": finish})
            }
        }
    }

    fn object(&self, streaming: bool) -> &'static str {
        match (self.kind, streaming) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, streaming: bool, choices: Vec<Value>) -> Value {
        json!({"id": self.id, "object": self.object(streaming), "created": self.created, "model": self.app.model_name, "choices": choices})
    }

    /// The whole answer in one response.
    async fn whole(mut self) -> Result<Response, ApiError> {
        let (mut text, mut logprobs) = (String::new(), Vec::new());
        loop {
            match self.next().await {
                Step::Text(t, lp) => {
                    text.push_str(&t);
                    logprobs.extend(lp);
                }
                Step::End => break,
                Step::Failed(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
            }
        }
        let mut body = self.envelope(
            false,
            vec![self.choice(&text, &logprobs, self.ended, false)],
        );
        body["usage"] = self.usage();
        Ok(Json(body).into_response())
    }

    /// The answer as server-sent events: a first chunk with the role (chat), one per piece of
    /// text, one with the finish reason, the usage when asked for, then `[DONE]`.
    fn stream(self) -> Response {
        let first = (self.kind == Kind::Chat).then(|| {
            let mut c = self.envelope(true, vec![json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})]);
            c["usage"] = Value::Null;
            SseEvent::default().data(c.to_string())
        });
        let events = futures_util::stream::unfold((self, false), |(mut answer, over)| async move {
            if over {
                return None;
            }
            let events: Vec<SseEvent> = match answer.next().await {
                Step::Text(t, lp) if t.is_empty() && lp.is_none() => Vec::new(),
                Step::Text(t, lp) => {
                    let lp: Vec<Value> = lp.into_iter().collect();
                    vec![answer.chunk(vec![answer.choice(&t, &lp, None, true)])]
                }
                Step::End => {
                    let mut out =
                        vec![answer.chunk(vec![answer.choice("", &[], answer.ended, true)])];
                    if answer.settings.include_usage {
                        let mut c = answer.envelope(true, Vec::new());
                        c["usage"] = answer.usage();
                        out.push(SseEvent::default().data(c.to_string()));
                    }
                    out.push(SseEvent::default().data("[DONE]"));
                    return Some((out, (answer, true)));
                }
                Step::Failed(e) => {
                    let err = json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}});
                    return Some((
                        vec![
                            SseEvent::default().data(err.to_string()),
                            SseEvent::default().data("[DONE]"),
                        ],
                        (answer, true),
                    ));
                }
            };
            Some((events, (answer, false)))
        });
        use futures_util::StreamExt;
        let events = futures_util::stream::iter(first)
            .chain(events.flat_map(futures_util::stream::iter))
            .map(Ok::<_, std::convert::Infallible>);
        Sse::new(events)
            .keep_alive(KeepAlive::default())
            .into_response()
    }

    fn chunk(&self, choices: Vec<Value>) -> SseEvent {
        let mut c = self.envelope(true, choices);
        if self.settings.include_usage {
            c["usage"] = Value::Null;
        }
        SseEvent::default().data(c.to_string())
    }
}
