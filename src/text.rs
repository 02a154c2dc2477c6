//! Text from outside (a token endpoint's `error_description`, a server's error code) made
//! safe to display and log: secrets scrubbed first, then control characters escaped,
//! then cut to a bounded length.
//!
//! The order matters. Cutting first could leave part of a secret that straddles the cut,
//! which scrubbing would then no longer recognise; escaping first could change how a
//! secret with unusual characters reads. Log subscribers escape some fields and not
//! others, so nothing here relies on them.

/// Longest text kept from a server, in characters, escapes included.
pub(crate) const MAX_SERVER_TEXT: usize = 200;

/// Replaces every occurrence of each secret in `text` with `[redacted]`. Longer secrets
/// go first, so a secret that contains another is replaced whole.
///
/// The text is scrubbed as it came, then inside every JSON string literal that holds an
/// escape, decoded (and the JSON in it, a few levels deep), then decoded whole, by each
/// decoder a server's echo may have gone through (JSON escapes, percent-encoding, HTML
/// character references), a few levels deep (an HTML-escaped secret, percent-encoded):
/// a server's encoder may escape what none of `secrets`' forms does, and a secret it
/// echoes must be found all the same. A literal is written again as serde_json writes
/// it; a text in which only a decoding found a secret is shown decoded. Each secret is
/// also looked for as UTF-8 read as Latin-1 (a servlet's default), and a long prefix of
/// it where a string ends (a server that cut its message) is redacted too.
#[cfg(feature = "token")]
pub(crate) fn scrub(text: &str, secrets: &[String]) -> String {
    let mut secrets: Vec<String> = secrets.iter().filter(|s| !s.is_empty()).cloned().collect();
    let misread: Vec<String> = secrets
        .iter()
        .filter(|s| !s.is_ascii())
        .map(|s| s.bytes().map(char::from).collect())
        .collect();
    secrets.extend(misread);
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets.dedup();
    let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
    scrub_nested(text, &secrets, 3)
}

/// [`scrub`] with `secrets` sorted, down to `depth` levels of decoding.
#[cfg(feature = "token")]
fn scrub_nested(text: &str, secrets: &[&str], depth: u8) -> String {
    let text = replace_secrets(text, secrets);
    if depth == 0 {
        return text;
    }
    let text = match text.contains('\\') {
        true => replace_secrets(
            &map_json_strings(&text, |decoded| scrub_nested(decoded, secrets, depth - 1)),
            secrets,
        ),
        false => text,
    };
    // Escapes outside any literal this pairing of quotes found (a stray quote before the
    // JSON shifts every literal), an encoder's escape no form has, another encoding
    // altogether: the whole text decoded, each decoding scrubbed in turn (escapes
    // escaped again, or encoded again another way, down to the depth). Shown decoded
    // only if a secret was there.
    let redactions = |t: &str| t.matches(REDACTED).count();
    for decode in [decode_json_escapes, decode_percent, decode_html] {
        let Some(decoded) = decode(&text) else {
            continue;
        };
        let scrubbed = scrub_nested(&decoded, secrets, depth - 1);
        if redactions(&scrubbed) > redactions(&decoded) {
            return scrubbed;
        }
    }
    text
}

/// What a secret is replaced with.
#[cfg(feature = "token")]
const REDACTED: &str = "[redacted]";

/// `text` with every `%XX` (either case) decoded as a byte of UTF-8 (a `+` stays a
/// `+`); `None` when there was none.
#[cfg(feature = "token")]
fn decode_percent(text: &str) -> Option<String> {
    if !text.contains('%') {
        return None;
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut decoded_any = false;
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|_| bytes[i] == b'%')
            .and_then(|h| std::str::from_utf8(h).ok())
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(byte) => {
                out.push(byte);
                i += 3;
                decoded_any = true;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    decoded_any.then(|| String::from_utf8_lossy(&out).into_owned())
}

/// `text` with every HTML character reference decoded: numeric (`&#39;`, `&#x2B;`)
/// and the named ones an escaper writes for the characters a secret may hold (`&amp;`,
/// `&lt;`, `&gt;`, `&quot;`, `&apos;`, and HTML5's names of ASCII punctuation such as
/// `&plus;`, `&equals;`, `&sol;`); `None` when there was none.
#[cfg(feature = "token")]
fn decode_html(text: &str) -> Option<String> {
    const NAMED: [(&str, char); 24] = [
        ("amp", '&'),
        ("lt", '<'),
        ("gt", '>'),
        ("quot", '"'),
        ("apos", '\''),
        ("plus", '+'),
        ("equals", '='),
        ("sol", '/'),
        ("bsol", '\\'),
        ("percnt", '%'),
        ("num", '#'),
        ("excl", '!'),
        ("quest", '?'),
        ("lpar", '('),
        ("rpar", ')'),
        ("ast", '*'),
        ("comma", ','),
        ("colon", ':'),
        ("semi", ';'),
        ("period", '.'),
        ("lowbar", '_'),
        ("dollar", '$'),
        ("commat", '@'),
        ("grave", '`'),
    ];
    if !text.contains('&') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut decoded_any = false;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        // The reference's name, up to its `;` (a short one: never a whole sentence).
        let reference = rest[1..]
            .find(';')
            .filter(|&end| end <= 10)
            .map(|end| &rest[1..=end]);
        let decoded = reference.and_then(|name| {
            let c = match name.strip_prefix('#') {
                Some(num) => match num.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok(),
                    None => num.parse().ok(),
                }
                .and_then(char::from_u32),
                None => NAMED
                    .iter()
                    .find(|(known, _)| known.eq_ignore_ascii_case(name))
                    .map(|(_, c)| *c),
            }?;
            Some((c, name.len() + 2))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
                decoded_any = true;
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    decoded_any.then_some(out)
}

/// `text` with every JSON escape in it decoded (`\"`, `\\`, `\/`, `\b`, `\f`,
/// `\n`, `\r`, `\t`, `\uXXXX`, a surrogate pair as one character and a lone surrogate
/// as U+FFFD), wherever it is; anything else after a backslash stays as it is. `None`
/// when there was nothing to decode.
#[cfg(feature = "token")]
fn decode_json_escapes(text: &str) -> Option<String> {
    if !text.contains('\\') {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut decoded_any = false;
    // A `\uXXXX` at the start of `s`: its code unit and what follows it.
    let unit = |s: &str| -> Option<(u16, usize)> {
        let hex = s.strip_prefix("\\u")?.get(..4)?;
        let unit = u16::from_str_radix(hex, 16).ok()?;
        hex.bytes()
            .all(|b| b.is_ascii_hexdigit())
            .then_some((unit, 6))
    };
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let simple = match rest.as_bytes().get(1) {
            Some(b'"') => Some('"'),
            Some(b'\\') => Some('\\'),
            Some(b'/') => Some('/'),
            Some(b'b') => Some('\u{8}'),
            Some(b'f') => Some('\u{c}'),
            Some(b'n') => Some('\n'),
            Some(b'r') => Some('\r'),
            Some(b't') => Some('\t'),
            _ => None,
        };
        if let Some(c) = simple {
            out.push(c);
            rest = &rest[2..];
            decoded_any = true;
            continue;
        }
        match unit(rest) {
            Some((high @ 0xD800..=0xDBFF, len)) => {
                match unit(&rest[len..]).filter(|(low, _)| (0xDC00..=0xDFFF).contains(low)) {
                    Some((low, len2)) => {
                        let c = 0x10000
                            + ((u32::from(high) - 0xD800) << 10)
                            + (u32::from(low) - 0xDC00);
                        out.push(char::from_u32(c).unwrap_or('\u{fffd}'));
                        rest = &rest[len + len2..];
                    }
                    None => {
                        out.push('\u{fffd}');
                        rest = &rest[len..];
                    }
                }
                decoded_any = true;
            }
            Some((unit, len)) => {
                out.push(char::from_u32(u32::from(unit)).unwrap_or('\u{fffd}'));
                rest = &rest[len..];
                decoded_any = true;
            }
            None => {
                out.push('\\');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    decoded_any.then_some(out)
}

/// `text` with each secret replaced, and a prefix of a secret where a string ends (the
/// text's end, a closing quote or tag, an ellipsis: a server that cut its message
/// there) when it is long enough to tell ([`MIN_CUT_PREFIX`] characters).
#[cfg(feature = "token")]
fn replace_secrets(text: &str, secrets: &[&str]) -> String {
    let mut text = text.to_owned();
    for secret in secrets {
        if text.contains(secret) {
            text = text.replace(secret, REDACTED);
        }
    }
    for secret in secrets {
        text = replace_cut_prefixes(&text, secret);
    }
    text
}

/// The fewest characters of a secret that count as an echo of it when a server cut its
/// message after them.
#[cfg(feature = "token")]
const MIN_CUT_PREFIX: usize = 8;

/// `text` with every prefix of `secret` of [`MIN_CUT_PREFIX`] characters or more
/// that a string's end follows replaced.
#[cfg(feature = "token")]
fn replace_cut_prefixes(text: &str, secret: &str) -> String {
    let Some((start, _)) = secret.char_indices().nth(MIN_CUT_PREFIX) else {
        return text.to_owned();
    };
    let head = &secret[..start];
    if !text.contains(head) {
        return text.to_owned();
    }
    let ends = |after: &str| {
        after.is_empty()
            || after.starts_with(['"', '\'', '<', '\u{2026}'])
            || after.starts_with("..")
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(head) {
        out.push_str(&rest[..at]);
        let from = &rest[at..];
        // How much of the secret follows: whole characters of both.
        let matched = from
            .char_indices()
            .zip(secret.chars())
            .take_while(|((_, a), b)| a == b)
            .last()
            .map_or(0, |((i, c), _)| i + c.len_utf8());
        if ends(&from[matched..]) {
            out.push_str(REDACTED);
        } else {
            out.push_str(&from[..matched]);
        }
        rest = &from[matched..];
    }
    out.push_str(rest);
    out
}

/// `text` with every JSON string literal that holds an escape (`"..\/.."`) decoded,
/// passed through `f`, and written again as serde_json writes it (escaping only `"`,
/// `\\` and control characters); a literal that does not decode, and everything outside
/// literals, is left as it is.
#[cfg(feature = "token")]
fn map_json_strings(text: &str, f: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..open]);
        let literal = &rest[open..];
        // The closing quote: the first `"` not escaped by a backslash.
        let mut escaped = false;
        let close = literal.char_indices().skip(1).find_map(|(i, c)| match c {
            _ if escaped => {
                escaped = false;
                None
            }
            '\\' => {
                escaped = true;
                None
            }
            '"' => Some(i),
            _ => None,
        });
        let Some(close) = close else {
            out.push_str(literal);
            return out;
        };
        let (literal, after) = literal.split_at(close + 1);
        let rewritten = decode_json_escapes(&literal[1..literal.len() - 1])
            .and_then(|decoded| serde_json::to_string(&f(&decoded)).ok());
        out.push_str(rewritten.as_deref().unwrap_or(literal));
        rest = after;
    }
    out.push_str(rest);
    out
}

/// How JSON encoders write `secret` inside a string: serde_json's (and JavaScript's,
/// Java's Jackson's) form, and those of encoders that escape more: PHP's `json_encode`
/// (`\/`, non-ASCII as `\u00e9`), Python's `json.dumps` (non-ASCII as `\u00e9`), Go's
/// `encoding/json` (`<`, `>`, `&`, U+2028 and U+2029 as `\u003c`), Java's Gson (Go's,
/// and `=`, `'` as `\u003d`: base64 padding), .NET's
/// `System.Text.Json` (`"`, `'`, `+`, `` ` ``, `<`, `>`, `&` and non-ASCII as `\u0022`,
/// upper-case hex). Each distinct form once.
#[cfg(feature = "token")]
pub(crate) fn json_forms(secret: &str) -> Vec<String> {
    let php = |c: char| !c.is_ascii() || c == '/';
    let python = |c: char| !c.is_ascii();
    let go = |c: char| matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}');
    let gson = |c: char| matches!(c, '<' | '>' | '&' | '=' | '\'' | '\u{2028}' | '\u{2029}');
    let dotnet = |c: char| !c.is_ascii() || matches!(c, '"' | '\'' | '+' | '`' | '<' | '>' | '&');
    let mut forms = vec![json_form(secret, |_| false, false)];
    for (escape, upper) in [
        (&php as &dyn Fn(char) -> bool, false),
        (&python, false),
        (&go, false),
        (&gson, false),
        (&dotnet, true),
    ] {
        let form = json_form(secret, escape, upper);
        if !forms.contains(&form) {
            forms.push(form);
        }
    }
    forms
}

/// `secret` as a JSON string's content: `"` and `\\` escaped, control characters as
/// serde_json writes them, and every character `escape` names as `\uXXXX` (`/` as
/// `\/`), in upper-case hex if `upper`.
#[cfg(feature = "token")]
fn json_form(secret: &str, escape: impl Fn(char) -> bool, upper: bool) -> String {
    let mut out = String::with_capacity(secret.len() + 8);
    for c in secret.chars() {
        match c {
            '/' if escape(c) => out.push_str("\\/"),
            c if escape(c) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&match upper {
                        true => format!("\\u{unit:04X}"),
                        false => format!("\\u{unit:04x}"),
                    });
                }
            }
            c if c == '"' || c == '\\' || c.is_control() => {
                let written = serde_json::to_string(&c.to_string()).unwrap_or_default();
                // Without the quotes around it (a `"` in it is escaped: `"\""`).
                out.push_str(
                    written
                        .get(1..written.len().saturating_sub(1))
                        .unwrap_or(""),
                );
            }
            c => out.push(c),
        }
    }
    out
}

/// Whether `c` must not reach a log line or a terminal as is: control characters (C0,
/// DEL, C1: line breaks, escape sequences) and the invisible characters that reorder or
/// hide text: every format character (Unicode category Cf: bidirectional overrides,
/// zero-width characters, the soft hyphen, the tag characters that can carry a hidden
/// copy of any ASCII text), the variation selectors, the combining grapheme joiner and
/// the Hangul fillers.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{ad}'
                | '\u{34f}'
                | '\u{600}'..='\u{605}'
                | '\u{61c}'
                | '\u{6dd}'
                | '\u{70f}'
                | '\u{890}'..='\u{891}'
                | '\u{8e2}'
                | '\u{115f}'..='\u{1160}'
                | '\u{17b4}'..='\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff0}'..='\u{fffb}'
                | '\u{110bd}'
                | '\u{110cd}'
                | '\u{13430}'..='\u{1343f}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

/// `text` with every unsafe character escaped (`\n`, `\r`, `\t`, `\\`, `\u{1b}`), cut to
/// at most `max` characters, the `…` that marks a cut included (an escape is never
/// split).
pub(crate) fn escape(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 4));
    let mut count = 0;
    let mut piece = String::new();
    // (bytes, chars) of each piece written, to take whole ones back.
    let mut pieces: Vec<(usize, usize)> = Vec::new();
    for c in text.chars() {
        piece.clear();
        match c {
            '\n' => piece.push_str("\\n"),
            '\r' => piece.push_str("\\r"),
            '\t' => piece.push_str("\\t"),
            '\\' => piece.push_str("\\\\"),
            // A quote would end the quotes an error's `Display` puts around it.
            '"' => piece.push_str("\\\""),
            c if is_unsafe(c) => piece.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => piece.push(c),
        }
        let len = piece.chars().count();
        if count + len > max {
            // Room for the mark: drop whole pieces that no longer fit with it.
            while count + 1 > max {
                let Some((bytes, chars)) = pieces.pop() else {
                    break;
                };
                out.truncate(out.len() - bytes);
                count -= chars;
            }
            out.push('…');
            return out;
        }
        count += len;
        pieces.push((piece.len(), len));
        out.push_str(&piece);
    }
    out
}

/// Scrubs, escapes and cuts server text for keeping in an error.
#[cfg(feature = "token")]
pub(crate) fn from_server(text: &str, secrets: &[String]) -> String {
    escape(&scrub(text, secrets), MAX_SERVER_TEXT)
}

/// The start of an error body that is not an OAuth error, made safe to show: scrubbed
/// of the request's secrets and of URL credentials and queries, escaped, and cut to
/// [`MAX_BODY_START`] characters (after scrubbing, so a cut never splits a secret out of
/// reach of the scrubber).
#[cfg(feature = "token")]
pub(crate) fn body_start(text: &str, secrets: &[String]) -> String {
    escape(&strip_url_secrets(&scrub(text, secrets)), MAX_BODY_START)
}

/// How much of an error body [`body_start`] keeps.
#[cfg(feature = "token")]
pub(crate) const MAX_BODY_START: usize = 120;

/// Text from a user's source or store (an error's `Display`), made safe to log: URL
/// credentials and query strings removed (a client error may carry the URL it called,
/// with a key in it), control characters escaped, cut to [`MAX_SERVER_TEXT`] twice over.
pub(crate) fn foreign(text: &str) -> String {
    escape(&strip_url_secrets(text), 2 * MAX_SERVER_TEXT)
}

/// A URL as it may be shown (`Display` of an error, `Debug` of a type that holds it):
/// scheme, host, port and path, escaped; never the userinfo or the query, either of
/// which may carry a secret.
#[cfg(feature = "token")]
pub(crate) fn shown_url(url: &http::Uri) -> String {
    let scheme = url.scheme_str().unwrap_or("");
    let authority = url.authority().map(|a| a.as_str()).unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or(authority);
    escape(&format!("{scheme}://{host}{}", url.path()), MAX_SERVER_TEXT)
}

/// Removes the userinfo (`user:pass@`) and the query (`?key=...`) of every URL in `text`.
fn strip_url_secrets(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | ')'))
            .unwrap_or(after.len());
        let (url, tail) = after.split_at(end);
        let authority_end = url.find(['/', '?', '#']).unwrap_or(url.len());
        let (authority, path) = url.split_at(authority_end);
        match authority.rfind('@') {
            Some(at) => {
                out.push_str("[redacted]@");
                out.push_str(&authority[at + 1..]);
            }
            None => out.push_str(authority),
        }
        match path.find('?') {
            Some(q) => {
                out.push_str(&path[..q]);
                out.push_str("?[redacted]");
            }
            None => out.push_str(path),
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Line breaks, escape sequences and bidi overrides come out escaped; plain text and
    /// non-ASCII letters are left alone.
    #[test]
    fn escapes_what_forges_or_hides() {
        assert_eq!(
            escape("a\r\nb\u{1b}[31m\u{202e}é\\", 100),
            "a\\r\\nb\\u{1b}[31m\\u{202e}é\\\\"
        );
    }

    /// The cut never splits an escape and is marked.
    #[test]
    fn cuts_on_escape_boundaries() {
        assert_eq!(escape("abc\ndef", 5), "abc…");
        assert_eq!(escape("abcdef", 6), "abcdef");
        assert_eq!(escape("abcdefg", 6), "abcde…");
        assert_eq!(escape("a\u{2028}b", 20), "a\\u{2028}b");
    }

    /// URLs in foreign text lose their credentials and query; the rest stays readable.
    #[test]
    fn foreign_text_loses_url_secrets() {
        assert_eq!(
            foreign("GET https://u:pw@api.test/v1?api_key=K3Y failed\n(io)"),
            "GET https://[redacted]@api.test/v1?[redacted] failed\\n(io)"
        );
        assert_eq!(foreign("no url here"), "no url here");
        assert_eq!(
            foreign("redis://:hunter2@127.0.0.1:6379/0 refused"),
            "redis://[redacted]@127.0.0.1:6379/0 refused"
        );
    }

    /// A secret straddling the cut, so no part survives; a
    /// secret holding another is replaced whole.
    #[cfg(feature = "token")]
    #[test]
    fn scrubs_before_cutting() {
        let secret = "S3CR3T-VALUE-LONG".to_owned();
        let text = format!("{}{secret}", "x".repeat(195));
        let out = from_server(&text, std::slice::from_ref(&secret));
        assert!(!out.contains("S3CR"), "{out}");
        let out = scrub("ab abc", &["ab".into(), "abc".into()]);
        assert_eq!(out, "[redacted] [redacted]");
    }

    /// A secret echoed in a JSON string by encoders that escape more than serde_json
    /// (PHP, Python, Go, .NET) is found; text outside strings, a literal without an
    /// escape, one that does not decode and an unclosed one stay as they came.
    #[cfg(feature = "token")]
    #[test]
    fn scrubs_secrets_in_json_strings_however_escaped() {
        let secret = "a/b+c&d\u{e9}\"e".to_owned();
        let forms = [
            secret.clone(),
            serde_json::to_string(&secret)
                .unwrap()
                .trim_matches('"')
                .to_owned(),
        ];
        for echoed in [
            r#"{"m":"bad a\/b+c&d\u00e9\"e here"}"#,
            r#"{"m":"bad a/b+c&d\u00e9\"e here"}"#,
            r#"{"m":"bad a/b+c\u0026d\u00e9\"e here"}"#,
            r#"{"m":"bad a\/b\u002Bc\u0026d\u00E9\u0022e here"}"#,
        ] {
            assert_eq!(
                scrub(echoed, &forms),
                r#"{"m":"bad [redacted] here"}"#,
                "{echoed}"
            );
        }
        for kept in [
            r#"plain "quoted" text"#,
            r#""bad \x escape""#,
            r#"open "a\/b"#,
        ] {
            assert_eq!(map_json_strings(kept, str::to_owned), kept);
        }
        assert_eq!(
            map_json_strings(r#"x "a\/b" y"#, str::to_owned),
            r#"x "a/b" y"#
        );
    }

    /// Each encoder's form of a secret with a slash, a plus, an ampersand, a quote, a
    /// non-ASCII letter and a character beyond the BMP (a surrogate pair).
    #[cfg(feature = "token")]
    #[test]
    fn json_forms_are_what_encoders_write() {
        let forms = json_forms("a/b+c&d\u{e9}\"e\u{1F600}");
        for (encoder, expected) in [
            ("serde_json", "a/b+c&d\u{e9}\\\"e\u{1F600}"),
            ("php", r#"a\/b+c&d\u00e9\"e\ud83d\ude00"#),
            ("python", r#"a/b+c&d\u00e9\"e\ud83d\ude00"#),
            ("go", "a/b+c\\u0026d\u{e9}\\\"e\u{1F600}"),
            ("dotnet", r#"a/b\u002Bc\u0026d\u00E9\u0022e\uD83D\uDE00"#),
        ] {
            assert!(forms.iter().any(|f| f == expected), "{encoder}: {forms:?}");
        }
        assert_eq!(json_forms("plain-secret"), ["plain-secret"]);
    }

    /// Every JSON escape decoded wherever it is, a surrogate pair as one character, a
    /// lone surrogate as U+FFFD, anything else after a backslash left as it is; and a
    /// secret in an escape no encoder's form writes, outside any literal, found by the
    /// whole text decoded.
    #[cfg(feature = "token")]
    #[test]
    fn decodes_json_escapes_leniently() {
        assert_eq!(decode_json_escapes("plain"), None);
        assert_eq!(decode_json_escapes(r"a\x\u12"), None);
        assert_eq!(
            decode_json_escapes(r#"\"q\" \/ \\ \n \u00e9 \ud83d\ude00 \ud83d! \ude00"#).as_deref(),
            Some("\"q\" / \\ \n \u{e9} \u{1F600} \u{fffd}! \u{fffd}")
        );
        let forms = json_forms("S3cret");
        let odd = r#"x" {"m":"\u0053\u0033cret"}"#;
        assert!(
            !scrub(odd, &forms).contains("cret"),
            "{}",
            scrub(odd, &forms)
        );
    }

    /// The whole-text decoders: percent-encoding (either case, a `+` left as it is) and
    /// HTML character references (numeric, and the names of ASCII punctuation).
    #[cfg(feature = "token")]
    #[test]
    fn decodes_percent_and_html_references() {
        assert_eq!(
            decode_percent("a%2Bb%2fc%zz%").as_deref(),
            Some("a+b/c%zz%")
        );
        assert_eq!(decode_percent("a+b"), None);
        assert_eq!(decode_percent("%C3%A9").as_deref(), Some("\u{e9}"));
        assert_eq!(
            decode_html("a&amp;b&#39;c&#x2B;d&PLUS;e&bogus;f&#xZZ;&").as_deref(),
            Some("a&b'c+d+e&bogus;f&#xZZ;&")
        );
        assert_eq!(decode_html("fish & chips; salt"), None);
    }

    /// A prefix of a secret is redacted where a string ends (a server cut it there),
    /// never in the middle of a sentence: an error naming the word a password starts
    /// with still reads.
    #[cfg(feature = "token")]
    #[test]
    fn redacts_a_cut_secret_where_a_string_ends_only() {
        let secret = ["password-4711-x".to_owned()];
        for cut in [
            "bad: password-47",
            r#"{"d":"bad: password-4711"}"#,
            "bad: password-471\u{2026}",
            "bad: password-4...",
            "<p>bad: password-</p>",
        ] {
            assert!(
                !scrub(cut, &secret).contains("password-4"),
                "{cut}: {}",
                scrub(cut, &secret)
            );
        }
        let said = "wrong password-reset link; password-4 is not it";
        assert_eq!(scrub(said, &secret), said);
        // Too short to tell.
        assert_eq!(scrub("bad: passwor", &secret), "bad: passwor");
    }

    /// Found by review: invisible format characters that hide text (tag characters
    /// carrying a hidden copy of ASCII text, the soft hyphen, the Mongolian vowel
    /// separator, interlinear annotation marks) are escaped, as are quotes (which would
    /// end the quotes `Display` puts around a body).
    #[test]
    fn escapes_invisible_format_characters_and_quotes() {
        let hidden: String = "rm -rf /"
            .chars()
            .map(|c| char::from_u32(0xE0000 + c as u32).unwrap())
            .collect();
        let text = format!("invalid\u{e0001}{hidden}\u{e007f} \u{ad}\u{180e}\u{fff9}x\u{fffb}");
        let out = escape(&text, 400);
        assert!(out.is_ascii(), "left unescaped: {out:?}");
        assert_eq!(escape(r#"x") (retry in 0s"#, 100), r#"x\") (retry in 0s"#);
    }

    /// A secret scrubbed wherever its JSON escapes put it: raw in quotes (a decoded
    /// description quoting a secret that holds `\/`), in JSON nested in a JSON string,
    /// and after a stray quote that pairs the literals wrongly.
    #[cfg(feature = "token")]
    #[test]
    fn scrubs_raw_nested_and_misaligned_echoes() {
        let raw = r"S\/3cret".to_owned();
        let out = scrub(r#"secret "S\/3cret" is wrong"#, std::slice::from_ref(&raw));
        assert_eq!(out, r#"secret "[redacted]" is wrong"#);
        let slash = "S/3cret".to_owned();
        let forms = json_forms(&slash);
        let nested = r#"{"upstream":"{\"client_secret\":\"S\\\/3cret\"}"}"#;
        assert!(
            !scrub(nested, &forms).contains("3cret"),
            "{}",
            scrub(nested, &forms)
        );
        let stray = r#"said 5" then {"message":"secret S\/3cret is wrong"}"#;
        assert!(
            !scrub(stray, &forms).contains("3cret"),
            "{}",
            scrub(stray, &forms)
        );
    }
}
