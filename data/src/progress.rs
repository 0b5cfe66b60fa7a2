//! One look for every long job's progress bar: position, rate and ETA. Hidden when stderr is not a
//! terminal (CI logs), so logs carry the summary lines instead of thousands of redraws.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `total` items (or a spinner when the total is unknown) named `what` ("samples").
pub fn bar(total: Option<u64>, what: &str) -> ProgressBar {
    let pb = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = match total {
        Some(_) => format!(
            "{{spinner}} {{msg}} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} {what} ({{per_sec}}, ETA {{eta}})"
        ),
        None => format!("{{spinner}} {{msg}} [{{elapsed_precise}}] {{pos}} {what} ({{per_sec}})"),
    };
    if let Ok(style) = ProgressStyle::with_template(&template) {
        pb.set_style(style);
    }
    if std::env::var_os("HQ_NO_PROGRESS").is_some() {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb
}
