//! indicatif rendering of template build phases.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use zeroboot_template::Progress;

pub struct Spinners {
    current: Mutex<Option<ProgressBar>>,
}

impl Spinners {
    pub fn new() -> Self {
        Self {
            current: Mutex::new(None),
        }
    }
}

fn style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner:.cyan} {prefix:<12.bold} [{elapsed:>4}] {wide_msg:.dim}")
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
}

impl Progress for Spinners {
    fn start(&self, phase: &str) {
        let bar = ProgressBar::new_spinner()
            .with_style(style())
            .with_prefix(phase.to_string());
        bar.enable_steady_tick(Duration::from_millis(120));
        if let Ok(mut cur) = self.current.lock() {
            *cur = Some(bar);
        }
    }

    fn line(&self, text: &str) {
        if let Ok(cur) = self.current.lock() {
            if let Some(bar) = cur.as_ref() {
                bar.set_message(text.chars().take(200).collect::<String>());
            }
        }
    }

    fn finish(&self, phase: &str, took: Duration, cached: bool) {
        if let Ok(mut cur) = self.current.lock() {
            if let Some(bar) = cur.take() {
                bar.finish_and_clear();
            }
        }
        let how = if cached { "cached" } else { "built" };
        eprintln!("  {phase:<12} {how:<7} {:>8.2}s", took.as_secs_f64());
    }
}
