//! A request's answer as text while its tokens come, decoded incrementally: each token decodes
//! a short window (the tokens since the last settled one, and that one, whose decoding can
//! shape the next: a leading space), and the text grows by what the window adds once its
//! characters are complete (a token may begin a character the next one completes). Stop
//! strings are cut out; text that could still turn out to be the start of a stop string is
//! held back until the next token settles it, so a client never receives part of a stop
//! string. The work per token stays constant however long the answer grows.

use skipgpt_model::Tokenizer;

/// The answer's tokens, its text, and how much of it has been handed out.
pub struct AnswerText {
    ids: Vec<u32>,
    /// The text of `ids[..read]`.
    text: String,
    /// Where the window decoded with each new token begins.
    prefix: usize,
    /// Tokens already in `text`.
    read: usize,
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

/// What one token adds.
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    /// Text to send now.
    pub text: String,
    /// A stop string was reached: the answer ends before it.
    pub stopped: bool,
}

impl AnswerText {
    pub fn new(stops: Vec<String>) -> Self {
        AnswerText {
            ids: Vec::new(),
            text: String::new(),
            prefix: 0,
            read: 0,
            sent: 0,
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            stopped: false,
        }
    }

    pub fn tokens(&self) -> usize {
        self.ids.len()
    }

    /// Adds a token; `last` releases what was held back (the answer ends here).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: Option<u32>, last: bool) -> Piece {
        if self.stopped {
            return Piece::default();
        }
        self.ids.extend(id);
        self.decode_new(tokenizer, last);
        let text = &self.text;
        if let Some(at) = self.first_stop(text) {
            self.stopped = true;
            let piece = text.get(self.sent..at).unwrap_or_default().to_string();
            self.sent = at.max(self.sent);
            return Piece {
                text: piece,
                stopped: true,
            };
        }
        let hold = if last { 0 } else { self.stop_prefix(text) };
        let end = text.len() - hold;
        let piece = text.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = end.max(self.sent);
        Piece {
            text: piece,
            stopped: false,
        }
    }

    /// Appends what the tokens since `read` add to the text, once their characters are
    /// complete (a character still being completed decodes as U+FFFD) or the answer ends.
    fn decode_new(&mut self, tokenizer: &Tokenizer, last: bool) {
        let decode = |ids: &[u32]| tokenizer.decode(ids).unwrap_or_default();
        let before = decode(&self.ids[self.prefix..self.read]);
        let now = decode(&self.ids[self.prefix..]);
        if !last && now.ends_with('\u{fffd}') {
            return;
        }
        match now.strip_prefix(before.as_str()) {
            Some(new) => self.text.push_str(new),
            // a tokenizer whose window decodes its earlier tokens differently: the whole answer
            None => self.text = decode(&self.ids),
        }
        self.prefix = self.read;
        self.read = self.ids.len();
    }

    /// Where the earliest stop string begins, if one is in `text` past what was sent, less
    /// the longest stop (a stop may begin in text held back).
    fn first_stop(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| {
                let from = self.sent.saturating_sub(s.len());
                let from = (0..=from)
                    .rev()
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(0);
                text[from..].find(s.as_str()).map(|i| from + i)
            })
            .min()
    }

    /// The length of the longest end of `text` that begins some stop string.
    fn stop_prefix(&self, text: &str) -> usize {
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|prefix| text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/llama-tiny/model/tokenizer.json"
        );
        Tokenizer::from_file(std::path::Path::new(path)).unwrap()
    }

    /// The pieces handed out for `ids`, one token at a time.
    fn pieces(tok: &Tokenizer, ids: &[u32], stops: &[&str]) -> Vec<Piece> {
        let mut answer = AnswerText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            out.push(answer.push(tok, Some(id), i + 1 == ids.len()));
        }
        out
    }

    #[test]
    fn pieces_join_to_the_whole_decoding_and_never_split_a_character() {
        let tok = tokenizer();
        let text = "café — naïve 🙂 ok, déjà vu";
        let ids = tok.encode(text).unwrap();
        let got = pieces(&tok, &ids, &[]);
        let joined: String = got.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(joined, tok.decode(&ids).unwrap());
        assert_eq!(joined, text);
        // the byte-level vocabulary spells the emoji in several tokens: some hand out nothing
        assert!(got.iter().any(|p| p.text.is_empty()), "{got:?}");
        assert!(got.iter().all(|p| !p.text.contains('\u{fffd}')));
    }

    #[test]
    fn a_stop_string_spread_over_tokens_is_cut_and_never_sent_in_part() {
        let tok = tokenizer();
        let ids = tok.encode("one two STOP three").unwrap();
        let got = pieces(&tok, &ids, &["STOP"]);
        let joined: String = got.iter().map(|p| p.text.as_str()).collect();
        assert_eq!(joined, "one two ");
        assert!(got.iter().any(|p| p.stopped));
        assert!(got.iter().all(|p| !p.text.contains('S')), "{got:?}");
    }
}
