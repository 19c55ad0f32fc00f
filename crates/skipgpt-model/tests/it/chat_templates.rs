//! Chat prompts as transformers makes them (`tests/fixtures/chat-templates`, made by
//! `tools/make_chat_template_fixture.py`): SmolLM2's, Qwen2's, Llama-3's and Mistral's templates
//! on three conversations each, rendered and tokenized as `apply_chat_template(...,
//! add_generation_prompt=True)` does, and the template's own errors where it raises one. The
//! tokenizer is the tiny fixture's with the families' special tokens added.

use skipgpt_model::{ChatMessage, ChatTemplate, Tokenizer};
use skipgpt_test_support::*;

#[test]
fn chat_prompts_are_the_text_and_tokens_transformers_makes() {
    let dir = fixtures().join("chat-templates");
    let read = |name: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
    };
    let (templates, cases) = (read("templates.json"), read("cases.json"));
    let tokenizer = Tokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
    let mut checked = 0;
    for case in cases["cases"].as_array().unwrap() {
        let family = case["family"].as_str().unwrap();
        let t = &templates[family];
        let config = tempfile::tempdir().unwrap();
        let tokenizer_config = serde_json::json!({
            "chat_template": t["template"], "bos_token": t["bos"], "eos_token": t["eos"],
        });
        std::fs::write(
            config.path().join("tokenizer_config.json"),
            tokenizer_config.to_string(),
        )
        .unwrap();
        let template = ChatTemplate::from_model_dir(config.path()).unwrap();
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = template.render(&messages, true);
        match case["error"].as_str() {
            Some(error) => {
                let got = rendered.unwrap_err().to_string();
                assert!(got.contains(error), "{family}: {got} should say {error}");
            }
            None => {
                let text = rendered.unwrap();
                assert_eq!(
                    text,
                    case["text"].as_str().unwrap(),
                    "{family}: {messages:?}"
                );
                let ids = tokenizer.encode_plain(&text).unwrap().0;
                assert_eq!(
                    serde_json::json!(ids),
                    case["ids"],
                    "{family}: {messages:?}"
                );
            }
        }
        checked += 1;
    }
    assert_eq!(checked, 12);
}
