//! A request's answer as text while its tokens come: decoded as a whole each time (a token may
//! complete a character another began), with stop strings cut out. Text that could still turn
//! out to be the start of a stop string is held back until the next token settles it, so a
//! client never receives part of a stop string.

use skipgpt_model::Tokenizer;

/// The answer's tokens, and how much of its text has been handed out.
pub struct AnswerText {
    ids: Vec<u32>,
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
        let text = tokenizer.decode(&self.ids).unwrap_or_default();
        if let Some(at) = self.first_stop(&text) {
            self.stopped = true;
            let piece = text.get(self.sent..at).unwrap_or_default().to_string();
            self.sent = at.max(self.sent);
            return Piece {
                text: piece,
                stopped: true,
            };
        }
        // a character still being completed decodes as U+FFFD: wait for its last byte
        let settled = if last {
            text.len()
        } else {
            text.trim_end_matches('\u{fffd}').len()
        };
        let hold = if last {
            0
        } else {
            self.stop_prefix(&text[..settled])
        };
        let end = settled - hold;
        let piece = text.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = end.max(self.sent);
        Piece {
            text: piece,
            stopped: false,
        }
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
