//! Live progress: an indicatif bar on a terminal (sized to it), a log line every few seconds
//! otherwise.

use std::path::Path;
use std::time::{Duration, Instant};

use super::{count_lines, Stats};

/// Live progress: an indicatif bar on a terminal, a log line every few seconds otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    /// The bar width the bar's style was made for (`None`: the spinner style, no length yet),
    /// so a resized terminal gets a new style.
    styled: Option<usize>,
    every: Duration,
    last_log: Instant,
    quiet: bool,
    /// (when, rows finished): one sample a second at most, over the last minute, for the rate.
    window: std::collections::VecDeque<(Instant, u64)>,
}

impl Progress {
    /// `input`: the input file, counted in the background (only when a bar is shown) to give
    /// the bar its length and an ETA; `header_lines` are not rows; `limit` caps the count.
    pub fn new(
        quiet: bool,
        input: Option<&Path>,
        header_lines: u64,
        limit: Option<u64>,
        shards: u32,
    ) -> Progress {
        use std::io::IsTerminal;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new_spinner();
            b.set_style(style(None));
            b.enable_steady_tick(Duration::from_millis(200));
            if let Some(path) = input.filter(|p| p.as_os_str() != "-") {
                let (b, path) = (b.clone(), path.to_path_buf());
                // Newlines, not records: a CSV field may hold a newline, so this is an
                // estimate, good enough for a bar and an ETA. The next update styles the bar.
                std::thread::spawn(move || {
                    if let Ok(lines) = count_lines(&path) {
                        let rows = lines.saturating_sub(header_lines);
                        let rows = limit.map_or(rows, |l| l.min(rows));
                        // A shard's share: rows are spread evenly by the hash.
                        b.set_length(rows.div_ceil(u64::from(shards.max(1))));
                    }
                });
            }
            b
        });
        Progress {
            bar,
            styled: None,
            every: Duration::from_secs(10),
            last_log: Instant::now(),
            quiet,
            window: Default::default(),
        }
    }

    pub fn update(&mut self, s: &Stats, force: bool) {
        let now = Instant::now();
        let done = s.ok + s.failed;
        // Called once per batch of records: sample at most once a second, so the window stays
        // small however fast rows finish.
        if self
            .window
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            self.window.push_back((now, done));
        }
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(60))
        {
            self.window.pop_front();
        }
        let log_due = !self.quiet && (force || now.duration_since(self.last_log) >= self.every);
        if self.bar.is_none() && !log_due {
            return; // nothing to show: skip formatting the line
        }
        let (t0, done0) = self.window.front().copied().unwrap_or((now, done));
        let span = now.duration_since(t0).as_secs_f64().max(1.0);
        let rpm = done.saturating_sub(done0) as f64 * 60.0 / span.min(60.0);
        let counts = Counts {
            ok: s.ok,
            failed: s.failed,
            skipped: s.skipped_ok + s.skipped_failed,
            tokens: s.prompt_tokens + s.completion_tokens,
            cost_usd: s.cost_usd,
            rpm,
        };
        if let Some(b) = &self.bar {
            let pos = done + counts.skipped;
            let width = console::Term::stderr()
                .size_checked()
                .map_or(80, |(_, cols)| cols as usize);
            let bar = b.length().map(|_| bar_width(width));
            if self.styled != bar {
                b.set_style(style(bar));
                self.styled = bar;
            }
            b.set_position(pos);
            let room = width.saturating_sub(fixed_width(bar, pos, b.length()));
            b.set_message(message(&counts, room));
        } else if log_due {
            let msg = message(&counts, usize::MAX);
            self.last_log = now;
            tracing::info!(target: "promptmill::progress", "{msg}");
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A spinner with a message on a terminal (none when quiet or not a terminal).
pub fn spinner(quiet: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_msg}")
                .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    })
}

/// What the progress line says besides the bar.
#[derive(Debug, Clone, Copy)]
struct Counts {
    ok: u64,
    failed: u64,
    skipped: u64,
    tokens: u64,
    cost_usd: f64,
    rpm: f64,
}

/// The longest form of the progress message that fits `room` columns. (A terminal narrower
/// than the shortest still gets one line: the style's `wide_msg` cuts the message.)
fn message(c: &Counts, room: usize) -> String {
    let forms = [
        format!(
            "rows {} (ok {}, failed {}, skipped {}) | tokens {} | ${:.4} | {:.0} req/min",
            c.ok + c.failed,
            c.ok,
            c.failed,
            c.skipped,
            c.tokens,
            c.cost_usd,
            c.rpm
        ),
        format!(
            "ok {} failed {} skipped {} | {} tok | ${:.4} | {:.0}/min",
            c.ok, c.failed, c.skipped, c.tokens, c.cost_usd, c.rpm
        ),
        format!(
            "ok {} failed {} | ${:.4} | {:.0}/min",
            c.ok, c.failed, c.cost_usd, c.rpm
        ),
        format!("ok {} failed {}", c.ok, c.failed),
    ];
    let last = forms.len() - 1;
    forms
        .into_iter()
        .enumerate()
        .find(|(i, f)| f.chars().count() <= room || *i == last)
        .map(|(_, f)| f)
        .expect("there is a last form")
}

/// The bar's width on a terminal `width` columns wide: it gives way to the counts first.
fn bar_width(width: usize) -> usize {
    match width {
        w if w >= 150 => 30,
        w if w >= 120 => 20,
        w if w >= 90 => 12,
        _ => 0,
    }
}

/// The progress style: a spinner until the row count is known (`bar` = `None`), then a bar
/// `bar` columns wide (0: none) with the position and ETA. The message is `wide_msg`, which
/// indicatif cuts to the terminal's width, so the line never wraps.
fn style(bar: Option<usize>) -> indicatif::ProgressStyle {
    let t = match bar {
        None => "{spinner} [{elapsed_precise}] {wide_msg}".to_string(),
        Some(0) => "{spinner} [{elapsed_precise}] {pos}/{len} (ETA {eta}) {wide_msg}".to_string(),
        Some(w) => format!(
            "{{spinner}} [{{elapsed_precise}}] {{bar:{w}}} {{pos}}/{{len}} (ETA {{eta}}) {{wide_msg}}"
        ),
    };
    indicatif::ProgressStyle::with_template(&t).expect("valid template")
}

/// Columns the style takes besides the message (an ETA counted at its usual "59m" width).
fn fixed_width(bar: Option<usize>, pos: u64, len: Option<u64>) -> usize {
    let digits = |n: u64| n.to_string().len();
    // "⠁ [00:00:00] "
    let mut w = 13;
    if let (Some(bar), Some(len)) = (bar, len) {
        if bar > 0 {
            w += bar + 1;
        }
        // "pos/len (ETA 59m) "
        w += digits(pos) + 1 + digits(len) + 11;
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A terminal of a given width that keeps what is drawn on it.
    #[derive(Debug, Clone)]
    struct Screen {
        width: u16,
        lines: Arc<Mutex<Vec<String>>>,
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            self.width
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.lines.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.write_line(s)
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Draws the line a run of `len` rows shows at `pos`, as `Progress::update` builds it, on a
    /// terminal `width` columns wide; returns what was drawn.
    fn draw(width: u16, pos: u64, len: Option<u64>, c: &Counts) -> Vec<String> {
        let screen = Screen {
            width,
            lines: Default::default(),
        };
        // Set up out of sight, then drawn once: the drawing is rate-limited.
        let b =
            indicatif::ProgressBar::with_draw_target(len, indicatif::ProgressDrawTarget::hidden());
        let bar = len.map(|_| bar_width(width as usize));
        b.set_style(style(bar));
        b.set_position(pos);
        let room = (width as usize).saturating_sub(fixed_width(bar, pos, len));
        b.set_message(message(c, room));
        b.set_draw_target(indicatif::ProgressDrawTarget::term_like(Box::new(
            screen.clone(),
        )));
        b.tick();
        let lines = screen.lines.lock().unwrap().clone();
        lines
    }

    #[test]
    fn the_progress_line_fits_the_terminal_from_60_to_200_columns() {
        // Large figures: the widest the counts get in practice.
        let c = Counts {
            ok: 987_654,
            failed: 12_345,
            skipped: 100_000,
            tokens: 1_234_567_890,
            cost_usd: 12_345.678_9,
            rpm: 30_000.0,
        };
        for width in [60u16, 70, 80, 89, 90, 100, 119, 120, 140, 150, 200] {
            for len in [None, Some(1_100_000)] {
                let lines = draw(width, 1_099_999, len, &c);
                let drawn: Vec<&String> = lines.iter().filter(|l| !l.trim().is_empty()).collect();
                assert!(!drawn.is_empty(), "{width}: nothing drawn");
                for l in drawn {
                    let w = console::measure_text_width(l);
                    assert!(w <= width as usize, "{width} columns, {w} drawn: {l:?}");
                    assert!(
                        l.contains("ok 987654"),
                        "{width}: the counts are shown: {l:?}"
                    );
                }
            }
        }
        // The whole message where there is room for it.
        let wide = draw(200, 5, Some(10), &c).concat();
        assert!(
            wide.contains("req/min") && wide.contains("skipped 100000"),
            "{wide}"
        );
    }

    #[test]
    fn the_message_takes_the_longest_form_that_fits() {
        let c = Counts {
            ok: 1,
            failed: 2,
            skipped: 3,
            tokens: 4,
            cost_usd: 0.5,
            rpm: 60.0,
        };
        assert_eq!(
            message(&c, usize::MAX),
            "rows 3 (ok 1, failed 2, skipped 3) | tokens 4 | $0.5000 | 60 req/min"
        );
        assert_eq!(
            message(&c, 50),
            "ok 1 failed 2 skipped 3 | 4 tok | $0.5000 | 60/min"
        );
        assert_eq!(message(&c, 32), "ok 1 failed 2 | $0.5000 | 60/min");
        assert_eq!(message(&c, 31), "ok 1 failed 2");
        assert_eq!(message(&c, 5), "ok 1 failed 2");
    }
}
