//! Human output: aligned plain-text tables, payload previews, times.

use std::time::Duration;

/// Characters of a payload shown in a preview.
pub const PREVIEW_CHARS: usize = 80;

/// Characters of a last error shown in a table (JSON and `--full` have all
/// of it).
pub const ERROR_CHARS: usize = 100;

/// An aligned plain-text table: a header row, then rows, columns separated
/// by two spaces; the last column is not padded.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column titles.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                if i + 1 < columns {
                    let pad = widths[i] - cell.chars().count();
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The first `max` characters of `bytes` read as UTF-8 (invalid sequences
/// as U+FFFD), control characters escaped (`\n`, `\u{1b}`…), and `…` when
/// there was more.
pub fn preview(bytes: &[u8], max: usize) -> String {
    clip(&String::from_utf8_lossy(bytes), max)
}

/// `text` cut to `max` characters as [`preview`] cuts payloads.
pub fn clip(text: &str, max: usize) -> String {
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// `text` cut to `max` characters by taking out its middle: errors wrap
/// their cause, so the end (the broker's or the handler's own words)
/// matters as much as the start. Escaped as [`clip`] does.
pub fn clip_middle(text: &str, max: usize) -> String {
    let chars = text.chars().count();
    if chars <= max {
        return clip(text, max);
    }
    // A third for the start, the rest for the end, one for the `…`.
    let head = max / 3;
    let tail = max.saturating_sub(head + 1);
    let start: String = text.chars().take(head).collect();
    let end: String = text.chars().skip(chars - tail).collect();
    format!("{}…{}", clip(&start, head), clip(&end, tail))
}

/// A duration as a short human age: `850ms`, `42s`, `3m05s`, `2h07m`, `4d03h`.
pub fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Milliseconds since the Unix epoch as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn timestamp(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    // Both are in range by construction: 1..=12 and 1..=31.
    (
        y,
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_aligned_and_the_last_column_is_not_padded() {
        let mut t = Table::new(&["ID", "N", "NOTE"]);
        t.row(vec!["a".into(), "1000".into(), "x".into()]);
        t.row(vec!["long-id".into(), "2".into(), String::new()]);
        assert_eq!(
            t.render(),
            "ID       N     NOTE\na        1000  x\nlong-id  2\n"
        );
    }

    #[test]
    fn previews_are_cut_escaped_and_lossy() {
        assert_eq!(preview(b"{\"a\":1}", 80), "{\"a\":1}");
        assert_eq!(preview(b"line1\nline2\t", 80), "line1\\nline2\\t");
        assert_eq!(preview(&[0x66, 0xff, 0x67], 80), "f\u{fffd}g");
        assert_eq!(preview("é".repeat(100).as_bytes(), 3), "ééé…");
        assert_eq!(preview(b"\x1b[0m", 80), "\\u{1b}[0m");
        assert_eq!(preview(b"", 80), "");
    }

    #[test]
    fn long_errors_keep_their_start_and_their_end() {
        let error = "broker refused a frame and closed the connection: The maximum frame size \
                     of 104857600 bytes was exceeded by 3145728 bytes";
        let cut = clip_middle(error, 60);
        assert_eq!(cut.chars().count(), 60, "{cut}");
        assert!(cut.starts_with("broker refused a fra"), "{cut}");
        assert!(cut.ends_with("was exceeded by 3145728 bytes"), "{cut}");
        assert!(cut.contains('…'), "{cut}");
        assert_eq!(clip_middle("short\nerror", 60), "short\\nerror");
    }

    #[test]
    fn ages_and_timestamps() {
        assert_eq!(age(Duration::from_millis(850)), "850ms");
        assert_eq!(age(Duration::from_secs(42)), "42s");
        assert_eq!(age(Duration::from_secs(185)), "3m05s");
        assert_eq!(age(Duration::from_secs(7620)), "2h07m");
        assert_eq!(age(Duration::from_secs(4 * 86400 + 3 * 3600)), "4d03h");
        assert_eq!(timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(timestamp(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14 22:13:20");
    }
}
