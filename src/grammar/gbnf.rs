//! llama.cpp's GBNF grammars (`root ::= ...`, what llama-server's `grammar` field takes)
//! translated to the Lark syntax llguidance reads: rules (names made Lark identifiers, `root`
//! the start), string literals, character classes and `.`, grouping, alternation, `*` `+` `?`
//! and `{m}` `{m,}` `{m,n}` repetition (expanded), comments.

use anyhow::{anyhow, bail, Result};

/// Lark of a GBNF grammar, or where it stops making sense.
pub fn to_lark(gbnf: &str) -> Result<String> {
    let mut p = Parser {
        s: gbnf.chars().collect(),
        i: 0,
        made: 0,
    };
    let mut out = String::from("%llguidance {}\nstart: g_root\n");
    let mut rules = 0;
    loop {
        p.skip_space(true);
        if p.done() {
            break;
        }
        let name = p.name()?;
        p.skip_space(false);
        if !p.eat_str("::=") {
            bail!("GBNF: expected ::= after {name} (at {})", p.at());
        }
        let body = p.alternatives(0)?;
        out += &format!("{}: {body}\n", lark_name(&name));
        if out.len() > MAX_LARK {
            bail!("GBNF: the grammar expands past {MAX_LARK} bytes");
        }
        rules += 1;
    }
    if rules == 0 {
        bail!("GBNF: no rules");
    }
    Ok(out)
}

fn lark_name(gbnf: &str) -> String {
    format!("g_{}", gbnf.to_ascii_lowercase().replace('-', "_"))
}

struct Parser {
    s: Vec<char>,
    i: usize,
    /// Bytes of Lark made so far, nested pieces counted again in what contains them: bounds
    /// the work and the memory of expansions.
    made: usize,
}

/// Nesting deeper than this is refused (no stack overflow on hostile input).
const MAX_DEPTH: usize = 64;

/// Largest translation (repetitions are expanded, so nested ones multiply): 4 MiB.
const MAX_LARK: usize = 4 << 20;

impl Parser {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn at(&self) -> String {
        self.s[self.i.min(self.s.len())..].iter().take(20).collect()
    }

    /// Skips spaces and comments; newlines too when `newlines` (between rules), and inside a
    /// rule where the next line does not start a new rule.
    fn skip_space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            if c == '#' {
                while self.peek().is_some_and(|c| c != '\n') {
                    self.i += 1;
                }
            } else if c == ' '
                || c == '\t'
                || c == '\r'
                || (c == '\n' && (newlines || !self.next_line_starts_rule()))
            {
                self.i += 1;
            } else {
                break;
            }
        }
    }

    /// Whether the text after the newline at `self.i` begins `name ::=` (looking no further
    /// than that: a grammar of many lines stays linear).
    fn next_line_starts_rule(&self) -> bool {
        let s = &self.s;
        let mut k = self.i + 1;
        while k < s.len() && matches!(s[k], ' ' | '\t' | '\r' | '\n') {
            k += 1;
        }
        let name_start = k;
        while k < s.len() && (s[k].is_ascii_alphanumeric() || s[k] == '-' || s[k] == '_') {
            k += 1;
        }
        if k == name_start {
            return false;
        }
        while k < s.len() && matches!(s[k], ' ' | '\t') {
            k += 1;
        }
        s[k..].starts_with(&[':', ':', '='])
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.s[self.i.min(self.s.len())..]
            .iter()
            .take(n)
            .copied()
            .eq(s.chars())
        {
            self.i += n;
            true
        } else {
            false
        }
    }

    fn name(&mut self) -> Result<String> {
        let start = self.i;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.i += 1;
        }
        if start == self.i {
            bail!("GBNF: expected a rule name at {:?}", self.at());
        }
        Ok(self.s[start..self.i].iter().collect())
    }

    fn alternatives(&mut self, depth: usize) -> Result<String> {
        if depth > MAX_DEPTH {
            bail!("GBNF: groups nested more than {MAX_DEPTH} deep");
        }
        let mut alts = vec![self.sequence(depth)?];
        loop {
            self.skip_space(false);
            if self.peek() == Some('|') {
                self.i += 1;
                alts.push(self.sequence(depth)?);
            } else {
                return Ok(alts.join(" | "));
            }
        }
    }

    fn sequence(&mut self, depth: usize) -> Result<String> {
        let mut items = Vec::new();
        loop {
            self.skip_space(false);
            let item = match self.peek() {
                None | Some('|' | ')' | '\n') => break,
                Some('"') => self.literal()?,
                Some('[') => self.class()?,
                Some('.') => {
                    self.i += 1;
                    "/(?s:.)/".to_string()
                }
                Some('(') => {
                    self.i += 1;
                    let inner = self.alternatives(depth + 1)?;
                    self.skip_space(true);
                    if self.peek() != Some(')') {
                        bail!("GBNF: unclosed ( at {:?}", self.at());
                    }
                    self.i += 1;
                    format!("({inner})")
                }
                Some(c) if c.is_ascii_alphanumeric() || c == '-' || c == '_' => {
                    lark_name(&self.name()?)
                }
                Some(c) => bail!("GBNF: unexpected {c:?} at {:?}", self.at()),
            };
            items.push(self.repeat(item)?);
        }
        Ok(if items.is_empty() {
            "\"\"".to_string()
        } else {
            items.join(" ")
        })
    }

    /// `item` with the repetition operator after it, if any (within [`MAX_LARK`] of work).
    fn repeat(&mut self, item: String) -> Result<String> {
        let out = self.repeat_unbounded(item)?;
        self.made = self.made.saturating_add(out.len());
        if self.made > MAX_LARK {
            bail!("GBNF: the grammar expands past {MAX_LARK} bytes");
        }
        Ok(out)
    }

    fn repeat_unbounded(&mut self, item: String) -> Result<String> {
        Ok(match self.peek() {
            Some(op @ ('*' | '+' | '?')) => {
                self.i += 1;
                format!("{item}{op}")
            }
            Some('{') => {
                self.i += 1;
                let close = self.s[self.i..]
                    .iter()
                    .position(|&c| c == '}')
                    .ok_or_else(|| anyhow!("GBNF: unclosed {{"))?;
                let spec: String = self.s[self.i..self.i + close].iter().collect();
                self.i += close + 1;
                let num = |t: &str| -> Result<usize> {
                    t.trim()
                        .parse()
                        .map_err(|_| anyhow!("GBNF: bad repetition {{{spec}}}"))
                };
                let (min, max) = match spec.split_once(',') {
                    None => (num(&spec)?, Some(num(&spec)?)),
                    Some((a, b)) if b.trim().is_empty() => (num(a)?, None),
                    Some((a, b)) => (num(a)?, Some(num(b)?)),
                };
                if max.is_some_and(|m| m < min) || min.max(max.unwrap_or(0)) > 1000 {
                    bail!("GBNF: repetition {{{spec}}} is out of range (at most 1000)");
                }
                let copies = max.unwrap_or(min + 1).max(1);
                if item.len().saturating_mul(copies) > MAX_LARK {
                    bail!("GBNF: repetition {{{spec}}} expands past {MAX_LARK} bytes");
                }
                let mut parts = vec![item.clone(); min];
                match max {
                    None => parts.push(format!("{item}*")),
                    Some(m) => parts.extend(std::iter::repeat_n(format!("{item}?"), m - min)),
                }
                if parts.is_empty() {
                    "\"\"".to_string()
                } else {
                    format!("({})", parts.join(" "))
                }
            }
            _ => item,
        })
    }

    /// A "..." literal as a JSON string (which Lark reads).
    fn literal(&mut self) -> Result<String> {
        self.i += 1;
        let mut text = String::new();
        loop {
            match self.peek() {
                None => bail!("GBNF: unclosed string"),
                Some('"') => {
                    self.i += 1;
                    break;
                }
                Some('\\') => {
                    self.i += 1;
                    text.push(self.escape()?);
                }
                Some(c) => {
                    self.i += 1;
                    text.push(c);
                }
            }
        }
        Ok(serde_json::Value::String(text).to_string())
    }

    fn escape(&mut self) -> Result<char> {
        let c = self
            .peek()
            .ok_or_else(|| anyhow!("GBNF: a string ends in \\"))?;
        self.i += 1;
        let hex = |p: &mut Parser, n: usize| -> Result<char> {
            let h: String = p.s[p.i..(p.i + n).min(p.s.len())].iter().collect();
            p.i += n;
            u32::from_str_radix(&h, 16)
                .ok()
                .and_then(char::from_u32)
                .ok_or_else(|| anyhow!("GBNF: bad escape \\{c}{h}"))
        };
        Ok(match c {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            other => other,
        })
    }

    /// A [...] class as a regex (the class syntax is the same; '/' escaped for Lark).
    fn class(&mut self) -> Result<String> {
        let start = self.i;
        self.i += 1;
        loop {
            match self.peek() {
                None => bail!("GBNF: unclosed ["),
                Some('\\') => self.i += 2,
                Some(']')
                    if self.i > start + 1 && !(self.i == start + 2 && self.s[start + 1] == '^') =>
                {
                    self.i += 1;
                    break;
                }
                Some(_) => self.i += 1,
            }
        }
        // Inside the brackets: escapes kept; '/' escaped for Lark's delimiters; '[', '&' and
        // '~' escaped, which Rust's regex classes read as nesting and set operations.
        let inner = &self.s[start + 1..self.i - 1];
        let mut class = String::from("[");
        let mut k = 0;
        while k < inner.len() {
            match inner[k] {
                '\\' if k + 1 < inner.len() => {
                    class.push('\\');
                    class.push(inner[k + 1]);
                    k += 2;
                    continue;
                }
                c @ ('/' | '[' | '&' | '~') => {
                    class.push('\\');
                    class.push(c);
                }
                c => class.push(c),
            }
            k += 1;
        }
        class.push(']');
        Ok(format!("/{class}/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gbnf_rules_become_lark() {
        let g = to_lark(
            "# a comment\nroot ::= answer ( \" \" answer ){0,2}\nanswer ::= \"yes\" | \"no\" |\n   [0-9]+ \"\\n\"\n",
        )
        .unwrap();
        assert!(g.contains("start: g_root"), "{g}");
        assert!(
            g.contains("g_root: g_answer ((\" \" g_answer)? (\" \" g_answer)?)"),
            "{g}"
        );
        assert!(
            g.contains("g_answer: \"yes\" | \"no\" | /[0-9]/+ \"\\n\""),
            "{g}"
        );
        for bad in [
            "root ::= (\"a\"",
            "root = \"a\"",
            "root ::= \"a",
            "root ::= x{5,2}",
            "",
        ] {
            assert!(to_lark(bad).is_err(), "{bad}");
        }
        // llama.cpp's english.gbnf punctuation class: '[', '&', '~' and '/' escaped.
        let english = to_lark(r##"root ::= [!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~]+"##).unwrap();
        assert!(
            english.contains(r##"/[!"#$%\&'()*+,-.\/:;<=>?@\[\]^_`{|}\~]/+"##),
            "{english}"
        );
        let bomb = "root ::= ((((\"a\"{1000}){1000}){1000}){1000})";
        assert!(to_lark(bomb)
            .unwrap_err()
            .to_string()
            .contains("expands past"));
        let wide = format!("root ::= {}", "(\"abcdefgh\"{999}) ".repeat(2000));
        assert!(to_lark(&wide)
            .unwrap_err()
            .to_string()
            .contains("expands past"));
        let deep = format!("root ::= {}\"a\"{}", "(".repeat(100), ")".repeat(100));
        assert!(to_lark(&deep).is_err());
    }
}
