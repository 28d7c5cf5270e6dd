//! Text that reaches a log line or a terminal, made safe to print.

/// `text` on one line: control characters (a line break in a quoted
/// argument or in what a server sent) are shown escaped, so they cannot
/// split a message or forge another log line. At most `max_chars`
/// characters are kept, then `...`.
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut line = String::with_capacity(text.len().min(max_chars));
    for (i, c) in text.chars().enumerate() {
        if i == max_chars {
            line.push_str("...");
            break;
        }
        if c.is_control() {
            line.extend(c.escape_debug());
        } else {
            line.push(c);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut() {
        let forged = "Too many connections\n2099-01-01 WARN server 0 is now Up";
        assert_eq!(
            one_line(forged, 200),
            "Too many connections\\n2099-01-01 WARN server 0 is now Up"
        );
        let long = one_line(&"x".repeat(5000), 200);
        assert_eq!(long.len(), 203);
        assert!(long.ends_with("..."));
        assert_eq!(one_line("connect: refused", 200), "connect: refused");
    }
}
