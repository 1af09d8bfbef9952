//! YAML text → `marked_yaml` node tree, and the small typed readers the policy walk is built
//! from (mappings with a closed set of keys, lists, strings, booleans, numbers, durations,
//! socket addresses), each reporting problems with a position and a key path.
//!
//! Owns the YAML-level rules: one document only, no duplicate keys, no anchors or tags. It must
//! never put a scalar's value into an error message (a secret may be sitting in the wrong key).

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use marked_yaml::types::MarkedScalarNode;
use marked_yaml::{LoadError, LoaderOptions, Node};

use super::error::{Errors, Pos};

/// A value read from the file with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located<T> {
    pub value: T,
    pub pos: Pos,
    pub path: String,
}

/// Parses `text` into a tree whose top level is a mapping. YAML-level problems go to `errs`;
/// `None` only when no usable tree exists (syntax errors). A duplicate key is reported and the
/// walk still goes on over the later value, so the file's other problems are found too.
pub(crate) fn parse_document(text: &str, errs: &mut Errors) -> Option<Node> {
    // Editors hide a byte-order mark; stripping it keeps columns as the user sees them.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    check_single_document(text, errs);
    let mut text = Cow::Borrowed(text);
    let mut braced = Vec::new();
    let mut strict = load(&text, true)?;
    // SPEC §3's own `routes: [POST /repos/{owner}/...]`: see `swap_route_braces`.
    // Each round parses the file again: a large file gets fewer (it is written by a program,
    // which can quote).
    let rounds = MAX_BRACED_LINES.min(BRACE_PARSE_BUDGET / text.len().max(1));
    for _ in 0..rounds {
        let Err(LoadError::ScanError(m, _)) = &strict else {
            break;
        };
        let Some(swapped) = swap_route_braces(&text, marker_pos(Some(m)), &mut braced) else {
            break;
        };
        text = Cow::Owned(swapped);
        strict = load(&text, true)?;
    }
    let text = &*text;
    let mut node = match strict {
        Ok(node) => Some(node),
        Err(LoadError::DuplicateKey(_)) => {
            // marked-yaml stops at the first duplicate; every one is reported.
            for dup in walk(text, None).duplicates {
                let path = join(&dup.parent, &dup.key);
                let first = dup.first;
                let shown = secret_safe(&path);
                if shown == path {
                    let key = &dup.key;
                    errs.push(
                        dup.again,
                        &path,
                        format!("duplicate key `{key}` (first written at {first})"),
                    );
                } else {
                    errs.push(
                        dup.again,
                        shown,
                        format!("duplicate key (not repeated: it may be a secret; first written at {first})"),
                    );
                }
            }
            load(text, false).and_then(Result::ok)
        }
        Err(e) => {
            let (mut pos, mut message) = describe_load_error(&e);
            if matches!(e, LoadError::ScanError(_, ref scan) if scan.info().contains("tab")) {
                pos = first_tab_from_line(text, pos.line).unwrap_or(pos);
            } else if matches!(e, LoadError::ScanError(..)) && tab_before(text, pos) {
                // (`key:<TAB>value`: the scanner names the value, not the tab it stumbled on.)
                pos.column -= 1;
                message.push_str(" (here a tab: use spaces)");
            }
            if matches!(e, LoadError::ScanError(..)) && brace_in_flow_list(text, pos) {
                message.push_str(
                    "; inside `[...]` a route with `{param}` must be quoted (`[\"GET /a/{id}\"]`) or written as a `- GET /a/{id}` line",
                );
            }
            errs.push(pos, &path_at(text, pos), message);
            None
        }
    }?;
    if !braced.is_empty() {
        restore_route_braces(&mut node, &braced);
    }
    Some(node)
}

/// Where the first tab is on line `line` or after (1-based, columns in characters): the
/// scanner's tab errors point at the scalar or key it was reading, often the line before the
/// indentation that holds the tab.
fn first_tab_from_line(text: &str, line: usize) -> Option<Pos> {
    yaml_lines(text)
        .enumerate()
        .skip(line.saturating_sub(1))
        .find_map(|(i, (_, l))| {
            let column = l.chars().position(|c| c == '\t')?;
            Some(Pos {
                line: i + 1,
                column: column + 1,
            })
        })
}

/// Whether the character just before `pos` (on its line) is a tab.
fn tab_before(text: &str, pos: Pos) -> bool {
    pos.column > 1
        && yaml_lines(text)
            .nth(pos.line.saturating_sub(1))
            .and_then(|(_, l)| l.chars().nth(pos.column - 2))
            == Some('\t')
}

/// `text`'s lines as YAML counts them (a line ends at `\r\n`, `\n` or a lone `\r`), each with
/// where it starts.
fn yaml_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut rest = Some((0, text));
    std::iter::from_fn(move || {
        let (start, tail) = rest?;
        match tail.find(['\n', '\r']) {
            None => {
                rest = None;
                Some((start, tail))
            }
            Some(i) => {
                let brk = if tail[i..].starts_with("\r\n") { 2 } else { 1 };
                rest = Some((start + i + brk, &tail[i + brk..]));
                Some((start, &tail[..i]))
            }
        }
    })
}

/// How many lines of `[...]` routes with unquoted `{param}` a file may hold (each costs one
/// more parse of the file); past that, the error says to quote them.
const MAX_BRACED_LINES: usize = 512;
/// Bytes of YAML those extra parses may read in all (512 rounds of a 64 KiB file; 16 of a
/// 2 MiB one): about a second at most.
const BRACE_PARSE_BUDGET: usize = 32 << 20;

/// YAML ends a plain scalar at `{` inside `[...]`, so SPEC §3's own
/// `routes: [POST /repos/{owner}/{repo}/issues/{number}/comments]` is not YAML, and no parser
/// reads it. Users copy it, so when the parser stops at such a brace, the braces of every
/// route-like item from there to the line's `]` are swapped for `<` and `>` (the same width:
/// every position stays true) and the file is parsed again; `restore_route_braces` puts them
/// back into the values. Only a file that is not YAML as written is read differently, and only
/// an item that begins with a letter and holds no `<`, `>`, quote, `#`, `:` or `[` (which the
/// swap could blur or YAML reads otherwise). `None` when the stop is not at such an item.
fn swap_route_braces(text: &str, pos: Pos, braced: &mut Vec<Pos>) -> Option<String> {
    let (line_start, line) = yaml_lines(text).nth(pos.line.checked_sub(1)?)?;
    let line_end = line_start + line.len();
    let mut line: Vec<char> = line.chars().collect();
    let at = pos.column.checked_sub(1)?;
    if line.get(at) != Some(&'{') {
        return None;
    }
    // The item holding the brace starts after the `[` or `,` before it.
    let mut start = at;
    while start > 0 && !matches!(line[start - 1], '[' | ',') {
        start -= 1;
    }
    // The innermost bracket open before it must be a `[` on this line: an item of a list, not
    // a key of a `{...}`, nor a value continued from the line above (whose start, where its
    // braces would be put back, is not on this line). Quoted text before it is skipped; a
    // comment before it means the brace is not what stopped the parser.
    let mut open = Vec::new();
    let mut quote: Option<char> = None;
    let mut i = 0;
    while i < start {
        let c = line[i];
        match (quote, c) {
            (Some('"'), '\\') => i += 1,
            (Some('\''), '\'') if line.get(i + 1) == Some(&'\'') => i += 1,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => open.push(c),
            (None, ']' | '}') => {
                open.pop();
            }
            (None, '#') if i == 0 || matches!(line[i - 1], ' ' | '\t') => return None,
            _ => {}
        }
        i += 1;
    }
    if quote.is_some() || open.last() != Some(&'[') {
        return None;
    }
    let mut first = true;
    loop {
        while line.get(start).is_some_and(|c| *c == ' ' || *c == '\t') {
            start += 1;
        }
        let mut end = start;
        let mut depth = 0i32;
        let mut clean = line.get(start).is_some_and(char::is_ascii_alphabetic);
        while let Some(&c) = line.get(end) {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' | ']' if depth == 0 => break,
                '<' | '>' | '"' | '\'' | '#' | ':' | '[' | ']' | ',' => clean = false,
                _ => {}
            }
            clean &= depth >= 0;
            end += 1;
        }
        // It ends on this line (`,` or `]`): one continued on the next is put back by its
        // start, and its next line is not looked at here.
        clean &= depth == 0 && line.get(end).is_some() && line[start..end].contains(&'{');
        if clean {
            for c in &mut line[start..end] {
                match c {
                    '{' => *c = '<',
                    '}' => *c = '>',
                    _ => {}
                }
            }
            braced.push(Pos::new(pos.line, start + 1));
        } else if first {
            return None;
        } else {
            // A quoted item, say, whose commas this split cannot see: the rest of the line is
            // left as written (a later brace gets its own round).
            break;
        }
        first = false;
        if line.get(end) != Some(&',') {
            break;
        }
        start = end + 1;
    }
    let mut out = String::with_capacity(text.len());
    out.push_str(&text[..line_start]);
    out.extend(line);
    out.push_str(&text[line_end..]);
    Some(out)
}

/// Puts back the braces `swap_route_braces` swapped: in every list item that starts where a
/// swapped one did.
fn restore_route_braces(node: &mut Node, braced: &[Pos]) {
    match node {
        Node::Scalar(_) => {}
        Node::Mapping(m) => {
            for (_, value) in m.iter_mut() {
                restore_route_braces(value, braced);
            }
        }
        Node::Sequence(items) => {
            for item in items.iter_mut() {
                if let Node::Scalar(s) = item {
                    let at = s.span().start().map(|m| marker_pos(Some(m)));
                    if at.is_some_and(|at| braced.contains(&at)) {
                        let value: String = s
                            .as_str()
                            .chars()
                            .map(|c| match c {
                                '<' => '{',
                                '>' => '}',
                                c => c,
                            })
                            .collect();
                        let mut restored = MarkedScalarNode::new(*s.span(), value);
                        restored.set_coerce(s.may_coerce());
                        *s = restored;
                    }
                } else {
                    restore_route_braces(item, braced);
                }
            }
        }
    }
}

/// A key written twice in one mapping.
struct Duplicate {
    /// Key path of the mapping that holds it.
    parent: String,
    key: String,
    first: Pos,
    again: Pos,
}

/// The key path of the node being written at `pos` (for a problem found there before or
/// without a tree), cut before any key that may be a pasted secret.
pub(crate) fn path_at(text: &str, pos: Pos) -> String {
    let path = walk(text, Some(pos)).path;
    secret_safe(&path).to_owned()
}

/// What a walk over the parser's events found.
struct Walk {
    /// Every duplicate key, in order (the tree loader stops at the first).
    duplicates: Vec<Duplicate>,
    /// The key path of the innermost node still open where the walk stopped: at `stop`, or
    /// where the text stops parsing (the loader reports that error; this names where it is).
    path: String,
}

/// Walks `text`'s events up to `stop` (or its end, or its first syntax error).
fn walk(text: &str, stop: Option<Pos>) -> Walk {
    use yaml_rust2::parser::{Event, Parser};
    enum Frame {
        /// `key` is the key whose value comes next (`None`: a key comes next).
        Map {
            path: String,
            seen: HashMap<String, Pos>,
            key: Option<String>,
        },
        Seq {
            path: String,
            next: usize,
        },
    }
    /// The path of the node that starts now, and marks the parent's slot as taken.
    fn child(stack: &mut [Frame]) -> Option<String> {
        match stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key, .. }) => key.take().map(|k| join(path, &k)),
            Some(Frame::Seq { path, next }) => {
                *next += 1;
                Some(format!("{path}[{}]", *next - 1))
            }
        }
    }
    let mut parser = Parser::new_from_str(text);
    let mut stack: Vec<Frame> = Vec::new();
    let mut out = Vec::new();
    while let Ok((event, mark)) = parser.next_token() {
        let pos = Pos::new(mark.line(), mark.col() + 1);
        if stop.is_some_and(|stop| pos >= stop) {
            break;
        }
        match event {
            Event::StreamEnd => break,
            Event::Scalar(value, ..) => match stack.last_mut() {
                Some(Frame::Map { path, seen, key }) if key.is_none() => {
                    if let Some(&first) = seen.get(&value) {
                        out.push(Duplicate {
                            parent: path.clone(),
                            key: value.clone(),
                            first,
                            again: pos,
                        });
                    } else {
                        seen.insert(value.clone(), pos);
                    }
                    *key = Some(value);
                }
                _ => {
                    child(&mut stack);
                }
            },
            Event::Alias(_) => {
                child(&mut stack);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                // A mapping or list as a key: the loader refuses that, and paths end here.
                let Some(path) = child(&mut stack) else { break };
                stack.push(match event {
                    Event::MappingStart(..) => Frame::Map {
                        path,
                        seen: HashMap::new(),
                        key: None,
                    },
                    _ => Frame::Seq { path, next: 0 },
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    let path = match stack.last() {
        None => String::new(),
        Some(Frame::Map { path, key, .. }) => match key {
            Some(key) => join(path, key),
            None => path.clone(),
        },
        Some(Frame::Seq { path, .. }) => path.clone(),
    };
    Walk {
        duplicates: out,
        path,
    }
}

fn load(text: &str, error_on_duplicates: bool) -> Option<Result<Node, LoadError>> {
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(error_on_duplicates)
        // Keeps "was this scalar plain?" so `'true'` or `""` are not taken for a bool or null.
        .prevent_coercion(true);
    // marked-yaml's loader has `unreachable!`/`assert!` on event orders we have not been able to
    // produce; a policy reload must never take the process down, so a panic is a load error.
    std::panic::catch_unwind(|| marked_yaml::parse_yaml_with_options(0, text, options)).ok()
}

fn describe_load_error(e: &LoadError) -> (Pos, String) {
    match e {
        LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => (
            marker_pos(Some(m)),
            "the policy must be a YAML mapping (`proxy:`, `services:`, ...)".into(),
        ),
        LoadError::UnexpectedAnchor(m) => (
            marker_pos(Some(m)),
            "YAML anchors and aliases are not supported; write the value out".into(),
        ),
        LoadError::MappingKeyMustBeScalar(m) => (
            marker_pos(Some(m)),
            "mapping keys must be plain strings".into(),
        ),
        LoadError::UnexpectedTag(m) => (
            marker_pos(Some(m)),
            "YAML tags (`!name`, `!!str`) are not supported".into(),
        ),
        LoadError::ScanError(m, scan) => {
            // The scanner quotes the offending character in this one message; leave it out.
            let info = if scan.info().starts_with("unexpected character") {
                "unexpected character"
            } else {
                scan.info()
            };
            (marker_pos(Some(m)), format!("invalid YAML: {info}"))
        }
        LoadError::DuplicateKey(dup) => (
            marker_pos(dup.key.span().start()),
            format!("duplicate key `{}`", dup.key.as_str()),
        ),
    }
}

/// YAML ends a plain scalar at `{` inside a flow list, so `[GET /a/{id}]` (natural for routes)
/// is a syntax error; recognise it to say how to write it instead.
fn brace_in_flow_list(text: &str, pos: Pos) -> bool {
    let Some((_, line)) = yaml_lines(text).nth(pos.line.saturating_sub(1)) else {
        return false;
    };
    // A route's `/{name}`: the scanner stops at the brace inside a flow collection.
    let at = pos.column.saturating_sub(1);
    let mut chars = line.chars().skip(at.saturating_sub(1));
    at > 0 && chars.next() == Some('/') && chars.next() == Some('{')
}

/// The parser reads only the first document and silently ignores the rest, which would let
/// half a policy be dropped unseen; refuse a second document instead.
fn check_single_document(text: &str, errs: &mut Errors) {
    let mut seen_content = false;
    let mut marker: Option<usize> = None;
    for (i, (_, line)) in yaml_lines(text).enumerate() {
        let is_marker = ["---", "..."].iter().any(|m| {
            line.strip_prefix(m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        });
        let trimmed = line.trim_start();
        let blank = trimmed.is_empty() || trimmed.starts_with('#');
        if is_marker {
            if seen_content && marker.is_none() {
                marker = Some(i + 1);
            }
            let after = line.get(3..).unwrap_or("").trim_start();
            if after.is_empty() || after.starts_with('#') {
                continue;
            }
        } else if blank || (!seen_content && line.starts_with('%')) {
            continue;
        }
        if let Some(line_no) = marker {
            errs.push(
                Pos::new(line_no, 1),
                "",
                "only one YAML document is allowed; remove this document marker and what follows or merge it",
            );
            return;
        }
        seen_content = true;
    }
}

pub(crate) fn marker_pos(m: Option<&marked_yaml::Marker>) -> Pos {
    m.map_or(Pos::START, |m| Pos::new(m.line(), m.column()))
}

/// Where a node starts. Block mappings' own spans point past their first key, so a mapping is
/// placed at its first key and a sequence at its first item.
pub(crate) fn node_pos(node: &Node) -> Option<Pos> {
    match node {
        Node::Scalar(s) => s.span().start().map(|m| marker_pos(Some(m))),
        Node::Mapping(m) => m
            .keys()
            .next()
            .map(|k| marker_pos(k.span().start()))
            .or_else(|| m.span().start().map(|m| marker_pos(Some(m)))),
        Node::Sequence(s) => s
            .first()
            .and_then(node_pos)
            .or_else(|| s.span().start().map(|m| marker_pos(Some(m)))),
    }
}

/// Mappings whose keys may be a misplaced secret: `admin`, a credential entry and anything
/// inside them (`credentials.NAME...`; the credential names themselves are names).
pub(crate) fn holds_secrets(path: &str) -> bool {
    path == "admin"
        || path.starts_with("admin.")
        || path
            .strip_prefix("credentials.")
            .is_some_and(|rest| !rest.is_empty())
}

/// `path` cut before its first key that may be a pasted secret: under `admin` or a credential
/// (`credentials.NAME`), every key must be one the format knows, since any other could be a
/// secret written as a key (`admin: {sk-live-…: {listen: 1, listen: 2}}`).
fn secret_safe(path: &str) -> &str {
    const KNOWN: &[&str] = &["listen", "token", "source", "refresh", "exec"];
    let mut keys = path.split('.');
    // How many leading keys are names: `admin`, or `credentials` and the credential's name.
    let names = match keys.next() {
        Some("admin") => 1,
        Some("credentials") => 2,
        _ => return path,
    };
    let mut end = 0;
    for (i, key) in path.split('.').enumerate() {
        // A list item's `[n]` is the path's, not the key's; any other `[` is in the key.
        let bare = match key.split_once('[') {
            Some((name, index))
                if index
                    .strip_suffix(']')
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) =>
            {
                name
            }
            _ => key,
        };
        if i >= names && !KNOWN.contains(&bare) {
            break;
        }
        end += if i == 0 { key.len() } else { key.len() + 1 };
    }
    path.get(..end).unwrap_or("")
}

pub(crate) fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// A plain `~`, `null` or nothing at all: treated as "not given" / empty.
pub(crate) fn is_null(node: &Node) -> bool {
    node.as_scalar().is_some_and(|s| {
        s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
    })
}

/// A node with the key path and position it was found at.
#[derive(Clone, Copy)]
pub(crate) struct Field<'a> {
    pub node: &'a Node,
    /// Position of the key (or of the list item) that holds this value.
    pub key_pos: Pos,
    pub path: &'a str,
}

impl<'a> Field<'a> {
    /// Where to point for a problem with the value: the scalar itself, else its key.
    pub fn pos(&self) -> Pos {
        match self.node {
            Node::Scalar(_) => node_pos(self.node).unwrap_or(self.key_pos),
            _ => self.key_pos,
        }
    }

    /// Last component of the key path, for messages ("`listen` must be ...").
    pub fn key(&self) -> &str {
        let tail = self.path.rsplit('.').next().unwrap_or(self.path);
        tail
    }

    pub fn is_null(&self) -> bool {
        is_null(self.node)
    }

    /// The entries of a mapping (null counts as empty), with their key positions.
    pub fn entries(&self, errs: &mut Errors) -> Option<Vec<Entry<'a>>> {
        if self.is_null() {
            return Some(Vec::new());
        }
        let Some(map) = self.node.as_mapping() else {
            errs.push(
                self.key_pos,
                self.path,
                "expected a mapping of `key: value`",
            );
            return None;
        };
        Some(
            map.iter()
                .map(|(k, v)| Entry {
                    key: k.as_str(),
                    key_pos: marker_pos(k.span().start()),
                    node: v,
                })
                .collect(),
        )
    }

    /// The items of a list (null counts as empty), each with its position and index.
    pub fn items(&self, errs: &mut Errors) -> Option<Vec<(usize, Pos, &'a Node)>> {
        if self.is_null() {
            return Some(Vec::new());
        }
        let Some(seq) = self.node.as_sequence() else {
            errs.push(
                self.pos(),
                self.path,
                "expected a list (`[a, b]` or `- a` lines)",
            );
            return None;
        };
        Some(
            seq.iter()
                .enumerate()
                .map(|(i, n)| (i, node_pos(n).unwrap_or(self.key_pos), n))
                .collect(),
        )
    }

    /// A non-empty string scalar without control characters (but tab): a raw one is refused
    /// before parsing, and this catches the escaped forms (`"a\0b"`, `"\x1b[2J"`), which would
    /// otherwise reach names, hosts and log lines.
    pub fn string(&self, errs: &mut Errors) -> Option<Located<String>> {
        self.text(errs, false)
    }

    /// `string`, where line breaks may be part of the value (a command's arguments).
    pub fn text(&self, errs: &mut Errors, newlines: bool) -> Option<Located<String>> {
        match self.node {
            Node::Scalar(s) if !self.is_null() && !s.as_str().is_empty() => {
                let allowed = |c: char| c == '\t' || (newlines && c == '\n');
                if let Some(c) = s.as_str().chars().find(|&c| c.is_control() && !allowed(c)) {
                    let what = format!(
                        "must not contain control characters (found U+{:04X})",
                        u32::from(c)
                    );
                    errs.push(self.pos(), self.path, what);
                    return None;
                }
                Some(Located {
                    value: s.as_str().to_owned(),
                    pos: self.pos(),
                    path: self.path.to_owned(),
                })
            }
            Node::Scalar(_) => {
                errs.push(self.pos(), self.path, "must not be empty");
                None
            }
            _ => {
                errs.push(self.key_pos, self.path, "expected a string");
                None
            }
        }
    }

    pub fn bool(&self, errs: &mut Errors) -> Option<bool> {
        match self.node.as_scalar().map(|s| (s.may_coerce(), s.as_str())) {
            Some((true, "true")) => Some(true),
            Some((true, "false")) => Some(false),
            _ => {
                errs.push(self.pos(), self.path, "must be `true` or `false`");
                None
            }
        }
    }

    /// An integer in `min..=max`.
    pub fn integer(&self, errs: &mut Errors, min: u64, max: u64) -> Option<u64> {
        let scalar = self.node.as_scalar();
        // A quoted `"8443"` is a string, as `allow_cleartext: "true"` is not a boolean.
        if scalar.is_some_and(|s| !s.may_coerce()) {
            errs.push(
                self.pos(),
                self.path,
                format!("must be a whole number from {min} to {max}, not a quoted string"),
            );
            return None;
        }
        let parsed = scalar
            .filter(|s| !s.as_str().is_empty() && s.as_str().bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.as_str().parse::<u64>().ok())
            .filter(|n| (min..=max).contains(n));
        if parsed.is_none() {
            errs.push(
                self.pos(),
                self.path,
                format!("must be a whole number from {min} to {max}"),
            );
        }
        parsed
    }

    /// A humantime duration (`30s`, `5m`, `1h 30m`) in `min..=max`.
    pub fn duration(&self, errs: &mut Errors, min: Duration, max: Duration) -> Option<Duration> {
        let text = self.node.as_scalar().map(|s| s.as_str()).unwrap_or("");
        match super::values::parse_duration(text) {
            Ok(d) if d >= min && d <= max => Some(d),
            Ok(_) => {
                errs.push(
                    self.pos(),
                    self.path,
                    format!(
                        "must be between {} and {}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                None
            }
            Err(why) => {
                errs.push(self.pos(), self.path, why);
                None
            }
        }
    }

    /// `IP:PORT` (`127.0.0.1:8480`, `[::1]:8480`); names are not resolved at load.
    pub fn socket_addr(&self, errs: &mut Errors) -> Option<SocketAddr> {
        let parsed = self
            .node
            .as_scalar()
            .and_then(|s| s.as_str().parse::<SocketAddr>().ok());
        if parsed.is_none() {
            errs.push(
                self.pos(),
                self.path,
                "must be an IP address and port, like `127.0.0.1:8480` or `[::1]:8480`",
            );
        }
        parsed
    }
}

/// One `key: value` of a mapping.
pub(crate) struct Entry<'a> {
    pub key: &'a str,
    pub key_pos: Pos,
    pub node: &'a Node,
}

/// A mapping with a closed set of keys: unknown keys are reported when it is opened, lookups
/// afterwards are by known name only.
pub(crate) struct Map<'a> {
    entries: Vec<Entry<'a>>,
    /// Where to report a missing key: the key that holds this mapping (or 1:1 at top level).
    pub pos: Pos,
    pub path: &'a str,
    paths: Vec<String>,
}

impl<'a> Map<'a> {
    pub fn open(errs: &mut Errors, field: Field<'a>, allowed: &[&str]) -> Option<Map<'a>> {
        let entries = field.entries(errs)?;
        for e in &entries {
            if allowed.contains(&e.key) {
                continue;
            }
            if e.key == "<<" {
                errs.push(
                    e.key_pos,
                    field.path,
                    "YAML merge keys (`<<`) are not supported; write the keys out",
                );
                continue;
            }
            // SECURITY: `token: {ghp_...}` or `github_token: {sk-...}` turn a pasted secret into
            // a mapping key; where secrets live, an unknown key is reported without its name.
            if holds_secrets(field.path) {
                errs.push(
                    e.key_pos,
                    field.path,
                    format!(
                        "unknown key (not repeated: it may be a secret; expected one of: {})",
                        allowed.join(", ")
                    ),
                );
                continue;
            }
            let hint = match closest(e.key, allowed) {
                Some(near) => format!("; did you mean `{near}`?"),
                None => format!(" (expected one of: {})", allowed.join(", ")),
            };
            errs.push(
                e.key_pos,
                &join(field.path, e.key),
                format!("unknown key `{}`{hint}", e.key),
            );
        }
        let paths = entries.iter().map(|e| join(field.path, e.key)).collect();
        Some(Map {
            entries,
            pos: field.key_pos,
            path: field.path,
            paths,
        })
    }

    pub fn get(&self, key: &str) -> Option<Field<'_>> {
        let i = self.entries.iter().position(|e| e.key == key)?;
        Some(Field {
            node: self.entries[i].node,
            key_pos: self.entries[i].key_pos,
            path: &self.paths[i],
        })
    }

    /// Like `get`, but a missing (or null) key is reported.
    pub fn require(&self, errs: &mut Errors, key: &str) -> Option<Field<'_>> {
        match self.get(key) {
            Some(f) if !f.is_null() => Some(f),
            Some(f) => {
                errs.push(f.key_pos, f.path, "must not be empty");
                None
            }
            None => {
                errs.push(
                    self.pos,
                    &join(self.path, key),
                    format!("required key `{key}` is missing"),
                );
                None
            }
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.iter().any(|e| e.key == key)
    }
}

/// The allowed key within edit distance 2 of a misspelt one.
fn closest<'k>(key: &str, allowed: &[&'k str]) -> Option<&'k str> {
    allowed
        .iter()
        .map(|a| (edit_distance(key, a), *a))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, a)| a)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Option<Node>, Vec<String>) {
        let mut errs = Errors::new("p.yaml");
        let node = parse_document(text, &mut errs);
        let list = errs.finish().0.iter().map(ToString::to_string).collect();
        (node, list)
    }

    // The spike the policy format depends on: marked-yaml gives 1-based line and column for
    // keys and scalars, and reports duplicate keys (when asked) with both positions.
    #[test]
    fn spike_positions_of_keys_values_and_duplicates() {
        let (node, errs) = parse("proxy:\n  listen: 1.2.3.4:5\n  bogus: 1\n");
        assert!(errs.is_empty());
        let node = node.unwrap();
        let proxy = node.as_mapping().unwrap().get_mapping("proxy").unwrap();
        let (key, value) = proxy.iter().nth(1).unwrap();
        assert_eq!(marker_pos(key.span().start()), Pos::new(3, 3));
        assert_eq!(node_pos(value), Some(Pos::new(3, 10)));

        let (node, errs) = parse("a: 1\nb:\n  c: 2\n  c: 3\n");
        assert_eq!(
            errs,
            ["p.yaml:4:3: b.c: duplicate key `c` (first written at 3:3)"]
        );
        // The walk goes on over the later value.
        let node = node.unwrap();
        let b = node.as_mapping().unwrap().get_mapping("b").unwrap();
        assert_eq!(b.get_scalar("c").unwrap().as_str(), "3");
    }

    #[test]
    fn flow_duplicates_and_top_level_duplicates() {
        let (_, errs) = parse("a: {x: 1, x: 2}\n");
        assert_eq!(
            errs,
            ["p.yaml:1:11: a.x: duplicate key `x` (first written at 1:5)"]
        );
        let (_, errs) = parse("a:\n  x: 1\na:\n  y: 2\n");
        assert_eq!(
            errs,
            ["p.yaml:3:1: a: duplicate key `a` (first written at 1:1)"]
        );
    }

    #[test]
    fn every_duplicate_is_reported_not_only_the_first() {
        let text = "admin:\n  token: env:A\n  token: env:B\ncredentials:\n  a: {source: env:X}\n  a: {source: env:Y}\nservices:\n  - {hosts: [x], hosts: [y]}\n  - s: {inject: 1, inject: 2}\n";
        let (node, errs) = parse(text);
        assert_eq!(
            errs,
            [
                "p.yaml:3:3: admin.token: duplicate key `token` (first written at 2:3)",
                "p.yaml:6:3: credentials.a: duplicate key `a` (first written at 5:3)",
                "p.yaml:8:18: services[0].hosts: duplicate key `hosts` (first written at 8:6)",
                "p.yaml:9:20: services[1].s.inject: duplicate key `inject` (first written at 9:9)",
            ]
        );
        assert!(node.is_some(), "the walk goes on over the later values");
        // A pasted secret as the parent's key is not repeated either.
        let (_, errs) = parse("admin:\n  sk-live-PASTED-1:\n    a: 1\n    a: 2\ncredentials:\n  k:\n    sk-live-PASTED-2: {b: 1, b: 2}\n");
        assert_eq!(
            errs,
            [
                "p.yaml:4:5: admin: duplicate key (not repeated: it may be a secret; first written at 3:5)",
                "p.yaml:7:30: credentials.k: duplicate key (not repeated: it may be a secret; first written at 7:24)",
            ]
        );
    }

    #[test]
    fn yaml_level_errors_have_positions() {
        let cases = [
            ("a: [1, 2\nb: 3\n", "p.yaml:2:2: a: invalid YAML: "),
            ("a:\n\tb: 1\n", "p.yaml:2:1: a: invalid YAML: tabs"),
            (
                "a:\n  b:\tme\n",
                "p.yaml:2:5: a: invalid YAML: ':' must be followed by a valid YAML whitespace (here a tab: use spaces)",
            ),
            // The scanner names the scalar before the tab; the tab is what is wrong.
            (
                "a:\n  b: me\n\tc: 1h\n",
                "p.yaml:3:1: a.b: invalid YAML: while scanning a plain scalar, found a tab",
            ),
            ("a: &x 1\nb: *x\n", "p.yaml:1:7: a: YAML anchors"),
            ("a: !!str 1\n", "p.yaml:1:10: a: YAML tags"),
            (
                "a:\n  b:\n    c: \"x\n",
                "p.yaml:3:8: a.b.c: invalid YAML: while scanning a quoted scalar",
            ),
            (
                "a:\n  - {b: 1}\n  - [c: [d\n",
                "p.yaml:4:1: a[1][0].c: invalid YAML:",
            ),
            ("hello", "p.yaml:1:1: the policy must be a YAML mapping"),
            ("- a\n", "p.yaml:1:1: the policy must be a YAML mapping"),
            ("[a]: 1", "p.yaml:1:1: mapping keys must be plain strings"),
            (
                "a: `x\n",
                "p.yaml:1:4: a: invalid YAML: unexpected character",
            ),
        ];
        for (text, want) in cases {
            let (node, errs) = parse(text);
            assert!(node.is_none(), "{text:?}");
            assert_eq!(errs.len(), 1, "{text:?}: {errs:?}");
            assert!(errs[0].starts_with(want), "{text:?}: {errs:?}");
        }
    }

    // SECURITY: under `admin` and a credential, a key the format does not know may be a pasted
    // secret; no message repeats one, whatever the error (`check` prints them, and a reload's
    // 400 answer carries them).
    #[test]
    fn key_paths_stop_before_a_key_that_may_be_a_pasted_secret() {
        let cases = [
            "admin:\n  sk-live-PASTED:\n    listen: a\n    listen: b\n",
            "credentials:\n  k:\n    source: env:A\n    sk-live-PASTED: {exec: [a], exec: [b]}\n",
            "admin:\n  token: env:X\n  sk-live-PASTED: [a\n",
            "credentials:\n  k:\n    sk-live-PASTED:\n      source: \"x\n",
            "admin:\n  token:\n    sk-live-PASTED: !!str x\n",
        ];
        for text in cases {
            let (_, errs) = parse(text);
            assert!(!errs.is_empty(), "{text:?}");
            for e in &errs {
                assert!(!e.contains("PASTED"), "{text:?}: {e}");
            }
        }
        assert_eq!(secret_safe("admin.token"), "admin.token");
        assert_eq!(secret_safe("admin.sk-x.listen"), "admin");
        assert_eq!(
            secret_safe("credentials.k.source.exec"),
            "credentials.k.source.exec"
        );
        assert_eq!(secret_safe("credentials.k.sk-x"), "credentials.k");
        assert_eq!(secret_safe("services.a.sk-x"), "services.a.sk-x");
        assert_eq!(
            secret_safe("credentials.k.source.exec[0]"),
            "credentials.k.source.exec[0]"
        );
        assert_eq!(secret_safe("admin.token[sk-pasted]"), "admin");
    }

    #[test]
    fn a_route_with_braces_in_a_flow_list_gets_a_hint() {
        // Read as written when it can be (`swap_route_braces`); else the hint.
        let route = |text: &str, i: usize| -> String {
            let (node, errs) = parse(text);
            assert!(errs.is_empty(), "{text:?}: {errs:?}");
            let node = node.unwrap();
            let routes = node.as_mapping().unwrap().get_sequence("routes").unwrap();
            routes.get_scalar(i).unwrap().as_str().to_owned()
        };
        assert_eq!(route("routes: [GET /a/{id}]\n", 0), "GET /a/{id}");
        // Lines ended by a lone CR are counted as the parser counts them.
        assert_eq!(
            route("x: 1\rroutes: [GET /a/{id}, GET /b/{c}]\r", 1),
            "GET /b/{c}"
        );
        // A value continued on the next line is never swapped (its braces could not be put
        // back where it starts): an `exec` argument stays as written, or the file is refused.
        let (node, errs) = parse("exec: [sh, -c, printf %s\n  a/{b}c]\n");
        assert!(node.is_none() && errs.len() == 1, "{errs:?}");
        let (_, errs) = parse("routes: [GET /a/{id}<]\n");
        assert_eq!(
            errs,
            ["p.yaml:1:17: routes: invalid YAML: while parsing a flow sequence, expected ',' or ']'; inside `[...]` a route with `{param}` must be quoted (`[\"GET /a/{id}\"]`) or written as a `- GET /a/{id}` line"]
        );
        let (node, errs) = parse("routes: [\"GET /a/{id}\", GET /b]\n");
        assert!(node.is_some() && errs.is_empty());
    }

    #[test]
    fn a_second_document_is_refused() {
        let (_, errs) = parse("a: 1\n---\nb: 2\n");
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("p.yaml:2:1: only one YAML document"));
        let (_, errs) = parse("a: 1\n...\ngarbage: [\n");
        assert!(errs[0].starts_with("p.yaml:2:1: only one YAML document"));
        // A lone CR ends a line for the parser: for this check too.
        for text in [
            "a: 1\r---\nb: 2\n",
            "a: 1\r---\rb: 2\r",
            "a: 1\r\n---\r\nb: 2\r\n",
        ] {
            let (_, errs) = parse(text);
            assert_eq!(errs.len(), 1, "{text:?}: {errs:?}");
            assert!(
                errs[0].starts_with("p.yaml:2:1: only one YAML document"),
                "{errs:?}"
            );
        }
        // Markers before the content, or a closing `...` with nothing after, are fine.
        for ok in [
            "---\na: 1\n",
            "%YAML 1.2\n---\na: 1\n...\n# end\n",
            "# c\n--- # x\na: 1\n",
        ] {
            let (node, errs) = parse(ok);
            assert!(node.is_some() && errs.is_empty(), "{ok:?}: {errs:?}");
        }
    }

    #[test]
    fn byte_order_mark_is_ignored() {
        let (node, errs) = parse("\u{feff}a: 1\n");
        assert!(errs.is_empty());
        let node = node.unwrap();
        let (k, _) = node.as_mapping().unwrap().iter().next().unwrap();
        assert_eq!(k.as_str(), "a");
        assert_eq!(marker_pos(k.span().start()), Pos::new(1, 1));
    }

    #[test]
    fn null_forms() {
        let (node, _) = parse("a:\nb: ~\nc: null\nd: ''\ne: x\n");
        let node = node.unwrap();
        let m = node.as_mapping().unwrap();
        let null: Vec<bool> = m.values().map(is_null).collect();
        assert_eq!(null, [true, true, true, false, false]);
    }

    #[test]
    fn unknown_keys_suggest_the_closest() {
        let (node, _) = parse("listne: 1\nzzz: 2\n");
        let node = node.unwrap();
        let mut errs = Errors::new("p.yaml");
        let field = Field {
            node: &node,
            key_pos: Pos::START,
            path: "proxy",
        };
        let map = Map::open(&mut errs, field, &["listen", "idle_timeout"]).unwrap();
        assert!(map.has("listne"));
        let msgs: Vec<String> = errs.finish().0.iter().map(ToString::to_string).collect();
        assert_eq!(
            msgs,
            [
                "p.yaml:1:1: proxy.listne: unknown key `listne`; did you mean `listen`?",
                "p.yaml:2:1: proxy.zzz: unknown key `zzz` (expected one of: listen, idle_timeout)",
            ]
        );
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("listen", "listen"), 0);
        assert_eq!(edit_distance("listne", "listen"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("credential", "credentials"), 1);
    }
}
