//! `skipgpt serve` from outside, as a client sees it: the binary started on a free port with
//! the tiny model, spoken to over HTTP/1.1 with a minimal client (no HTTP crate needed).
//! Covers whole and streamed answers, greedy answers that do not depend on batching, stop
//! strings across token boundaries, cancellation freeing the slot, the queue limit, bad
//! requests, the API key and the `skip` budget.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// A template in ChatML, the format of Qwen2 and SmolLM2.
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A server process, stopped when dropped.
struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `skipgpt serve` on the tiny model (routed when `routed`) with `extra` flags,
    /// and waits until `/health` answers 200.
    fn start(routed: bool, extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let template = dir.path().join("chatml.jinja");
        std::fs::write(&template, CHATML).unwrap();
        let model = tiny().join(if routed { "model-routed" } else { "model" });
        let mut child = Command::new(env!("CARGO_BIN_EXE_skipgpt"))
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(["--chat-template", template.to_str().unwrap()])
            .args(extra)
            .env_remove("SKIPGPT_BACKEND")
            .env_remove("SKIPGPT_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start skipgpt serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("first line: {line:?}"))
            .to_string();
        let server = Server {
            child,
            addr,
            _dir: dir,
        };
        let t = Instant::now();
        while server.get("/health").0 != 200 {
            assert!(t.elapsed() < Duration::from_secs(60), "never healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// Sends a request and reads the whole response: status and body (de-chunked).
    fn send(
        &self,
        method: &str,
        path: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let mut s = self.connect();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", self.addr, body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        parse_response(&raw)
    }

    fn get(&self, path: &str) -> (u16, String) {
        self.send("GET", path, "", &[])
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.send("POST", path, &body.to_string(), &[]);
        let v = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
        (status, v)
    }

    /// A streamed request's `data:` payloads, in order.
    fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let (status, text) = self.send("POST", path, &body.to_string(), &[]);
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
            .parse()
            .unwrap()
    }
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    (
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_string()
        },
    )
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn greedy_completion(prompt: &[u32], max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true})
}

/// Prompts of different lengths from the fixture's ids.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    let rows = ids_rows(&reference(&tiny()), "input_ids");
    (0..n)
        .map(|i| {
            let row = &rows[i % rows.len()];
            row[i % 5..i % 5 + 3 + i % 7].to_vec()
        })
        .collect()
}

#[test]
fn the_server_answers_chat_and_completions_whole_and_streamed() {
    let server = Server::start(false, &[]);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert!(models.contains("\"model\""), "{models}");

    let chat = json!({"messages": [{"role": "user", "content": "the end"}], "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let (status, whole) = server.post("/v1/chat/completions", &chat);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "length");
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap().to_string();
    assert_eq!(whole["usage"]["completion_tokens"], 8);
    let (_, tokens) = server.post("/tokenize", &json!({"messages": chat["messages"]}));
    assert_eq!(
        whole["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        tokens["tokens"].as_array().unwrap().len(),
        "the prompt is the rendered template"
    );

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/chat/completions", &streamed);
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, content, "streamed and whole answers agree");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 8, "{usage}");
    assert_eq!(chunks.last().unwrap()["choices"], json!([]));

    // a completion of token ids gives what `skipgpt generate` gives
    let prompt = [5u32, 17, 42, 7];
    let (status, done) = server.post("/v1/completions", &greedy_completion(&prompt, 6));
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["object"], "text_completion");
    let generated = skipgpt_json(&[
        "generate",
        "--model",
        tiny().join("model").to_str().unwrap(),
        "--prompt-ids",
        "5,17,42,7",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(done["choices"][0]["text"], generated["text"]);
}

#[test]
fn sixteen_concurrent_greedy_requests_answer_as_they_do_alone() {
    let server = Server::start(true, &["--max-seqs", "16"]);
    let prompts = prompts(16);
    let alone: Vec<Value> = prompts
        .iter()
        .map(|p| server.post("/v1/completions", &greedy_completion(p, 12)).1)
        .collect();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| server.post("/v1/completions", &greedy_completion(p, 12)).1))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(
            a["choices"][0]["text"], t["choices"][0]["text"],
            "request {i}"
        );
        assert!(a["usage"]["skip"]["params"].as_f64().is_some(), "{a}");
    }
    assert!(server.metric("skipgpt_batch_size_count") > 0.0);
}

#[test]
fn a_stop_string_across_tokens_ends_the_answer_before_it() {
    let server = Server::start(false, &[]);
    let mut body = greedy_completion(&[5, 17, 42, 7], 16);
    body["logprobs"] = json!(0);
    let (_, full) = server.post("/v1/completions", &body);
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let tokens: Vec<String> = full["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    assert_eq!(tokens.len(), 16);
    assert_eq!(tokens.concat(), text, "the tokens' texts make the answer");
    // the end of one token and the start of the next, both non-empty
    let k = (3..15)
        .find(|&k| !tokens[k].is_empty() && !tokens[k + 1].is_empty())
        .expect("two adjacent tokens with text");
    let before: usize = tokens[..=k].iter().map(String::len).sum();
    let last = tokens[k].chars().last().unwrap().len_utf8();
    let next = tokens[k + 1].chars().next().unwrap().len_utf8();
    let stop = text[before - last..before + next].to_string();
    let expected = &text[..text.find(&stop).unwrap()];

    let mut stopped = greedy_completion(&[5, 17, 42, 7], 16);
    stopped["stop"] = json!([stop.clone(), "a stop never met"]);
    let (_, done) = server.post("/v1/completions", &stopped);
    assert_eq!(done["choices"][0]["finish_reason"], "stop", "{done}");
    assert_eq!(
        done["choices"][0]["text"], expected,
        "stop {stop:?} in {text:?}"
    );

    stopped["stream"] = json!(true);
    let events = server.stream("/v1/completions", &stopped);
    let streamed: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, expected);
}

#[test]
fn a_client_that_leaves_frees_its_slot_for_the_next() {
    let server = Server::start(false, &["--max-seqs", "1"]);
    let body = json!({"prompt": [5, 17], "max_tokens": 240, "temperature": 0, "ignore_eos": true, "stream": true}).to_string();
    let mut s = server.connect();
    let req = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    let mut first = [0u8; 256];
    let n = s.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).contains("200 OK"));
    drop(s);
    // the next request gets the only slot
    let (status, next) = server.post("/v1/completions", &greedy_completion(&[5, 17], 4));
    assert_eq!(status, 200, "{next}");
    // the first left before its 240 tokens, unless the machine decoded them all before the
    // disconnect reached the server (the engine's own test frees a slot deterministically:
    // src/serve/engine.rs)
    let generated = server.metric("skipgpt_generation_tokens_total");
    if generated < 240.0 + 4.0 {
        let t = Instant::now();
        while server.metric("skipgpt_requests_cancelled_total") < 1.0 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the disconnect was never seen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        eprintln!("the first request finished before its client left: nothing to cancel");
    }
}

#[test]
fn past_the_queue_limit_requests_are_answered_503() {
    let server = Server::start(false, &["--max-seqs", "1", "--max-queue", "2"]);
    let body = json!({"prompt": [5, 17], "max_tokens": 200, "temperature": 0, "ignore_eos": true});
    let statuses: Vec<(u16, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| s.spawn(|| server.post("/v1/completions", &body)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let busy: Vec<&Value> = statuses
        .iter()
        .filter(|(s, _)| *s == 503)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(ok + busy.len(), 12, "{statuses:?}");
    assert!(ok >= 3, "one running and two waiting get answers: {ok}");
    assert!(
        !busy.is_empty(),
        "twelve at once overflow one slot and two places in the queue"
    );
    assert!(
        busy[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-queue"),
        "{}",
        busy[0]
    );
    assert_eq!(
        server
            .post("/v1/completions", &greedy_completion(&[5], 2))
            .0,
        200
    );
}

#[test]
fn bad_requests_get_a_400_naming_the_field_and_the_server_stays_up() {
    let server = Server::start(false, &[]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (chat(json!({"max_tokens": -3})), "max_tokens"),
        (chat(json!({"max_tokens": 100000})), "max_tokens"),
        (chat(json!({"temperature": -1})), "temperature"),
        (chat(json!({"top_p": 0})), "top_p"),
        (chat(json!({"top_p": 1.5})), "top_p"),
        (chat(json!({"logit_bias": {"99999": 5}})), "logit_bias"),
        (chat(json!({"n": 3})), "n"),
        (chat(json!({"skip": 0.3})), "skip"),
        (chat(json!({"temperature": "hot"})), "temperature"),
        (json!({"messages": []}), "messages"),
        (
            json!({"messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
        ),
        (json!({"max_tokens": 4}), "messages"),
    ];
    for (body, param) in cases {
        let (status, err) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{body}: {err}");
        assert!(
            err["error"]["param"].as_str().unwrap_or("").contains(param)
                || err["error"]["message"].as_str().unwrap().contains(param),
            "{body}: {err}"
        );
    }
    let (status, err) = server.send("POST", "/v1/chat/completions", "{not json", &[]);
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
    let (status, err) = server.post("/v1/completions", &json!({"prompt": [5, 999999]}));
    assert_eq!(status, 400, "{err}");
    let huge = "word ".repeat(200_000);
    let (status, err) = server.post("/v1/completions", &json!({"prompt": huge, "max_tokens": 1}));
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("context"),
        "{err}"
    );
    // and the server still answers
    let (status, _) = server.post("/v1/completions", &greedy_completion(&[5], 2));
    assert_eq!(status, 200);
}

#[test]
fn the_api_key_guards_everything_but_health() {
    let server = Server::start(false, &["--api-key", "sesame"]);
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/v1/models").0, 401);
    let body = greedy_completion(&[5], 2).to_string();
    let (status, err) = server.send(
        "POST",
        "/v1/completions",
        &body,
        &[("Authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401, "{err}");
    let (status, _) = server.send(
        "POST",
        "/v1/completions",
        &body,
        &[("Authorization", "Bearer sesame")],
    );
    assert_eq!(status, 200);
}

#[test]
fn a_request_sets_its_compute_budget_with_skip() {
    let server = Server::start(true, &[]);
    let prompt = prompts(1).remove(0);
    let skip_of = |skip: Option<f64>| {
        let mut body = greedy_completion(&prompt, 24);
        if let Some(s) = skip {
            body["skip"] = json!(s);
        }
        let (status, v) = server.post("/v1/completions", &body);
        assert_eq!(status, 200, "{v}");
        v["usage"]["skip"]["params"].as_f64().unwrap()
    };
    let dense = skip_of(Some(0.0));
    let low = skip_of(Some(0.1));
    let high = skip_of(Some(0.6));
    assert_eq!(dense, 0.0);
    assert!(high > low, "skip 0.6 realised {high}, 0.1 realised {low}");
    assert!((high - 0.6).abs() < 0.25, "skip 0.6 realised {high}");
}

#[test]
fn chat_in_a_pipe_answers_each_line_and_obeys_its_commands() {
    let dir = tempfile::tempdir().unwrap();
    let template = dir.path().join("chatml.jinja");
    std::fs::write(&template, CHATML).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_skipgpt"))
        .args([
            "chat",
            "--model",
            tiny().join("model-routed").to_str().unwrap(),
        ])
        .args([
            "--chat-template",
            template.to_str().unwrap(),
            "--max-tokens",
            "6",
        ])
        .env_remove("SKIPGPT_BACKEND")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"/skip 0\nthe end\n/skip 2\n/reset\n/unknown\nthe end\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text
        .strip_prefix("(dense: every module runs)\n")
        .unwrap_or_else(|| panic!("{text}"));
    let (answer, rest) = first
        .split_once("(error: /skip 2")
        .unwrap_or_else(|| panic!("{text}"));
    let (_, after_reset) = rest
        .split_once("(conversation reset)\n(unknown command /unknown")
        .unwrap_or_else(|| panic!("{text}"));
    let second = after_reset.split_once('\n').unwrap().1;
    assert!(!answer.trim().is_empty(), "{text}");
    assert_eq!(
        answer, second,
        "after /reset the same message gets the same answer"
    );
}

/// The official `openai` Python package as the client (`tools/openai_client_check.py`). CI
/// installs it and sets `SKIPGPT_REQUIRE_OPENAI=1`; elsewhere, without it, the test says NOT RUN.
#[test]
fn the_official_openai_client_talks_to_the_server() {
    let has_openai = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        if std::env::var("SKIPGPT_REQUIRE_OPENAI").is_ok_and(|v| v == "1") {
            panic!("the Python package openai is missing (SKIPGPT_REQUIRE_OPENAI=1)");
        }
        eprintln!("the_official_openai_client_talks_to_the_server: NOT RUN: pip install openai");
        return;
    }
    let server = Server::start(true, &[]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/openai_client_check.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{}/v1", server.addr))
        .arg("--routed")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(seen["streamed_pieces"].as_u64().unwrap() > 0, "{seen}");
}
