//! Helpers of the root package's tests: running the `skipgpt` binary, and everything
//! `skipgpt-test-support` shares (fixture paths, the CPU backend, tensor comparison).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

pub use skipgpt_test_support::*;

/// Runs the `skipgpt` binary (CPU backend).
pub fn skipgpt(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_skipgpt"))
        .args(args)
        .env_remove("SKIPGPT_BACKEND")
        .output()
        .expect("run skipgpt")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must fail cleanly: non-zero exit, no panic, and every `needle` in stderr.
pub fn assert_clean_failure(args: &[&str], needles: &[&str]) {
    let out = skipgpt(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert_eq!(out.status.code(), Some(1), "exit code for {args:?}: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    for n in needles {
        assert!(
            err.contains(n),
            "stderr for {args:?} should mention {n:?}: {err}"
        );
    }
}

/// `skipgpt logits --model M --input I --output O` (more flags can be appended).
pub fn logits_args<'a>(model: &'a str, input: &'a Path, output: &'a Path) -> Vec<&'a str> {
    vec![
        "logits",
        "--model",
        model,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]
}

/// Runs the `skipgpt` binary, which must succeed, and parses what it printed as JSON.
pub fn skipgpt_json(args: &[&str]) -> serde_json::Value {
    let o = skipgpt(args);
    assert!(o.status.success(), "skipgpt {args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).expect("skipgpt printed JSON")
}
