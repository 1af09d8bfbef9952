//! Policy errors: where (`file:line:column`), which key (`services.github.inject.credential`)
//! and what is wrong, collected so that every problem in a file is reported at once.
//!
//! Owns `PolicyError`, `PolicyErrors` and the `Errors` collector used while loading. Messages
//! must never contain a scalar's value (a secret may sit in the wrong place); only key names and
//! the names of credentials, services and capabilities may appear.

use std::fmt;

/// One problem in a policy file. `line` and `column` are 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted path of the offending key, e.g. `capabilities.github.issues.read.routes[1]`;
    /// empty for problems that belong to no key (YAML syntax).
    pub key_path: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        escaped(f, &self.file)?;
        write!(f, ":{}:{}: ", self.line, self.column)?;
        if !self.key_path.is_empty() {
            escaped(f, &self.key_path)?;
            f.write_str(": ")?;
        }
        escaped(f, &self.message)
    }
}

/// `text` with control characters, line and paragraph separators and bidirectional controls
/// written as `\u{..}`: a key (or a name it suggests, or a path) may spell one with a YAML
/// escape, and a raw line break, terminal sequence or reordering would break the
/// one-line-per-error output, forge a line in keyward's log, or show another text than it is.
fn escaped(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    // Also the invisible ones (zero-width space and joiners, soft hyphen, word joiner, BOM):
    // `k\u{200b}` must not read as `k`.
    let hidden = |c: char| {
        c.is_control()
            || matches!(
                c,
                '\u{2028}'
                    | '\u{2029}'
                    | '\u{061c}'
                    | '\u{00ad}'
                    | '\u{034f}'
                    | '\u{180e}'
                    | '\u{feff}'
            )
            || ('\u{200b}'..='\u{200f}').contains(&c)
            || ('\u{202a}'..='\u{202e}').contains(&c)
            || ('\u{2060}'..='\u{2069}').contains(&c)
    };
    for part in text.split_inclusive(hidden) {
        match part.char_indices().last() {
            Some((at, c)) if hidden(c) => {
                f.write_str(&part[..at])?;
                write!(f, "\\u{{{:x}}}", u32::from(c))?;
            }
            _ => f.write_str(part)?,
        }
    }
    Ok(())
}

impl std::error::Error for PolicyError {}

/// Every problem found in a policy, sorted by position. Never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl PolicyErrors {
    /// One error about the file as a whole (reported at 1:1), e.g. a CA file that cannot be read.
    pub fn whole_file(file: &str, message: impl Into<String>) -> PolicyErrors {
        PolicyErrors(vec![PolicyError {
            file: file.to_string(),
            line: 1,
            column: 1,
            key_path: String::new(),
            message: message.into(),
        }])
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// A 1-based position in the policy file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub(crate) struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// Where problems with no better place go (a missing top-level key, an unreadable file).
    pub const START: Pos = Pos { line: 1, column: 1 };

    pub fn new(line: usize, column: usize) -> Self {
        Pos { line, column }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Collects problems while the policy is walked and checked.
pub(crate) struct Errors {
    file: String,
    list: Vec<PolicyError>,
}

impl Errors {
    pub fn new(file: &str) -> Self {
        Errors {
            file: file.to_owned(),
            list: Vec::new(),
        }
    }

    pub fn push(&mut self, pos: Pos, key_path: &str, message: impl Into<String>) {
        let (key_path, message) = hide_pasted(key_path, &message.into());
        self.list.push(PolicyError {
            file: self.file.clone(),
            line: pos.line,
            column: pos.column,
            key_path,
            message,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Sorted by position (stable: problems at one place keep the order they were found in),
    /// exact repeats dropped.
    pub fn finish(mut self) -> PolicyErrors {
        self.list.sort_by_key(|e| (e.line, e.column));
        self.list.dedup();
        PolicyErrors(self.list)
    }
}

/// SECURITY: `message` with every word that looks like a pasted credential
/// (`values::looks_pasted`; words end at blanks and backticks, so a key holding a backtick is
/// still caught) written as `(hidden: looks like a secret)`, and `path` cut at the key where
/// such a word, or a key that looks pasted, begins. Messages quote what the file says, and a
/// key pasted where a name belongs would otherwise be repeated into a terminal, a CI log or
/// keyward's log.
pub(crate) fn hide_pasted(path: &str, message: &str) -> (String, String) {
    let mut shown = String::with_capacity(message.len());
    let mut hidden: Vec<String> = Vec::new();
    let mut word = String::new();
    let mut flush = |word: &mut String, shown: &mut String| {
        if super::values::looks_pasted(word) {
            shown.push_str("(hidden: looks like a secret)");
            hidden.push(std::mem::take(word));
        } else {
            shown.push_str(word);
            word.clear();
        }
    };
    for c in message.chars() {
        if c == '`' || c.is_whitespace() {
            flush(&mut word, &mut shown);
            shown.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut shown);
    let mut cut = hidden.iter().filter_map(|h| path.find(h.as_str())).min();
    let mut at = 0;
    for key in path.split('.') {
        let bare = key.split('[').next().unwrap_or(key);
        if super::values::looks_pasted(bare) {
            cut = Some(cut.map_or(at, |c| c.min(at)));
            break;
        }
        at += key.len() + 1;
    }
    let path = match cut {
        None => path.to_owned(),
        Some(at) => {
            // Back to the start of the key the cut falls in.
            match path.get(..at).and_then(|p| p.rfind('.')) {
                None => "(hidden)".to_owned(),
                Some(dot) => format!("{}(hidden)", path.get(..=dot).unwrap_or("")),
            }
        }
    };
    (path, shown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_look_like_pasted_credentials_are_not_repeated() {
        let mut errs = Errors::new("p.yaml");
        errs.push(
            Pos::new(3, 5),
            "credentials.sk-live-PASTED-1234567890.source",
            "unknown key `sk-live-PASTED-1234567890` (expected `source`); duplicate key `ghp_abc`",
        );
        errs.push(
            Pos::new(4, 1),
            "services.github.inject",
            "unknown key `openai_key`",
        );
        // A backtick inside the key, or dots in it, change nothing.
        errs.push(
            Pos::new(5, 1),
            "services.s.x`sk-proj-ABCDEFGHIJ0123456789zz",
            "unknown key `x`sk-proj-ABCDEFGHIJ0123456789zz`",
        );
        errs.push(
            Pos::new(6, 1),
            "services.s.ABCDEFGHIJKLMNOP.1234.QRSTUVWXYZ",
            "unknown key `ABCDEFGHIJKLMNOP.1234.QRSTUVWXYZ` (already listed at 12:34)",
        );
        let text = errs.finish().to_string();
        for part in ["PASTED", "ghp_abc", "ABCDEFGHIJ0123456789", "QRSTUVWXYZ"] {
            assert!(!text.contains(part), "{part}: {text}");
        }
        assert!(text.contains("p.yaml:5:1: services.s.(hidden): "), "{text}");
        assert!(text.contains("p.yaml:6:1: services.s.(hidden): "), "{text}");
        assert!(text.contains("listed at 12:34"), "{text}");
        assert!(
            text.contains(
                "p.yaml:3:5: credentials.(hidden): unknown key `(hidden: looks like a secret)`"
            ),
            "{text}"
        );
        assert!(
            text.contains("services.github.inject: unknown key `openai_key`"),
            "{text}"
        );
    }

    #[test]
    fn display_has_file_position_path_and_message() {
        let mut errs = Errors::new("policy.yaml");
        errs.push(Pos::new(7, 3), "proxy.listen", "second");
        errs.push(Pos::new(2, 9), "", "first");
        errs.push(Pos::new(7, 3), "proxy.listen", "second");
        let all = errs.finish();
        assert_eq!(
            all.to_string(),
            "policy.yaml:2:9: first\npolicy.yaml:7:3: proxy.listen: second"
        );
    }

    #[test]
    fn control_characters_in_keys_are_escaped_so_each_error_stays_one_line() {
        let mut errs = Errors::new("p.yaml");
        errs.push(
            Pos::new(4, 3),
            "capabilities.x\u{1b}[31mRED\ny",
            "unknown key `x\u{1b}[31mRED\ny\u{200b}`; did you mean `é\u{85}`?\u{2028}\u{202e}",
        );
        assert_eq!(
            errs.finish().to_string(),
            "p.yaml:4:3: capabilities.x\\u{1b}[31mRED\\u{a}y: unknown key `x\\u{1b}[31mRED\\u{a}y\\u{200b}`; did you mean `é\\u{85}`?\\u{2028}\\u{202e}"
        );
    }

    #[test]
    fn sorting_is_stable_within_one_position() {
        let mut errs = Errors::new("f");
        errs.push(Pos::new(3, 1), "b", "x");
        errs.push(Pos::new(1, 1), "z", "x");
        errs.push(Pos::new(3, 1), "a", "x");
        let paths: Vec<_> = errs.finish().0.into_iter().map(|e| e.key_path).collect();
        assert_eq!(paths, ["z", "b", "a"]);
    }
}
