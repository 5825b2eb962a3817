//! Progress bars for the library's phases ([`crate::progress`]) on a terminal:
//! one line per phase (calibrating N/M tokens, training layer L/N, writing and
//! hashing bytes), each with its rate and an estimate of the time left from the
//! rate so far. Pipes and logs get nothing: the summary says what happened.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::progress::{Phase, Unit};

/// Bars drawn on stderr, one per phase, created when the phase first reports.
pub(crate) struct PhaseBars {
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<Phase, ProgressBar>>,
}

impl PhaseBars {
    /// Bars on stderr when it is a terminal; otherwise reports are dropped.
    pub(crate) fn on_terminal() -> PhaseBars {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        PhaseBars {
            multi,
            bars: Mutex::new(HashMap::new()),
        }
    }

    /// The library's progress callback.
    pub(crate) fn report(&self, phase: Phase, done: u64, total: u64) {
        let Some(multi) = &self.multi else { return };
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        let bar = bars.entry(phase).or_insert_with(|| {
            let bar = multi.add(ProgressBar::new(total));
            bar.set_style(style(phase.unit(), false));
            bar.set_prefix(phase.describe());
            bar
        });
        if bar.is_finished() {
            return;
        }
        bar.set_length(total);
        // Parallel reporters (hashing) may deliver counts out of order.
        bar.set_position(done.max(bar.position()).min(total));
        if done >= total {
            // Kept on screen, with the time the phase took.
            bar.set_style(style(phase.unit(), true));
            bar.finish();
        }
    }
}

/// Unfinished bars (an error ended the work) are removed so that the error
/// message stands on its own line; finished phases stay on screen.
impl Drop for PhaseBars {
    fn drop(&mut self) {
        if let Ok(bars) = self.bars.lock() {
            for bar in bars.values().filter(|b| !b.is_finished()) {
                bar.finish_and_clear();
            }
        }
    }
}

fn style(unit: Unit, finished: bool) -> ProgressStyle {
    let counts = match unit {
        Unit::Tokens => "{pos}/{len} tokens",
        Unit::Layers => "layer {pos}/{len}",
        Unit::Bytes => "{bytes}/{total_bytes} ({bytes_per_sec})",
    };
    let time = if finished {
        "done in {elapsed}"
    } else {
        "{elapsed} elapsed, {eta} left"
    };
    ProgressStyle::with_template(&format!("{{prefix:>19}} [{{bar:30}}] {counts}, {time}"))
        .expect("static template")
        .progress_chars("=> ")
}
