//! How frames from the server read for people on a terminal. Bodies and names come from other
//! users, so every control character is shown escaped: a message cannot move the cursor,
//! recolour the screen or retitle the terminal. Pure functions.

use chrono::{DateTime, Local, Utc};
use serde_json::Value;
use std::fmt::Write;

/// `text` with control characters other than line breaks and tabs, and the bidirectional
/// overrides (which could make a line read backwards), written as `\u{..}`.
pub fn printable(text: &str) -> String {
    escaped(text, |c| c == '\n' || c == '\t')
}

/// `text` for one line (a name, a reason, an error): line breaks and tabs escaped too, so it
/// cannot forge a line of its own.
pub fn line(text: &str) -> String {
    escaped(text, |_| false)
}

fn escaped(text: &str, keep: impl Fn(char) -> bool) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() || bidi) && !keep(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// A wire time as local `HH:MM`, or the text as it came when it is not a time.
pub fn clock(sent_at: &str) -> String {
    match DateTime::parse_from_rfc3339(sent_at) {
        Ok(t) => t.with_timezone(&Local).format("%H:%M").to_string(),
        Err(_) => line(sent_at),
    }
}

fn now() -> String {
    Utc::now().with_timezone(&Local).format("%H:%M").to_string()
}

fn field<'a>(frame: &'a Value, name: &str) -> &'a str {
    frame[name].as_str().unwrap_or("?")
}

/// A room for people: `#general`, or `@bob` for the caller's direct room with bob.
pub fn room_label(room: &str, me: &str) -> String {
    match room
        .strip_prefix("dm:")
        .and_then(|users| users.split_once(':'))
    {
        Some((a, b)) => {
            let other = if a.eq_ignore_ascii_case(me) { b } else { a };
            format!("@{}", line(other))
        }
        None => format!("#{}", line(room)),
    }
}

/// One message object: `09:54 #general ann: hello`, continuation lines indented.
pub fn message(message: &Value, me: &str) -> String {
    let head = format!(
        "{} {} {}:",
        clock(field(message, "sent_at")),
        room_label(field(message, "room"), me),
        line(field(message, "from"))
    );
    let body = match message["body"].as_str() {
        Some(body) => printable(body).replace('\n', "\n    "),
        None => "(this message could not be decrypted)".into(),
    };
    format!("{head} {body}")
}

/// An event for people; None for frames that are not one.
pub fn event(frame: &Value, me: &str) -> Option<String> {
    let room = || room_label(field(frame, "room"), me);
    let user = || line(field(frame, "user"));
    Some(match frame["type"].as_str()? {
        "message" => message(frame, me),
        "joined" => format!("{} {} {} joined", now(), room(), user()),
        "left" => format!("{} {} {} left", now(), room(), user()),
        "typing" => format!("{} {} {} is typing…", now(), room(), user()),
        "kicked" => format!(
            "{} you were removed from {} ({})",
            now(),
            room(),
            line(field(frame, "reason"))
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn control_characters_cannot_reach_the_terminal() {
        assert_eq!(printable("a\u{1b}[2Jb\u{7}"), "a\\u{1b}[2Jb\\u{7}");
        assert_eq!(printable("two\nlines\tok"), "two\nlines\tok");
        assert_eq!(
            line("fake\n12:00 #general boss: hi"),
            "fake\\u{a}12:00 #general boss: hi"
        );
        assert_eq!(printable("a\u{202e}b"), "a\\u{202e}b");
        let shown = message(
            &json!({"room": "general", "from": "e\u{1b}vil", "body": "x\u{9b}y", "sent_at": "no"}),
            "ann",
        );
        assert!(!shown.chars().any(|c| c.is_control()), "{shown:?}");
    }

    #[test]
    fn direct_rooms_are_named_after_the_other_user() {
        assert_eq!(room_label("dm:ann:bob", "ann"), "@bob");
        assert_eq!(room_label("dm:ann:bob", "Bob"), "@ann");
        assert_eq!(room_label("general", "ann"), "#general");
    }

    #[test]
    fn messages_and_events_read_as_lines() {
        let shown = message(
            &json!({"room": "general", "seq": 3, "from": "bob", "body": "hi\nthere", "sent_at": "2026-11-26T09:54:36.392Z"}),
            "ann",
        );
        assert!(shown.ends_with(" #general bob: hi\n    there"), "{shown}");
        let undecryptable = message(
            &json!({"room": "general", "seq": 4, "from": "bob", "sent_at": "x", "error": "undecryptable"}),
            "ann",
        );
        assert!(undecryptable.ends_with("(this message could not be decrypted)"));
        let kicked = event(
            &json!({"type": "kicked", "room": "staff", "reason": "revoked"}),
            "ann",
        );
        assert!(kicked.is_some_and(|k| k.ends_with("you were removed from #staff (revoked)")));
        assert_eq!(event(&json!({"type": "ok", "id": "1"}), "ann"), None);
    }
}
