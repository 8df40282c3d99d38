//! Tables for people, JSON for scripts.

use std::io::IsTerminal;

pub(crate) use comfy_table::Cell;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Color, ContentArrangement, Table};

/// Writes a line on stdout (as `println!`). A reader that closed the pipe (`troupe … | head`)
/// has what it wanted: the program ends quietly, with success, rather than panicking.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use out;

/// Writes `text` on stdout (see [`out!`]).
pub(crate) fn write_out(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("troupe: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// Prints one JSON document on stdout.
pub(crate) fn print_json(value: &serde_json::Value) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => out!("{text}"),
        Err(e) => eprintln!("troupe: cannot print JSON: {e}"),
    }
}

/// Whether to colour: stdout is a terminal and `NO_COLOR` is not set.
pub(crate) fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// A table with `header`, fitted to the terminal when there is one.
pub(crate) fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header(header);
    if std::io::stdout().is_terminal() {
        table.set_content_arrangement(ContentArrangement::Dynamic);
    } else {
        table.force_no_tty();
    }
    if !colour() {
        table.force_no_tty();
    }
    table
}

/// A cell coloured `color` when colouring.
pub(crate) fn coloured(text: impl ToString, color: Color) -> Cell {
    let cell = Cell::new(text);
    if colour() { cell.fg(color) } else { cell }
}

/// A number cell: red when `alert` and non-zero.
pub(crate) fn count(n: u64, alert: bool) -> Cell {
    if alert && n > 0 {
        coloured(n, Color::Red)
    } else {
        Cell::new(n)
    }
}

/// `ms` since the epoch as an RFC 3339 time (UTC, seconds).
pub(crate) fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

/// How long ago `ms` was, roughly ("3s ago", "2h ago"); "in 5m" for the future.
pub(crate) fn ago(ms: u64) -> String {
    let now = troupe::now_ms();
    let (d, future) = if ms > now { (ms - now, true) } else { (now - ms, false) };
    let secs = d / 1000;
    let text = match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86_400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86_400),
    };
    if future {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// `text` cut to `max` characters, with an ellipsis.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("");
    if line.chars().count() <= max && line.len() == text.len() {
        return line.to_owned();
    }
    let mut out: String = line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}
