//! Quoting a client's value in a message a person reads: at most a short prefix, with control
//! characters escaped, so an error never echoes kilobytes of hostile input back.

use std::fmt;

/// How many characters of a value a message shows.
const SHOWN: usize = 64;

/// A client's value, quoted for a message: `'abc'`, or `'abc…' (1048576 bytes)` when long.
pub(crate) struct Quoted<'a>(&'a str);

/// Quotes `s` for a message.
pub(crate) fn quote(s: &str) -> Quoted<'_> {
    Quoted(s)
}

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.chars();
        f.write_str("'")?;
        for c in chars.by_ref().take(SHOWN) {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        if chars.next().is_some() {
            write!(f, "…' ({} bytes)", self.0.len())
        } else {
            f.write_str("'")
        }
    }
}

/// The most of a message the gRPC layer sends back; longer ones are cut (a backstop: values
/// are quoted short where they are named).
pub(crate) const MAX_MESSAGE: usize = 4096;

/// `message`, cut to [`MAX_MESSAGE`] bytes at a character boundary.
pub(crate) fn cap(message: String) -> String {
    if message.len() <= MAX_MESSAGE {
        return message;
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &message[..end], message.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_value_is_quoted_by_its_prefix_and_size() {
        assert_eq!(quote("edge").to_string(), "'edge'");
        let long = "x".repeat(1 << 20);
        let q = quote(&long).to_string();
        assert!(q.len() < 100, "{q}");
        assert!(q.ends_with("…' (1048576 bytes)"), "{q}");
        assert_eq!(quote("a\nb").to_string(), "'a\\nb'");
    }

    #[test]
    fn a_long_message_is_capped_at_a_character_boundary() {
        let m = "é".repeat(5000);
        let c = cap(m);
        assert!(c.len() < MAX_MESSAGE + 40);
        assert!(c.ends_with("(10000 bytes in all)"));
    }
}
