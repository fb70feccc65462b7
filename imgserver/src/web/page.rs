//! HTML building blocks of the console: escaping, the page frame, tables, times and sizes.
//!
//! Pages are plain strings built with `format!`; every value that comes from a device, an
//! image file or an administrator goes through [`esc`] (text and attribute values alike), so
//! a device naming itself `<script>` shows as text.

use std::fmt::Write;

use super::session::Signed;

/// Escape text for HTML element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Percent-encode a value for a URL query or path segment.
pub fn url_enc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
    }
    o
}

/// A Unix time as ISO 8601 UTC (`2026-11-29T05:24:23Z`).
pub fn iso(t: u64) -> String {
    let (y, m, d) = crate::tls::civil_from_days((t / 86_400) as i64);
    let s = t % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A time for people: a `<time>` element in UTC, which the console's script rewrites into
/// the administrator's own time zone (without the script it stays UTC, and says so).
pub fn time(t: Option<u64>) -> String {
    match t {
        None | Some(0) => "<span class=muted>never</span>".into(),
        Some(t) => {
            let i = iso(t);
            format!(
                "<time datetime=\"{i}\">{} UTC</time>",
                i.trim_end_matches('Z').replace('T', " ")
            )
        }
    }
}

/// How long ago, roughly (`42 s ago`, `3 min ago`, `5 h ago`, `2 d ago`).
pub fn ago(t: Option<u64>, now: u64) -> String {
    match t {
        None | Some(0) => "never".into(),
        Some(t) => {
            let d = now.saturating_sub(t);
            if d < 120 {
                format!("{d} s ago")
            } else if d < 7200 {
                format!("{} min ago", d / 60)
            } else if d < 172_800 {
                format!("{} h ago", d / 3600)
            } else {
                format!("{} d ago", d / 86_400)
            }
        }
    }
}

/// Bytes for people, binary units (`1.5 GiB`).
pub fn size(b: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// A state badge: the CSS class is derived from the state's machine name.
pub fn badge(machine: &str, title: &str) -> String {
    let class: String = machine
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    format!("<span class=\"badge s-{class}\">{}</span>", esc(title))
}

/// The hidden CSRF field every form that changes something carries.
pub fn csrf_field(who: &Signed) -> String {
    format!("<input type=hidden name=csrf value=\"{}\">", esc(&who.csrf))
}

/// A one-button form posting to `action` (abort, retry, ...), with the CSRF field. `confirm`
/// asks the administrator first (through the console's script; without it, no question).
pub fn button_form(who: &Signed, action: &str, label: &str, class: &str, confirm: &str) -> String {
    format!(
        "<form method=post action=\"{}\" class=inline{}>{}<button type=submit class=\"{class}\">{}</button></form>",
        esc(action),
        if confirm.is_empty() {
            String::new()
        } else {
            format!(" data-confirm=\"{}\"", esc(confirm))
        },
        csrf_field(who),
        esc(label)
    )
}

/// Which part of the console a page belongs to (highlighted in the navigation).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Jobs,
    NewJob,
    Sessions,
    Images,
    Tokens,
    None,
}

/// The page frame: head, navigation with the signed-in administrator, the body, and the
/// console's one script. `refresh` adds a no-script fallback refresh (live pages).
pub fn frame(who: Option<&Signed>, nav: Nav, title: &str, body: &str, refresh: bool) -> String {
    let mut o = String::with_capacity(body.len() + 2048);
    o.push_str("<!doctype html>\n<html lang=en><head><meta charset=utf-8>");
    o.push_str("<meta name=viewport content=\"width=device-width, initial-scale=1\">");
    let _ = write!(o, "<title>{} · imgserver</title>", esc(title));
    o.push_str("<link rel=stylesheet href=\"/assets/console.css\">");
    o.push_str("<link rel=icon href=\"data:,\">");
    if refresh {
        o.push_str("<noscript><meta http-equiv=refresh content=5></noscript>");
    }
    o.push_str("<script src=\"/assets/console.js\" defer></script></head><body>");
    o.push_str("<header><a class=brand href=\"/\">imgserver</a>");
    if let Some(w) = who {
        o.push_str("<nav>");
        for (n, href, label, shown) in [
            (Nav::Fleet, "/", "Fleet", true),
            (Nav::Jobs, "/jobs", "Jobs", true),
            (Nav::NewJob, "/jobs/new", "New job", w.may_schedule()),
            (Nav::Sessions, "/sessions", "Sessions", true),
            (Nav::Images, "/images", "Images", true),
            (Nav::Tokens, "/tokens", "Tokens", w.may_manage()),
        ] {
            if shown {
                let _ = write!(
                    o,
                    "<a href=\"{href}\"{}>{label}</a>",
                    if n == nav { " class=here" } else { "" }
                );
            }
        }
        o.push_str("</nav><div class=who>");
        let _ = write!(
            o,
            "<span>{} <small>({})</small></span>",
            esc(&w.name),
            w.role.as_str()
        );
        let _ = write!(
            o,
            "<form method=post action=\"/logout\" class=inline>{}<button type=submit class=link id=signout>Sign out</button></form>",
            csrf_field(w)
        );
        o.push_str("</div>");
    }
    o.push_str("</header><main>");
    o.push_str(body);
    o.push_str("</main></body></html>\n");
    o
}

/// A notice box (`ok`, `warn`, `error`).
pub fn notice(kind: &str, text: &str) -> String {
    format!("<p class=\"notice {kind}\" role=status>{}</p>", esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc("<script>\"a\"&'b'</script>"),
            "&lt;script&gt;&quot;a&quot;&amp;&#39;b&#39;&lt;/script&gt;"
        );
        assert_eq!(url_enc("a b/c?d=é"), "a%20b%2Fc%3Fd%3D%C3%A9");
    }

    #[test]
    fn times_and_sizes_read_well() {
        assert_eq!(iso(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso(1_795_929_863), "2026-11-29T05:24:23Z");
        assert_eq!(ago(Some(100), 130), "30 s ago");
        assert_eq!(ago(Some(0), 130), "never");
        assert_eq!(ago(Some(100), 100 + 3 * 86_400), "3 d ago");
        assert_eq!(size(512), "512 B");
        assert_eq!(size(3 << 29), "1.5 GiB");
        assert!(time(Some(0)).contains("never"));
    }

    #[test]
    fn badge_class_cannot_escape_the_attribute() {
        let b = badge("x\" onmouseover=\"y", "<b>");
        assert!(
            b.starts_with("<span class=\"badge s-xonmouseovery\">"),
            "{b}"
        );
        assert!(b.contains("&lt;b&gt;"));
    }
}
