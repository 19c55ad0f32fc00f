//! Progress bars for the long evaluations inside a stage, on terminals only (indicatif hides
//! them when stderr is redirected, so logs get only the results).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting `unit` (e.g. "sequences") for `label`; its length is set by the first
/// update.
pub fn counter(label: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "  {{msg}} {{bar:30}} {{pos}}/{{len}} {unit} [{{elapsed_precise}}]"
        ))
        .expect("valid template"),
    );
    bar.set_message(label.to_string());
    bar
}

/// Moves `bar` to `done` of `total`.
pub fn update(bar: &ProgressBar, done: usize, total: usize) {
    bar.set_length(total as u64);
    bar.set_position(done as u64);
}
