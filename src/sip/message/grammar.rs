//! Lexical helpers shared by the header and URI parsers (RFC 3261 §25.1).
//!
//! Everything here works on borrowed `&str` slices and never panics: every
//! index comes from `find`/`char_indices` on the same string.

/// `token` characters of RFC 3261 §25.1.
pub fn is_token_byte(b: u8) -> bool {
    TOKEN_BYTES[usize::from(b)]
}

const TOKEN_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        b += 1;
    }
    t
};

pub fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_token_byte)
}

/// Linear white space after unfolding: only SP and HT remain.
pub fn trim_lws(s: &str) -> &str {
    let b = s.as_bytes();
    let start = b
        .iter()
        .position(|&c| c != b' ' && c != b'\t')
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|&c| c != b' ' && c != b'\t')
        .map_or(start, |i| i + 1);
    // Both ends sit next to ASCII bytes, so they are character boundaries.
    &s[start..end]
}

/// Position of the first `b` in `s` (a byte search, cheaper than `str::find`).
#[inline]
pub fn find_byte(s: &str, b: u8) -> Option<usize> {
    // SIMD search pays off only past a few dozen bytes; header pieces are short.
    if s.len() < SHORT {
        s.bytes().position(|c| c == b)
    } else {
        memchr::memchr(b, s.as_bytes())
    }
}

/// Below this length a plain loop beats a vectorised search.
const SHORT: usize = 32;

/// `str::split_once` for an ASCII separator.
#[inline]
pub fn split_once_byte(s: &str, b: u8) -> Option<(&str, &str)> {
    let i = find_byte(s, b)?;
    Some((&s[..i], &s[i + 1..]))
}

/// Position of the first space or tab.
#[inline]
pub fn find_ws(s: &str) -> Option<usize> {
    if s.len() < SHORT {
        s.bytes().position(|c| c == b' ' || c == b'\t')
    } else {
        memchr::memchr2(b' ', b'\t', s.as_bytes())
    }
}

/// Splits `s` at top-level occurrences of `sep`: separators inside a quoted
/// string (with `\` escapes) or inside `<...>` do not count. Inside angle
/// brackets only `>` is special (a URI holds no quotes).
pub fn split_top_level(s: &str, sep: u8) -> SplitTopLevel<'_> {
    SplitTopLevel {
        rest: Some(s),
        sep: Some(sep),
        // Most parameter lists and header values hold neither quotes nor
        // angle brackets: one vectorised scan here lets every part be found
        // with a plain byte search.
        plain: memchr::memchr2(b'"', b'<', s.as_bytes()).is_none(),
    }
}

/// `s` as a single part, for values that are not lists: the same iterator
/// type as [`split_top_level`], without scanning.
pub fn unsplit(s: &str) -> SplitTopLevel<'_> {
    SplitTopLevel {
        rest: Some(s),
        sep: None,
        plain: true,
    }
}

pub struct SplitTopLevel<'a> {
    rest: Option<&'a str>,
    sep: Option<u8>,
    /// No quote or `<` anywhere in the input: every `sep` is top level.
    plain: bool,
}

impl<'a> Iterator for SplitTopLevel<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest?;
        let found = match self.sep {
            Some(sep) if self.plain => find_byte(s, sep),
            Some(sep) => find_top_level(s, sep),
            None => None,
        };
        match found {
            Some(i) => {
                self.rest = Some(&s[i + 1..]);
                Some(&s[..i])
            }
            None => {
                self.rest = None;
                Some(s)
            }
        }
    }
}

/// Position of the first top-level `sep` in `s` (see [`split_top_level`]).
pub fn find_top_level(s: &str, sep: u8) -> Option<usize> {
    if s.len() < 2 * SHORT {
        return find_top_level_short(s.as_bytes(), sep);
    }
    let bytes = s.as_bytes();
    let mut i = 0;
    // Jump from one interesting byte to the next instead of walking them all.
    while let Some(off) = memchr::memchr3(sep, b'"', b'<', &bytes[i..]) {
        let at = i + off;
        match bytes[at] {
            b'"' => {
                // Skip the quoted string, honouring backslash escapes.
                let mut j = at + 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[j.min(bytes.len())..]) {
                        None => return None,
                        Some(o) if bytes[j + o] == b'\\' => j += o + 2,
                        Some(o) => {
                            j += o + 1;
                            break;
                        }
                    }
                    if j >= bytes.len() {
                        return None;
                    }
                }
                i = j;
            }
            b'<' if sep != b'<' => match memchr::memchr(b'>', &bytes[at..]) {
                Some(o) => i = at + o + 1,
                None => return None,
            },
            _ => return Some(at),
        }
        if i >= bytes.len() {
            return None;
        }
    }
    None
}

/// [`find_top_level`] for short strings: one pass, byte by byte.
fn find_top_level_short(bytes: &[u8], sep: u8) -> Option<usize> {
    let (mut in_quotes, mut in_angle, mut i) = (false, false, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if in_angle {
            in_angle = b != b'>';
        } else if in_quotes {
            match b {
                b'\\' => i += 1,
                b'"' => in_quotes = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_quotes = true,
                b'<' if sep != b'<' => in_angle = true,
                _ if b == sep => return Some(i),
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// Removes the quotes and `\` escapes of a quoted-string. Returns `None` for
/// an unterminated string. Borrowed when there is nothing to unescape.
pub fn unquote(s: &str) -> Option<std::borrow::Cow<'_, str>> {
    let s = trim_lws(s);
    let Some(inner) = s.strip_prefix('"') else {
        return Some(s.into());
    };
    let inner = inner.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(inner.into());
    }
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next()?);
        } else {
            out.push(c);
        }
    }
    Some(out.into())
}

/// Writes `s` as a quoted-string, escaping `"` and `\`.
pub fn quote_into(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
}

/// One `name[=value]` parameter from a `;`-separated list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Param<'a> {
    pub name: &'a str,
    pub value: Option<&'a str>,
}

/// Iterates the parameters of `;a=b;c` (the leading `;` is optional).
/// Values keep their quotes; use [`unquote`] where the grammar allows them.
pub fn params(s: &str) -> impl Iterator<Item = Param<'_>> {
    split_top_level(s, b';').filter_map(|p| {
        let p = trim_lws(p);
        if p.is_empty() {
            return None;
        }
        Some(match split_once_byte(p, b'=') {
            Some((n, v)) => Param {
                name: trim_lws(n),
                value: Some(trim_lws(v)),
            },
            None => Param {
                name: p,
                value: None,
            },
        })
    })
}

/// Looks up one parameter by case-insensitive name. `Some(None)` means the
/// parameter is present without a value (`;lr`).
pub fn param<'a>(s: &'a str, name: &str) -> Option<Option<&'a str>> {
    params(s)
        .find(|p| p.name.eq_ignore_ascii_case(name))
        .map(|p| p.value)
}

/// Parses a decimal number of at most `max_digits` digits, with no sign and
/// no surrounding junk.
pub fn parse_decimal_u32(s: &str, max_digits: usize) -> Option<u32> {
    let s = trim_lws(s);
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The plain byte-by-byte definition the fast version must agree with.
    fn find_top_level_reference(s: &str, sep: u8) -> Option<usize> {
        let bytes = s.as_bytes();
        let (mut in_quotes, mut in_angle, mut i) = (false, false, 0);
        while i < bytes.len() {
            let b = bytes[i];
            if in_angle {
                // A URI holds no quotes: only '>' means anything inside <...>.
                in_angle = b != b'>';
            } else if in_quotes {
                match b {
                    b'\\' => i += 1,
                    b'"' => in_quotes = false,
                    _ => {}
                }
            } else {
                match b {
                    b'"' => in_quotes = true,
                    b'<' => in_angle = true,
                    _ if b == sep => return Some(i),
                    _ => {}
                }
            }
            i += 1;
        }
        None
    }

    proptest! {
        #[test]
        fn fast_split_agrees_with_the_reference(s in "[a-c,;<>\"\\\\ ]{0,160}", sep in prop::sample::select(vec![b',', b';'])) {
            let fast = find_top_level(&s, sep);
            let reference = find_top_level_reference(&s, sep);
            // The reference keeps scanning inside an unterminated quote or
            // angle and so finds nothing; so must the fast one.
            prop_assert_eq!(fast, reference, "in {:?}", s);
        }
    }

    proptest! {
        #[test]
        fn split_agrees_with_the_reference(s in "[a-c,;<>\"\\\\ ]{0,60}", sep in prop::sample::select(vec![b',', b';'])) {
            let mut expected = Vec::new();
            let mut rest = s.as_str();
            loop {
                match find_top_level_reference(rest, sep) {
                    Some(i) => {
                        expected.push(&rest[..i]);
                        rest = &rest[i + 1..];
                    }
                    None => {
                        expected.push(rest);
                        break;
                    }
                }
            }
            let parts: Vec<&str> = split_top_level(&s, sep).collect();
            prop_assert_eq!(parts, expected, "in {:?}", s);
        }
    }

    #[test]
    fn split_ignores_separators_in_quotes_and_angles() {
        let parts: Vec<_> =
            split_top_level(r#""a, \"b\"" <sip:x;y,z>;p=1, <sip:w>"#, b',').collect();
        assert_eq!(parts, vec![r#""a, \"b\"" <sip:x;y,z>;p=1"#, " <sip:w>"]);
    }

    #[test]
    fn unquote_handles_escapes_and_rejects_unterminated() {
        assert_eq!(unquote(r#""a\"b\\c""#).unwrap(), "a\"b\\c");
        assert_eq!(unquote("plain").unwrap(), "plain");
        assert!(unquote("\"open").is_none());
        let mut q = String::new();
        quote_into(&mut q, "a\"b\\c");
        assert_eq!(unquote(&q).unwrap(), "a\"b\\c");
    }

    #[test]
    fn params_are_case_insensitive_and_valueless_allowed() {
        let p = ";Branch=z9hG4bK1; rport ;received=1.2.3.4";
        assert_eq!(param(p, "branch"), Some(Some("z9hG4bK1")));
        assert_eq!(param(p, "rport"), Some(None));
        assert_eq!(param(p, "maddr"), None);
    }

    #[test]
    fn decimal_is_bounded() {
        assert_eq!(parse_decimal_u32(" 42 ", 10), Some(42));
        assert_eq!(parse_decimal_u32("99999999999", 10), None);
        assert_eq!(parse_decimal_u32("4294967296", 10), None);
        assert_eq!(parse_decimal_u32("-1", 10), None);
        assert_eq!(parse_decimal_u32("", 10), None);
    }
}
