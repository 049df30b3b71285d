//! Reading src/ as text, for the tests that check its shape (`tests/layers.rs`: who imports
//! whom; `tests/descriptors.rs`: who may open a descriptor). A rough lexer, enough for paths:
//! comments and the contents of string and char literals are blanked, line breaks kept (so that
//! a byte offset still names its line).
//!
//! Included by the test files that use it (`mod source_support;`).
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};

/// The crate's src/ folder.
pub fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every .rs file under src/, relative to it, with '/' separators, sorted.
pub fn files() -> Vec<String> {
    fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).expect("read src/") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                walk(&p, base, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let rel = p.strip_prefix(base).unwrap().to_string_lossy();
                out.push(rel.replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(&src(), &src(), &mut out);
    out.sort();
    out
}

/// The code of `text` without comments and string literals (a string becomes `""`, a char
/// literal `' '`); every line break is kept.
pub fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                let mut lines = 0;
                for c in chars.by_ref() {
                    lines += (c == '\n') as usize;
                    match (escaped, c) {
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"\"");
                out.extend(std::iter::repeat_n('\n', lines));
            }
            '\'' => {
                // A char literal ('a', '\n', '"') or a lifetime ('a): skip a literal whole.
                let rest: String = chars.clone().take(3).collect();
                let lit = rest.starts_with('\\') || rest.chars().nth(1) == Some('\'');
                if lit {
                    for c in chars.by_ref() {
                        if c == '\'' {
                            break;
                        }
                    }
                    out.push_str("' '");
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// `code` (from [`code_of`]) with every `#[cfg(test)]` item blanked (unit tests may open what
/// they like), line breaks kept: the attribute and the item after it, up to the brace that
/// closes its body (or its `;`).
pub fn without_tests(code: &str) -> String {
    const ATTR: &str = "#[cfg(test)]";
    let mut out: Vec<u8> = code.as_bytes().to_vec();
    let mut from = 0;
    while let Some(i) = code[from..].find(ATTR).map(|i| i + from) {
        let mut depth = 0usize;
        let mut end = code.len();
        for (j, b) in code.bytes().enumerate().skip(i + ATTR.len()) {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        end = j + 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    end = j + 1;
                    break;
                }
                _ => {}
            }
        }
        for b in &mut out[i..end] {
            if *b != b'\n' {
                *b = b' ';
            }
        }
        from = end;
    }
    String::from_utf8(out).expect("only ASCII was blanked")
}

/// The 1-based line of byte offset `at` in `code`.
pub fn line_of(code: &str, at: usize) -> usize {
    code[..at].matches('\n').count() + 1
}
