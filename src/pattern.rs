//! Keyring patterns: `*` matches any run of characters (including `/`); everything else
//! matches itself. Used by permission grants and per-keyring rotation ages.

/// Whether `text` matches `pattern`.
///
/// ```
/// use ringvault::pattern::matches;
/// assert!(matches("ws_42/*", "ws_42/invoices"));
/// assert!(!matches("ws_42/*", "ws_43/invoices"));
/// ```
pub fn matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(index) => rest = &rest[index + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn globs() {
        assert!(matches("*", ""));
        assert!(matches("a*c", "abbbc"));
        assert!(matches("a*b*c", "a-b-c"));
        assert!(!matches("a*b*c", "a-c"));
        assert!(!matches("abc", "abcd"));
        assert!(matches("ws_*/prod", "ws_1/prod"));
        assert!(!matches("a*a", "a"));
    }
}
