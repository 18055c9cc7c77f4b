//! The line protocol between the launcher and its children.
//!
//! A child writes one message per stdout line: the prefix [`PREFIX`], a kind,
//! then `key=value` fields (values never contain spaces; the free-text `msg`
//! of an error is last and takes the rest of the line). Other lines are
//! forwarded by the launcher as they are. The launcher writes commands to a
//! probe's stdin, one per line (`right ADDR`, `go`, `quit`).

use std::collections::HashMap;

use super::{Context, Result};

/// Marks a protocol line.
pub const PREFIX: &str = "@pccl-bench";

/// A parsed protocol line.
#[derive(Debug, Clone, PartialEq)]
pub struct Msg {
    pub kind: String,
    fields: HashMap<String, String>,
}

impl Msg {
    /// Parses a line; `None` when it is not a protocol line.
    pub fn parse(line: &str) -> Option<Msg> {
        let rest = line.strip_prefix(PREFIX)?.strip_prefix(' ')?;
        let (kind, mut rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let mut fields = HashMap::new();
        while !rest.is_empty() {
            let (tok, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(msg) = tok.strip_prefix("msg=") {
                let full = if tail.is_empty() {
                    msg.to_string()
                } else {
                    format!("{msg} {tail}")
                };
                fields.insert("msg".to_string(), full);
                break;
            }
            if let Some((k, v)) = tok.split_once('=') {
                fields.insert(k.to_string(), v.to_string());
            }
            rest = tail;
        }
        Some(Msg {
            kind: kind.to_string(),
            fields,
        })
    }

    /// A raw field.
    pub fn get(&self, key: &str) -> Result<&str> {
        self.fields
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("'{}' line lacks field '{key}'", self.kind))
    }

    /// A field parsed as `T`.
    pub fn num<T: std::str::FromStr>(&self, key: &str) -> Result<T>
    where
        T::Err: std::fmt::Display,
    {
        let v = self.get(key)?;
        v.parse::<T>()
            .with_context(|| format!("field '{key}' of '{}' line ({v:?})", self.kind))
    }

    /// A comma-separated list of floats (empty string: empty list).
    pub fn floats(&self, key: &str) -> Result<Vec<f64>> {
        let v = self.get(key)?;
        if v.is_empty() {
            return Ok(Vec::new());
        }
        v.split(',')
            .map(|x| {
                x.parse::<f64>()
                    .with_context(|| format!("field '{key}' of '{}' line", self.kind))
            })
            .collect()
    }
}

/// Formats a protocol line (the caller prints it).
pub fn line(kind: &str, fields: &[(&str, String)]) -> String {
    let mut s = format!("{PREFIX} {kind}");
    for (k, v) in fields {
        s.push(' ');
        s.push_str(k);
        s.push('=');
        if *k == "msg" {
            s.push_str(&v.replace('\n', " | "));
        } else {
            s.push_str(&v.replace([' ', '\n'], "_"));
        }
    }
    s
}

/// Prints a protocol line on stdout (line-buffered, so it goes out at once).
pub fn emit(kind: &str, fields: &[(&str, String)]) {
    println!("{}", line(kind, fields));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let l = line(
            "result",
            &[
                ("bytes", "4".into()),
                ("times", "1.5,2".into()),
                ("msg", "a b\nc".into()),
            ],
        );
        let m = Msg::parse(&l).unwrap();
        assert_eq!(m.kind, "result");
        assert_eq!(m.num::<u64>("bytes").unwrap(), 4);
        assert_eq!(m.floats("times").unwrap(), vec![1.5, 2.0]);
        assert_eq!(m.get("msg").unwrap(), "a b | c");
        assert!(m.get("nope").is_err());
        assert!(Msg::parse("hello").is_none());
        assert_eq!(Msg::parse("@pccl-bench done").unwrap().kind, "done");
    }
}
