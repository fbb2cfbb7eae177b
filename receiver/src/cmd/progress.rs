//! Progress of long commands on stderr: for a person at a terminal a bar with bytes, rate
//! and ETA (indicatif); otherwise a line at each quarter, so a log keeps four lines, not
//! thousands.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub(crate) struct Progress {
    what: &'static str,
    bar: Option<ProgressBar>,
    quarter: Option<u64>,
}

impl Progress {
    /// Progress of `what` ("restoring"), in bytes.
    pub(crate) fn new(what: &'static str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0).with_message(what);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Progress {
            what,
            bar,
            quarter: None,
        }
    }

    /// `done` of `total` bytes.
    pub(crate) fn update(&mut self, done: u64, total: u64) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            None => {
                let quarter = (done * 4).checked_div(total).unwrap_or(4);
                if self.quarter != Some(quarter) {
                    eprintln!("{}: {}%", self.what, quarter * 25);
                    self.quarter = Some(quarter);
                }
            }
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
